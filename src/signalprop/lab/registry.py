"""The experiment registry and the runner that saves every run reproducibly.

Each run writes ``config.json`` (the frozen config, seed, package versions),
``results.json`` (its numbers) and its figures into the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..records import _clean


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str
    config_cls: type
    run: Callable[[Any, Path, Any], dict[str, Any]]  # (config, out_dir, progress) -> results
    quick: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides for --quick


_REGISTRY: dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    _REGISTRY[exp.name] = exp
    return exp


def experiments() -> dict[str, Experiment]:
    from . import depth, seed_demos, training_runs, zoo  # noqa: F401 - registration side effect

    return dict(sorted(_REGISTRY.items()))


def environment() -> dict[str, str]:
    import numpy
    import torch

    from .. import __version__

    return {"signalprop": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def run_experiment(name: str, out: str | Path, *, quick: bool = False, progress: Any = None,
                   **overrides: Any) -> dict[str, Any]:
    """Run experiment ``name`` and save config, results and figures under ``out``."""
    exps = experiments()
    if name not in exps:
        raise ValueError(f"unknown experiment {name!r}; available: {sorted(exps)}")
    exp = exps[name]
    kwargs = {**(exp.quick if quick else {}), **overrides}
    valid = {f.name for f in dataclasses.fields(exp.config_cls)}
    bad = sorted(set(kwargs) - valid)
    if bad:
        raise ValueError(f"experiment {name!r} has no option(s) {bad}; options: {sorted(valid)}")
    config = exp.config_cls(**kwargs)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"experiment": name, "quick": quick, "config": dataclasses.asdict(config),
            "environment": environment()}
    (out_dir / "config.json").write_text(json.dumps(_clean(meta), indent=2))
    results = exp.run(config, out_dir, progress)
    (out_dir / "results.json").write_text(json.dumps(_clean(results), indent=2))
    return results
