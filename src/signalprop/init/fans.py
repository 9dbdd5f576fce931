"""Fan-in and fan-out: the rules live with the other layer facts in
:mod:`signalprop.layers` (one source for init, the theory column, the
recorder, the diagnosis and the alerts); re-exported here, where
``signalprop.init.fans`` has always been."""

from __future__ import annotations

from ..layers import ParamSpec, fans, param_specs, tensor_fans

__all__ = ["ParamSpec", "fans", "param_specs", "tensor_fans"]
