"""Training-time tracking on top of probe: sampling, alerts over time, history.

``sp.monitor(model, every=50)`` is this package called as a function (it is
the subpackage and the entry point at once, whichever is imported first).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .core import Monitor, monitor

__all__ = ["Monitor", "monitor"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Monitor:
        return monitor(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
