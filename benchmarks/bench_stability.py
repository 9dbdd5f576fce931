"""When does a diverging run become unstable?  The curvature behind early warning.

A learning rate past the stable one diverges because the iteration stops
contracting along the sharpest direction of the loss: for SGD with heavy-ball
momentum ``beta`` on a quadratic of curvature ``lam`` the iterates grow once
``lr * lam > 2 (1 + beta)`` (3.8 at beta = 0.9).  While a run stays below that
bound every direction contracts, and a rule that reacts to what the run does
(loss, gradients, updates, weights) has no instability to react to; a lead
longer than the time since the run became unstable needs a forecast (the
warm-up will raise the rate, the curvature will sharpen).

For every run of the early-warning benchmark's divergence grid
(``ew_grid.divergence``: the same models, batches, rates and schedules), this
script trains the run unmonitored and, at each step, estimates the largest
eigenvalue of the Hessian of that step's batch loss (Lanczos, scipy's
``eigsh``, on Hessian-vector products by central differences of the gradient;
the weights are put back bit for bit, so the trajectory is the plain run's;
the low-rate runs are read every 10th step).  Two readings per diverged run:

* the **first crossing** of the bound;
* the **onset**: the first step from which ``lr * lam`` stays past the bound
  until the loss turns non-finite.  Networks at the edge of stability (Cohen
  et al. 2021) hover at the bound for tens of steps and come back below it --
  the transformers here do, as do runs that never diverge -- so the first
  crossing says when the edge was reached, the onset when the run left it.

Per family: diverged runs whose crossing / onset comes >= 10 steps before the
first non-finite loss, the largest ``lr * lam`` of the healthy runs, and,
where ``docs/results/bench_early_warning-cpu.json`` holds the same run (same
spec, non-finite at the same step), signalprop's first alert and lead on it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from _util import write
from ew_grid import Case, divergence
from signalprop.lab.run_models import build
from signalprop.lab.training_runs import RunSpec, _optimizer

MOMENTUM = 0.9
BOUND = 2 * (1 + MOMENTUM)  # heavy-ball SGD's stability bound on lr * lambda_max
TOL, NCV = 0.05, 8  # Lanczos: 5% relative tolerance, 8 basis vectors (9-20 products a step)
HEALTHY_EVERY = 10  # the low-rate runs' curvature is read every 10th step (they run 300 steps)
LEAD = 10
EW_JSON = Path(__file__).resolve().parents[1] / "docs" / "results" / "bench_early_warning-cpu.json"


def _loss(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    out = model(xb)
    return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), yb.reshape(-1))


def _grads(model: torch.nn.Module, params: Sequence[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(_loss(model, xb, yb), params))


def _sharpness(model: torch.nn.Module, params: Sequence[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
               v0: np.ndarray | None) -> tuple[float, np.ndarray | None]:
    """The largest eigenvalue of the batch loss's Hessian (Lanczos, scipy's
    ``eigsh``, relative tolerance ``TOL``, started from ``v0``); Hessian-vector
    products by central differences of the gradient, in float64 arithmetic on
    the float32 weights, which are put back bit for bit afterwards."""
    saved = [p.detach().clone() for p in params]
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    eps = 1e-3 * max(math.sqrt(sum(float(p.double().pow(2).sum()) for p in saved)), 1.0)

    def hvp(x: np.ndarray) -> np.ndarray:
        parts = torch.split(torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1)), sizes)
        grads = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, s, d in zip(params, saved, parts):
                    p.copy_(s.double() + sign * eps * d.reshape(s.shape))
            grads.append(_grads(model, params, xb, yb))
        out = torch.cat([(a.double() - b.double()).reshape(-1) for a, b in zip(*grads)]) / (2 * eps)
        if not bool(out.isfinite().all()):
            raise ValueError("non-finite Hessian-vector product")
        return out.numpy()

    try:
        vals, vecs = eigsh(LinearOperator((n, n), matvec=hvp, dtype=np.float64), k=1, which="LA", tol=TOL,
                           ncv=NCV, v0=v0)
        lam, vec = float(vals[0]), vecs[:, 0]
    except (ArpackNoConvergence, ValueError, RuntimeError):
        lam, vec = float("nan"), None  # non-finite gradients on the way to divergence
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return lam, vec if vec is not None and np.isfinite(vec).all() else None


def run(spec: RunSpec, every: int = 1) -> dict[str, Any]:
    """One run of the grid, unmonitored, with each step's ``lr * lambda_max``."""
    model, batch = build(spec.kind, spec.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(spec, params)
    g = torch.Generator().manual_seed(1000 + spec.seed)  # the batches of lab.training_runs.run
    v: np.ndarray | None = np.random.default_rng(7).standard_normal(sum(p.numel() for p in params))
    losses: list[float] = []
    ratio: list[float | None] = []
    first_bad = None
    for step in range(spec.steps):
        lr = spec.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        xb, yb = batch(g)
        lam = float("nan")
        if step % every == 0:
            lam, v = _sharpness(model, params, xb, yb, v)
        loss = _loss(model, xb, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        ratio.append(lr * lam if math.isfinite(lam) else None)
        if not math.isfinite(losses[-1]):
            first_bad = step
            break
    crossing, onset = crossings(ratio, every) if first_bad is not None else (None, None)
    return {"losses": losses, "first_nonfinite": first_bad, "crossing": crossing, "onset": onset,
            "lead": first_bad - crossing if first_bad is not None and crossing is not None else None,
            "onset_lead": first_bad - onset if first_bad is not None and onset is not None else None,
            "max_lr_lambda": max((r for r in ratio if r is not None), default=None),
            "lr_lambda": [round(r, 3) if r is not None else None for r in ratio]}


def crossings(ratio: Sequence[float | None], every: int = 1) -> tuple[int | None, int | None]:
    """The first step past the bound, and the onset of the last unstable stretch:
    the first step from which every read stays past the bound up to the end of
    the series.  Steps are read every ``every``-th (others are not looked at);
    a read that failed -- non-finite gradients on the way to divergence --
    counts as past the bound.  Runs at the edge of stability hover at the
    bound for tens of steps and come back below it (self-stabilisation):
    there the first crossing says when the edge was reached, the onset when
    the run left it for good."""
    read = range(0, len(ratio), every)
    first = next((t for t in read if (r := ratio[t]) is not None and r > BOUND), None)
    onset = None
    for t in reversed(read):
        r = ratio[t]
        if r is not None and r <= BOUND:
            break
        onset = t
    return first, onset


def _signalprop_alerts() -> dict[str, Any]:
    """signalprop's first alert per held-out divergence run, keyed by spec, from
    the early-warning benchmark's recorded results (if present)."""
    if not EW_JSON.exists():
        return {}
    runs = json.loads(EW_JSON.read_text())["runs"]
    return {json.dumps(r["spec"], sort_keys=True): r for r in runs}


def _count(rows: Sequence[dict[str, Any]], key: str) -> int:
    return sum(1 for r in rows if r.get(key) is not None and r[key] >= LEAD)


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per family and over all: diverged runs whose first crossing / unstable
    onset comes >= LEAD steps before the first non-finite loss, signalprop's
    count on the same runs (where the recorded run is the same trajectory),
    and how many of the runs whose onset leads by LEAD signalprop warned."""
    out: dict[str, Any] = {}
    for fam in [*sorted({r["family"] for r in rows}), "all"]:
        rs = [r for r in rows if fam in ("all", r["family"])]
        div = [r for r in rs if r["first_nonfinite"] is not None]
        healthy = [r for r in rs if r["first_nonfinite"] is None and r["intent"] == "low"]
        sp = [{"lead": r["signalprop"]["lead"]} for r in div if r.get("signalprop") is not None]
        out[fam] = {
            "diverged": len(div),
            "crossed_10_ahead": _count(div, "lead"),
            "onset_10_ahead": _count(div, "onset_lead"),
            "share_onset_10_ahead": _count(div, "onset_lead") / len(div) if div else None,
            "median_onset_lead": statistics.median(r["onset_lead"] or 0 for r in div) if div else None,
            "healthy": len(healthy),
            "healthy_max_lr_lambda": max((r["max_lr_lambda"] or 0 for r in healthy), default=None),
            "signalprop_runs_matched": len(sp),
            "signalprop_warned_10_ahead": _count(sp, "lead"),
            "signalprop_warned_10_ahead_where_onset_10_ahead": sum(
                1 for r in div if r.get("signalprop") is not None and (r["onset_lead"] or 0) >= LEAD
                and (r["signalprop"]["lead"] or 0) >= LEAD),
        }
    return out


def _one(case: Case) -> dict[str, Any]:
    torch.set_num_threads(1)
    r = run(case.spec, 1 if case.intent == "high" else HEALTHY_EVERY)
    del r["losses"]
    return {"family": case.family, "intent": case.intent, "spec": case.spec.__dict__, **r}


def measure(cases: Sequence[Case], jobs: int = 1, progress: bool = False) -> list[dict[str, Any]]:
    """Every case, ``jobs`` at a time (one process and one thread each)."""
    recorded = _signalprop_alerts()
    t0 = time.perf_counter()
    rows = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for row in pool.map(_one, cases):
            ew = recorded.get(json.dumps(row["spec"], sort_keys=True))
            # the recorded run is the same trajectory only where it turned non-finite at the same step
            if ew is not None and row["first_nonfinite"] is not None and ew["first_nonfinite"] == row["first_nonfinite"]:
                first = ew["alerts"].get("signalprop")
                row["signalprop"] = {"first_alert": first,
                                     "lead": row["first_nonfinite"] - first[0] if first else None}
            rows.append(row)
            if progress:
                s = row["spec"]
                print(f"{row['family']:12s} {s['kind']:12s} lr {s['lr']:<5g} warm-up {s['warmup']:<4d} seed {s['seed']:<3d} "
                      f"non-finite {row['first_nonfinite']} crossing {row['crossing']} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def main(out: Path, repeat: int = 5, split: str = "held-out", families: Sequence[str] | None = None,
         jobs: int | None = None, progress: bool = False) -> dict[str, Any]:
    del repeat  # one pass over the grid; the runs are deterministic on one machine
    cases = [c for c in divergence(split) if families is None or c.family in families]
    rows = measure(cases, jobs or os.cpu_count() or 1, progress)
    result: dict[str, Any] = {"bound": f"lr * lambda_max > 2 (1 + momentum) = {BOUND:g}", "lead_steps": LEAD, "split": split,
              "lanczos": {"tol": TOL, "ncv": NCV, "healthy_runs_read_every": HEALTHY_EVERY},
              "summary": summarise(rows), "runs": rows}
    write(out, "bench_stability", result)
    return result["summary"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--split", choices=("held-out", "tuned"), default="held-out")
    ap.add_argument("--families", nargs="*", default=None, help="plain, residual, transformer (default: all)")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: one per CPU core)")
    args = ap.parse_args()
    print(json.dumps(main(args.out, split=args.split, families=args.families, jobs=args.jobs, progress=True), indent=1))
