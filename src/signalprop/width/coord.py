"""``sp.coord_check``: the muP coordinate check, with a verdict per layer."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from ..sweep import run_tasks
from . import judge
from .measure import Cell, Task, cross_entropy, run_cell
from .records import CoordCheck, CoordLayer, CoordSeries, Statistic


def coord_check(make_model: Callable[[int], nn.Module], widths: Sequence[int], data: Any,
                make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], *, steps: int = 3,
                seeds: int | Sequence[int] = 3, statistic: Statistic = "l1",
                loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, name: str | None = None,
                use_ray: bool = False, ray_address: str | None = None, threads: int | None = None,
                progress: Any = None) -> CoordCheck:
    """Build the model at each width, train it ``steps`` steps, and fit how
    every layer's scale depends on width.

    ``make_model(width)`` returns a fresh model; it is called under
    ``torch.manual_seed(seed)`` for each seed in ``seeds`` (an int ``k``
    means ``range(k)``), with the global generator restored after.
    ``data`` is an ``(inputs, targets)`` pair used at every step (as mup's
    coord check), or a list of pairs cycled over the steps; ``inputs`` is a
    tensor, a tuple of positional arguments or a dict of keyword arguments.
    ``make_optimizer(model)`` returns its optimizer (``torch.optim.Adam`` for
    SP, ``mup.MuAdam`` for muP).  ``loss_fn(output, targets)`` defaults to
    cross-entropy over the output's last dimension.

    Readings (see :mod:`signalprop.width.measure`): every module's output
    (``statistic``: ``"l1"``, the mean |x| per coordinate as mup records it,
    or ``"rms"``), the change of each module's output made by its own
    parameter update, the model's output logits and the attention logits of
    ``F.scaled_dot_product_attention``, at initialization (step 0) and after
    each step.  Each is fitted as a power of the width; the verdicts and
    thresholds are in :mod:`signalprop.width.judge`.  The (width, seed)
    cells are independent tasks, run here or on Ray (``use_ray`` /
    ``ray_address``, ``threads`` per task: :func:`signalprop.sweep.run_tasks`).
    """
    widths_t, seeds_t = _check_args(widths, seeds, steps, statistic, data)
    t0 = time.perf_counter()
    tasks = [Task(make_model, w, s, data, make_optimizer, steps, statistic, loss_fn or cross_entropy)
             for s in seeds_t for w in widths_t]
    cells = run_tasks(run_cell, tasks, use_ray=use_ray, ray_address=ray_address, progress=progress,
                      description="coordinate check", threads=threads)
    return summarize(cells, widths_t, seeds_t, steps, statistic, name or _model_name(make_model),
                     time.perf_counter() - t0)


def _check_args(widths: Sequence[int], seeds: int | Sequence[int], steps: int, statistic: str,
                data: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if statistic not in get_args(Statistic):
        raise ValueError(f"statistic={statistic!r} is not one of {list(get_args(Statistic))}")
    try:
        ws = tuple(sorted({int(w) for w in widths}))
    except (TypeError, ValueError):
        raise ValueError(f"widths must be whole numbers, got {widths!r}") from None
    if len(ws) < 2 or ws[0] < 1 or any(isinstance(w, bool) or int(w) != w for w in widths):
        raise ValueError(f"widths must be at least two different positive whole numbers, got {widths!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive whole number, got {steps!r}")
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be a count or a list of whole numbers, got {seeds!r}")
    ss = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    if not ss or len(set(ss)) != len(ss):
        raise ValueError(f"seeds must be a positive count or distinct whole numbers, got {seeds!r}")
    batches = data if isinstance(data, list) else [data]
    if not batches or not all(isinstance(b, tuple) and len(b) == 2 for b in batches):
        raise ValueError("data must be an (inputs, targets) pair or a list of such pairs")
    return ws, ss


def _model_name(make_model: Any) -> str:
    return getattr(make_model, "__qualname__", None) or type(make_model).__name__


def summarize(cells: Sequence[Cell], widths: tuple[int, ...], seeds: tuple[int, ...], steps: int,
              statistic: Statistic, model: str, seconds: float = math.nan) -> CoordCheck:
    """Cells (one per width and seed) -> the fitted series and the verdicts."""
    by = {(c.width, c.seed): c for c in cells}
    keys = _common_keys(cells)
    notes = []
    dropped = sorted({k for c in cells for k in c.values} - set(keys))
    if dropped:
        notes.append(f"{len(dropped)} reading(s) not present at every width left out, e.g. "
                     f"{dropped[0][0] or '(output)'} / {dropped[0][1]}")
    ref, wide = by[(widths[0], seeds[0])], by[(widths[-1], seeds[0])]
    optimizer = ref.optimizer
    series, layers = [], []
    for name, role in keys:
        vals = np.array([[by[(w, s)].values[(name, role)] for w in widths] for s in seeds])  # seed, width, t
        fits = [judge.fit_slope(widths, vals[:, :, t]) for t in range(steps + 1)]
        for t, (b, se, _) in enumerate(fits):
            series.append(CoordSeries(name, role, t, widths, seeds,  # type: ignore[arg-type]
                                      tuple(tuple(float(v) for v in vals[i, :, t]) for i in range(len(seeds))),
                                      b, se))
        where = judge.position(ref.fans.get(name), wide.fans.get(name))
        kind = "scaled_dot_product_attention" if role == "attention" else ref.kinds.get(name, "?")
        layers.append(_verdict(name, role, kind, where, fits, vals, widths, statistic, optimizer))
    verdicts = {x.verdict for x in layers}
    overall = "grows" if "grows" in verdicts else "shrinks" if "shrinks" in verdicts else "width-stable"
    return CoordCheck(overall, tuple(layers), tuple(series), widths, seeds, steps, statistic,  # type: ignore[arg-type]
                      optimizer, model, judge.describe(widths, statistic), tuple(notes), seconds)


def _common_keys(cells: Sequence[Cell]) -> list[tuple[str, str]]:
    """(name, role) read at every width and seed, in first-forward order."""
    first = list(cells[0].values)
    return [k for k in first if all(k in c.values for c in cells)]


def _verdict(name: str, role: str, kind: str, where: str, fits: list[tuple[float, float, int]],
             vals: np.ndarray, widths: tuple[int, ...], statistic: str, optimizer: str) -> CoordLayer:
    slopes = tuple(f[0] for f in fits)
    ses = tuple(f[1] for f in fits)
    steps = len(fits) - 1
    blown = [t for t in range(steps + 1) if np.any(np.isinf(vals[:, :, t])) or
             (np.any(np.isnan(vals[:, :, t])) and not np.all(np.isnan(vals[:, :, t])))]
    grows = [t for t in range(steps + 1) if judge.direction(slopes[t], ses[t]) > 0]
    last = max((t for t in range(steps + 1) if math.isfinite(slopes[t])), default=steps)
    sign, step = 0, last
    if blown:  # an overflow or NaN at some widths only: it blew up on the way
        sign, step = 1, blown[0]
    elif grows:
        sign, step = 1, max(grows, key=lambda t: slopes[t])
    elif judge.direction(slopes[last], ses[last]) < 0:
        sign = -1
    verdict = {1: "grows", -1: "shrinks", 0: "width-stable"}[sign]
    slope, se = slopes[step], ses[step]
    if blown:
        bad = [w for j, w in enumerate(widths) if not np.all(np.isfinite(vals[:, j, step]))]
        msg = (f"{name or 'the model output'}: {role} non-finite at width {bad[0]} and above after "
               f"{step} step(s): it blew up")
        fix = judge.fix_for(role, 1, where, optimizer, step == 0)
    elif sign:
        msg = judge.message(name, role, where, sign, slope, se, step, widths, statistic)
        fix = judge.fix_for(role, sign, where, optimizer, step == 0)
    else:
        msg = (f"{name or 'the model output'}: {role} width-stable "
               f"(slope {slope:.2f} ± {se:.2f} at step {step})" if math.isfinite(slope) else
               f"{name or 'the model output'}: {role} has no positive scale to fit")
        fix = ""
    return CoordLayer(name, role, kind, where, verdict, slope, se, step, slopes, ses,  # type: ignore[arg-type]
                      judge.leaves_range_at(widths, slope) if sign and not blown else None, msg, fix)


OptimizerName = Literal["sgd", "adam", "adamw", "mu-sgd", "mu-adam", "mu-adamw"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)


def _build_optimizer(name: str, lr: float, model: nn.Module) -> torch.optim.Optimizer:
    if name.startswith("mu-"):
        try:
            import mup
        except ImportError as e:
            raise ImportError(f"optimizer {name!r} needs the mup package: pip install mup") from e
        cls = {"mu-sgd": mup.MuSGD, "mu-adam": mup.MuAdam, "mu-adamw": mup.MuAdamW}[name]
        return cls(model.parameters(), lr=lr)
    plain = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return plain(model.parameters(), lr=lr)


def optimizer(name: OptimizerName, lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """``make_optimizer`` for :func:`coord_check` by name: torch's SGD, Adam,
    AdamW, or mup's MuSGD, MuAdam, MuAdamW (``mu-*``; the model must have
    its base shapes set), at learning rate ``lr``.  Picklable (Ray)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not one of {list(OPTIMIZERS)}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    return functools.partial(_build_optimizer, name, float(lr))
