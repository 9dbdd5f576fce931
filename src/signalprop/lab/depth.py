"""``signalprop lab run depth``: plain networks 10 to 10,000 layers deep, trained.

Plain MLPs (Linear + activation, no skips, no normalization) on
scikit-learn's digits, for each depth x activation x initialization: the
gradient ratio first/last layer at initialization (from ``check``) and the
test accuracy after SGD with momentum, the learning rate picked per cell on
the validation split from a grid that shrinks as 1/depth (Saxe et al. 2014:
near-isometric deep nets need a learning rate ~ 1/depth).  A residual MLP
without normalization, with and without Fixup scaling, shows the residual
route.  Finished cells are cached in ``OUT/cells`` so an interrupted sweep
resumes.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..probe.check import check
from ..records import _clean
from .datasets import Split, digits
from .models import DeepMLP, ResMLP, _initialize
from .registry import Experiment, register
from .train import torch_threads, train


@dataclass(frozen=True)
class DepthConfig:
    depths: tuple[int, ...] = (10, 100, 1000, 10000)
    width: int = 64  # hidden width of every layer
    acts: tuple[str, ...] = ("tanh", "sigmoid", "relu")
    inits: tuple[str, ...] = ("default", "xavier_normal", "kaiming_normal", "orthogonal", "lsuv", "critical")
    steps: int = 2000  # SGD steps per (cell, learning rate)
    lr_scale: tuple[float, ...] = (0.1, 0.3, 1.0)  # learning rates: scale / depth, capped at lr_max
    lr_max: float = 0.1
    momentum: float = 0.9
    batch: int = 128
    seed: int = 0  # data split, initialization and minibatch order
    residual_blocks: int = 1000  # residual MLP without normalization (0: skip)
    residual_steps: int = 500
    residual_lrs: tuple[float, ...] = (0.003, 0.01, 0.03)
    only: tuple[str, ...] = ()  # restrict to cells "act/init/depth" (e.g. "tanh/critical/10000")
    device: str = "cpu"
    threads: int = 0  # torch threads (0: leave torch's default; inside each cell on Ray too)
    use_ray: bool = False  # the cells as Ray tasks (signalprop.sweep.run_tasks; local ray.init())
    ray_address: str = ""  # or on this Ray cluster


QUICK = {"depths": (10, 100), "inits": ("default", "xavier_normal", "critical"), "steps": 150,
         "lr_scale": (0.3, 1.0), "residual_blocks": 0}


def _key(cfg: DepthConfig) -> dict[str, Any]:
    """What a cached cell must match, in its JSON form (tuples become lists)."""
    keep = ("width", "steps", "lr_scale", "lr_max", "momentum", "batch", "seed")
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k in keep}))


def _lrs(cfg: DepthConfig, depth: int) -> list[float]:
    return sorted({min(cfg.lr_max, s / depth) for s in cfg.lr_scale})


def _cell(cfg: DepthConfig, data: Split, act: str, init: str, depth: int, progress: Any) -> dict[str, Any]:
    dev = torch.device(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # torch's default init draws from the global generator
    model = DeepMLP(depth, cfg.width, act, data.n_features, data.n_classes)
    probe = data.x_train[:256]
    summary = _initialize(model, init, probe, g, act)
    t0 = time.perf_counter()
    rep = check(model, probe)
    check_s = time.perf_counter() - t0
    start = copy.deepcopy(model.state_dict())
    d = _to(data, dev)
    runs = []
    best: dict[str, Any] | None = None
    for lr in _lrs(cfg, depth):
        model.load_state_dict(start)
        model.to(dev)
        t0 = time.perf_counter()
        res = train(model, d, steps=cfg.steps, lr=lr, momentum=cfg.momentum, batch=cfg.batch, seed=cfg.seed,
                    progress=progress)
        row = {"lr": lr, "val_acc": res.val_acc, "test_acc": res.test_acc, "diverged": res.diverged,
               "losses": res.losses, "seconds": time.perf_counter() - t0}
        runs.append(row)
        if best is None or row["val_acc"] > best["val_acc"]:
            best = row
        model.cpu()
    assert best is not None
    return {"act": act, "init": init, "depth": depth, "verdict": rep.verdict,
            "grad_ratio": rep.summary.first_last_grad_ratio, "check_seconds": check_s,
            "best_lr": best["lr"], "val_acc": best["val_acc"], "test_acc": best["test_acc"],
            "losses": best["losses"], "runs": runs,
            "init_notes": list(getattr(summary, "notes", ()) or ())}


def _to(data: Split, dev: torch.device) -> Split:
    if dev.type == "cpu":
        return data
    return Split(data.x_train.to(dev), data.y_train.to(dev), data.x_val.to(dev), data.y_val.to(dev),
                 data.x_test.to(dev), data.y_test.to(dev), data.seed, data.source)


def _residual_cells(cfg: DepthConfig, data: Split, progress: Any) -> list[dict[str, Any]]:
    out = []
    for scaling in ("fixup", "none"):
        g = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        model = ResMLP(cfg.residual_blocks, cfg.width, "relu", data.n_features, data.n_classes)
        _initialize(model, "kaiming_normal", None, g, None, scaling)
        rep = check(model, data.x_train[:256])
        start = copy.deepcopy(model.state_dict())
        best = None
        for lr in cfg.residual_lrs:
            model.load_state_dict(start)
            res = train(model, data, steps=cfg.residual_steps, lr=lr, momentum=cfg.momentum, batch=cfg.batch,
                        seed=cfg.seed, progress=progress)
            if best is None or res.val_acc > best.val_acc:
                best = res
        assert best is not None
        out.append({"model": f"resmlp blocks={cfg.residual_blocks} relu kaiming_normal", "residual": scaling,
                    "verdict": rep.verdict, "grad_ratio": rep.summary.first_last_grad_ratio,
                    "best_lr": best.lr, "val_acc": best.val_acc, "test_acc": best.test_acc,
                    "diverged": best.diverged, "losses": best.losses})
    return out


def run_depth(cfg: DepthConfig, out: Path, progress: Any = None) -> dict[str, Any]:
    with torch_threads(cfg.threads):  # the caller's thread count is back after the sweep
        return _run_depth(cfg, out, progress)


def _run_depth(cfg: DepthConfig, out: Path, progress: Any) -> dict[str, Any]:
    data = digits(cfg.seed)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    todo = [(a, i, d) for d in cfg.depths for a in cfg.acts for i in cfg.inits
            if not cfg.only or f"{a}/{i}/{d}" in cfg.only]
    key = _key(cfg)
    if progress is not None:
        total = sum(cfg.steps * len(_lrs(cfg, d)) for _, _, d in todo)
        total += (2 * cfg.residual_steps * len(cfg.residual_lrs)) if cfg.residual_blocks else 0
        progress.start(total, "depth sweep")
    if cfg.use_ray or cfg.ray_address:
        return _finish(cfg, out, data, _ray_cells(cfg, todo, cells_dir, key, progress), progress)
    cells = []
    cached_cells = 0
    for act, init, depth in todo:
        path = cells_dir / f"{act}-{init}-d{depth}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                cells.append(cached["cell"])
                cached_cells += 1
                if progress is not None:
                    progress.advance(cfg.steps * len(_lrs(cfg, depth)))
                continue
        if progress is not None:
            progress.advance(0, description=f"{act} / {init} / depth {depth}")
        cell = _cell(cfg, data, act, init, depth, progress)
        path.write_text(json.dumps(_clean({"key": key, "cell": cell})))
        cells.append(cell)
    return _finish(cfg, out, data, (cells, cached_cells), progress)


def _cell_task(task: tuple[DepthConfig, str, str, int]) -> dict[str, Any]:
    """One cell as an independent task (a Ray worker): its data split from the config's seed."""
    cfg, act, init, depth = task
    return _cell(cfg, digits(cfg.seed), act, init, depth, None)


def _ray_cells(cfg: DepthConfig, todo: list[tuple[str, str, int]], cells_dir: Path, key: dict[str, Any],
               progress: Any) -> tuple[list[dict[str, Any]], int]:
    """The uncached cells through :func:`signalprop.sweep.run_tasks` on Ray (progress per finished cell)."""
    from ..sweep import run_tasks

    found: dict[tuple[str, str, int], dict[str, Any]] = {}
    for act, init, depth in todo:
        path = cells_dir / f"{act}-{init}-d{depth}.json"
        cached = json.loads(path.read_text()) if path.exists() else {}
        if cached.get("key") == key:
            found[(act, init, depth)] = cached["cell"]
    rest = [t for t in todo if t not in found]
    rows = run_tasks(_cell_task, [(cfg, *t) for t in rest], use_ray=True, ray_address=cfg.ray_address or None,
                     progress=progress, description="depth sweep cells", threads=cfg.threads or None)
    for (act, init, depth), cell in zip(rest, rows):
        (cells_dir / f"{act}-{init}-d{depth}.json").write_text(json.dumps(_clean({"key": key, "cell": cell})))
        found[(act, init, depth)] = cell
    return [found[t] for t in todo], len(todo) - len(rest)


def _finish(cfg: DepthConfig, out: Path, data: Split, got: tuple[list[dict[str, Any]], int],
            progress: Any) -> dict[str, Any]:
    cells, cached_cells = got
    cells_dir = out / "cells"
    key = _key(cfg)
    residual: list[dict[str, Any]] = []
    if cfg.residual_blocks:
        path = cells_dir / f"residual-b{cfg.residual_blocks}.json"
        rkey = {**key, "residual": json.loads(json.dumps([cfg.residual_blocks, cfg.residual_steps,
                                                            cfg.residual_lrs]))}
        cached = json.loads(path.read_text()) if path.exists() else {}
        if cached.get("key") == rkey:
            residual = cached["cells"]
        else:
            residual = _residual_cells(cfg, data, progress)
            path.write_text(json.dumps(_clean({"key": rkey, "cells": residual})))
    chance = 1.0 / data.n_classes
    headline = [f"{c['act']:<8} {c['init']:<15} depth {c['depth']:>5}: test {c['test_acc']:.1%} "
                f"(lr {c['best_lr']:.2g}), grad ratio at init {_g(c['grad_ratio'])}" for c in cells]
    headline += [f"residual MLP, {r['model']}, {r['residual']}: test {r['test_acc']:.1%}" for r in residual]
    from ..report.figures import plot_depth_sweep

    plot_depth_sweep(cells, out / "depth.png", chance)
    return {"data": f"{data.source}: {len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} test, "
                    f"split seed {data.seed}",
            "chance": chance, "cells": cells, "cached_cells": cached_cells, "residual": residual,
            "headline": headline,
            "figure": "depth.png"}


def _g(v: Any) -> str:
    """Format a ratio; cached cells store non-finite floats as strings ("inf")."""
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.3g}" if math.isfinite(v) else str(v)


register(Experiment("depth", "plain MLPs 10 to 10,000 layers deep on digits: which initialization trains "
                    "(test accuracy, gradient ratio at init)", DepthConfig, run_depth, QUICK))
