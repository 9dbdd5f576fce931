"""The experiment registry and the runner that saves every run reproducibly.

Each run writes ``config.json`` (the frozen config, seed, package versions),
``results.json`` (its numbers) and its figures into the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    from . import depth, papers, schoenholz, seed_demos, training_runs, zoo  # noqa: F401 - registration side effect

    return dict(sorted(_REGISTRY.items()))


def environment() -> dict[str, str]:
    import numpy
    import torch

    from .. import __version__

    return {"signalprop": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def _check_type(exp: str, key: str, value: Any, default: Any) -> None:
    """An override must have its field's type (an int where the default is
    one, a number for floats, a list for sequences): checked before anything
    is written or run."""
    def bad(what: str) -> ValueError:
        return ValueError(f"experiment {exp!r}: {key}={value!r} must be {what} (default {default!r})")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        if default >= 0 and value < 0:
            raise bad("a whole number >= 0")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise bad("a number")
    elif isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise bad("a JSON list, e.g. [1, 2]")
    elif isinstance(default, str) and not isinstance(value, str):
        raise bad("a string")


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
    defaults = exp.config_cls()
    for k, v in overrides.items():
        _check_type(name, k, v, getattr(defaults, k))
    config = exp.config_cls(**kwargs)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"experiment": name, "quick": quick, "config": dataclasses.asdict(config),
            "environment": environment()}
    cfg_path = out_dir / "config.json"
    cfg_path.write_text(json.dumps(_clean(meta), indent=2))
    try:
        results = exp.run(config, out_dir, progress)
    except BaseException:  # a failed or interrupted run leaves no config claiming results
        cfg_path.unlink(missing_ok=True)
        raise
    (out_dir / "results.json").write_text(json.dumps(_clean(results), indent=2))
    return results
