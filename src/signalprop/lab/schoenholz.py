"""``signalprop lab run schoenholz2017``: trainable depth against sigma_w^2, beside 6 xi_c.

Schoenholz, Gilmer, Ganguli & Sohl-Dickstein (2017), "Deep Information
Propagation", figures 5-6: plain tanh networks with weights N(0, sigma_w^2 /
fan_in) and biases N(0, sigma_b^2), sigma_b^2 = 0.05, train only while their
depth stays below about 6 xi_c, where xi_c is the correlation depth scale of
mean-field theory (infinite at the critical sigma_w^2 ~ 1.76); "networks are
trainable when L < 6 xi_c" (their section 5).  Here on scikit-learn's digits:
each (sigma_w^2, depth) cell trains with Adam at a learning rate ~ 1/depth from
its seed (their SGD ran for far more steps than a laptop grid affords), a cell counts as
trained when its test accuracy reaches ``trained_acc``, and the trainable
depth of a sigma_w^2 is the deepest trained depth of the grid; the theory
line is :func:`signalprop.theory.depth_scales`.

Cells are independent tasks (:func:`signalprop.sweep.run_tasks`): serial by
default, on Ray with ``--set use_ray=true`` (a local ``ray.init()``) or
``--set ray_address=ADDR``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..sweep import run_tasks
from .registry import Experiment, register


@dataclass(frozen=True)
class SchoenholzConfig:
    act: str = "tanh"
    sigma_b2: float = 0.05  # theirs
    sigma_w2s: tuple[float, ...] = (1.0, 1.25, 1.5, 1.76, 2.0, 2.5, 3.0, 4.0)  # theirs: 1 to 4
    depths: tuple[int, ...] = (8, 12, 16, 24, 32, 48, 64, 96)
    width: int = 64
    steps: int = 400  # training steps per cell
    lr_scale: float = 0.015  # learning rate lr_scale / depth (Saxe et al. 2014: ~1/depth near isometry)
    optimizer: str = "adam"  # or "sgd" (with momentum)
    momentum: float = 0.9  # SGD only
    batch: int = 64
    trained_acc: float = 0.5  # "trained": test accuracy at least this (chance: 0.1)
    seed: int = 0  # data split, weights and minibatches of every cell
    use_ray: bool = False  # run the cells as Ray tasks (local ray.init())
    ray_address: str = ""  # or on this Ray cluster
    threads: int = 1  # torch threads inside each cell, serial or on Ray (the same count: the same results)


QUICK = {"sigma_w2s": (1.0, 1.76, 4.0), "depths": (8, 48), "steps": 250}


@dataclass(frozen=True)
class Cell:
    """One (sigma_w^2, depth) training run: everything a worker needs."""

    act: str
    sigma_w2: float
    sigma_b2: float
    depth: int
    width: int
    steps: int
    lr: float
    momentum: float
    optimizer: str
    batch: int
    seed: int


def train_cell(cell: Cell) -> dict[str, Any]:
    """Build, initialize (weights N(0, sigma_w^2/fan_in), biases N(0, sigma_b^2),
    from ``cell.seed``) and train one network; its test accuracy."""
    from .. import init as spi
    from .datasets import digits
    from .models import DeepMLP
    from .train import train

    data = digits(cell.seed)
    g = torch.Generator().manual_seed(cell.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cell.seed)
        model = DeepMLP(cell.depth, cell.width, cell.act, data.n_features, data.n_classes)
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.Linear):
                spi.variance_scaling_(m.weight, scale=cell.sigma_w2, mode="fan_in", distribution="normal",
                                      generator=g)
                m.bias.normal_(0.0, math.sqrt(cell.sigma_b2), generator=g)
    t0 = time.perf_counter()
    res = train(model, data, steps=cell.steps, lr=cell.lr, momentum=cell.momentum, batch=cell.batch,
                seed=cell.seed, optimizer=cell.optimizer)
    return {"sigma_w2": cell.sigma_w2, "depth": cell.depth, "test_acc": res.test_acc, "val_acc": res.val_acc,
            "diverged": res.diverged, "final_loss": res.losses[-1] if res.losses else None,
            "seconds": time.perf_counter() - t0}


def cells(cfg: SchoenholzConfig) -> list[Cell]:
    return [Cell(cfg.act, w, cfg.sigma_b2, d, cfg.width, cfg.steps, cfg.lr_scale / d, cfg.momentum, cfg.optimizer,
                 cfg.batch, cfg.seed) for w in cfg.sigma_w2s for d in cfg.depths]


def trainable_depths(cfg: SchoenholzConfig, rows: list[dict[str, Any]]) -> dict[float, int | None]:
    """Per sigma_w^2, the deepest depth of the grid that trained (None: not even the shallowest)."""
    out: dict[float, int | None] = {}
    for w in cfg.sigma_w2s:
        ok = [r["depth"] for r in rows if r["sigma_w2"] == w and r["test_acc"] >= cfg.trained_acc]
        out[w] = max(ok) if ok else None
    return out


def run_schoenholz(cfg: SchoenholzConfig, out: Path, progress: Any = None) -> dict[str, Any]:
    from ..theory import critical_sigma_w2, depth_scales

    t0 = time.perf_counter()
    rows = run_tasks(train_cell, cells(cfg), use_ray=cfg.use_ray, ray_address=cfg.ray_address or None,
                     progress=progress, description="schoenholz2017 cells", threads=cfg.threads or None)
    wall = time.perf_counter() - t0
    xi_c = {w: float(depth_scales(cfg.act, w, cfg.sigma_b2)[1]) for w in cfg.sigma_w2s}
    trainable = trainable_depths(cfg, rows)
    crit = float(critical_sigma_w2(cfg.act, cfg.sigma_b2))
    from ..report.trainability import plot_trainable_depth

    plot_trainable_depth(cfg, rows, crit, out / "schoenholz2017.png")
    paper = ("Schoenholz et al. (2017): random tanh networks (sigma_b^2 = 0.05) are trainable when their depth "
             "is below about 6 xi_c, xi_c the correlation depth scale, which diverges at the critical "
             f"sigma_w^2 (here {crit:.3f})")
    headline = [paper] + [
        f"sigma_w^2 = {w:<5g} 6 xi_c = {6 * xi_c[w]:>8.1f}   trainable depth here: "
        f"{'none of the grid' if trainable[w] is None else trainable[w]}" for w in cfg.sigma_w2s]
    headline.append(f"{len(rows)} cells in {wall:.1f} s ({'Ray' if cfg.use_ray or cfg.ray_address else 'serial'})")
    return {"paper": paper, "config": asdict(cfg), "critical_sigma_w2": crit, "cells": rows,
            "xi_c": {str(w): v for w, v in xi_c.items()},
            "trainable_depth": {str(w): d for w, d in trainable.items()},
            "wall_seconds": wall, "headline": headline, "figure": "schoenholz2017.png",
            "table": {"columns": ["sigma_w^2", "6 xi_c"] + [f"depth {d}" for d in cfg.depths],
                      "rows": [[f"{w:g}", f"{6 * xi_c[w]:.1f}"] +
                               [f"{r['test_acc']:.0%}" for d in cfg.depths for r in rows
                                if r["sigma_w2"] == w and r["depth"] == d] for w in cfg.sigma_w2s]}}


def accuracy_grid(cfg: SchoenholzConfig, rows: list[dict[str, Any]]) -> np.ndarray:
    """Test accuracy as [depth, sigma_w2]."""
    grid = np.full((len(cfg.depths), len(cfg.sigma_w2s)), np.nan)
    for r in rows:
        grid[cfg.depths.index(r["depth"]), cfg.sigma_w2s.index(r["sigma_w2"])] = r["test_acc"]
    return grid


register(Experiment("schoenholz2017", "Schoenholz et al. 2017: trainable depth against sigma_w^2 on digits "
                    "(tanh), beside the theory line 6 xi_c", SchoenholzConfig, run_schoenholz, QUICK))
