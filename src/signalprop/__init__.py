"""signalprop: keep deep networks numerically stable.

``signalprop.init`` initializes, ``signalprop.theory`` predicts,
``signalprop.check`` diagnoses, ``signalprop.lab`` demonstrates.

Submodules load on first use, so ``import signalprop.theory`` stays free of
torch (theory is numpy/scipy only).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "activations": ("signalprop.activations", None),
    "init": ("signalprop.init", None),
    "theory": ("signalprop.theory", None),
    "probe": ("signalprop.probe", None),
    "lab": ("signalprop.lab", None),
    "report": ("signalprop.report", None),
    "statistics": ("signalprop.statistics", None),
    "layers": ("signalprop.layers", None),
    "check": ("signalprop.probe.check", "check"),
    "monitor": ("signalprop.monitor", None),  # callable: sp.monitor(model, every=50)
    "Monitor": ("signalprop.monitor.core", "Monitor"),
    "clip": ("signalprop.clip", None),
    "coord_check": ("signalprop.width.coord", "coord_check"),
    "CoordCheck": ("signalprop.width.records", "CoordCheck"),
    "width": ("signalprop.width", None),
    "sweep": ("signalprop.sweep", None),
    "Report": ("signalprop.probe.check", "Report"),
    "replay": ("signalprop.probe.replay", "replay"),
    "InitSummary": ("signalprop.records", "InitSummary"),
    "LayerStats": ("signalprop.records", "LayerStats"),
    "Problem": ("signalprop.records", "Problem"),
}

__all__ = ["CoordCheck", "InitSummary", "LayerStats", "Monitor", "Problem", "Report", "__version__", "activations",
           "check", "clip", "coord_check", "init", "lab", "layers", "monitor", "probe", "replay", "report", "statistics", "sweep",
           "theory", "width"]

if TYPE_CHECKING:  # pragma: no cover
    from . import activations, clip, init, lab, layers, probe, report, statistics, sweep, theory, width
    from .monitor import monitor
    from .monitor.core import Monitor
    from .probe.check import Report, check
    from .probe.replay import replay
    from .records import InitSummary, LayerStats, Problem
    from .width.coord import coord_check
    from .width.records import CoordCheck


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'signalprop' has no attribute {name!r}")
    mod, attr = _LAZY[name]
    value = importlib.import_module(mod)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
