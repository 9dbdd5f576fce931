"""What bounds the lead: which recorded signal first leaves the healthy range,
and how many steps before the first non-finite loss, per diverged run.

Each signal's threshold is its largest value over the healthy runs of the
tuned grid (a rule that fired there at any point would be a false alarm), so
the lead is the best any rule on that signal alone could reach without a
false alarm on those runs.  Two of the signals are not measured by the
monitor: the update's norm alone (it reads the ratio ||dw|| / ||w|| every
step, estimated from sampled entries: ``monitor.relative_update``) and the
weights' norm growth.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from signalprop.monitor import divergence as D

Signal = Callable[[dict[str, Any]], list[float | None]]


def _level_ratio(values: Sequence[float | None], against_start: bool) -> list[float | None]:
    out: list[float | None] = []
    read: list[float] = []
    for v in values:
        if v is not None:
            read.append(v)
        if v is None or len(read) < D.WARMUP + D.SMOOTH:
            out.append(None)
            continue
        level = statistics.median(read[-D.SMOOTH:])
        ref = statistics.median(read[:D.WARMUP]) if against_start else statistics.median(
            read[-D.SMOOTH - D.WINDOW:-D.SMOOTH])
        out.append(level / ref if ref > 0 else None)
    return out


def _unlearning(run: dict[str, Any]) -> list[float | None]:
    losses = run["losses"]
    out: list[float | None] = []
    for t, v in enumerate(losses):
        u = D.unlearning(losses[:t], v) if v is not None else None
        out.append(u.share if u is not None else None)
    return out


def _update_ratio(run: dict[str, Any]) -> list[float | None]:
    return [u / w if u is not None and w else None for u, w in zip(run["update_norms"], run["weight_norms"])]


def _weight_growth(run: dict[str, Any], m: int = 5) -> list[float | None]:
    w = run["weight_norms"]
    return [w[t] / w[t - m] - 1 if t >= m and w[t] and w[t - m] else None for t in range(len(w))]


SIGNALS: dict[str, Signal] = {
    "loss: share of progress given back": _unlearning,
    "grad norm: level / trailing median": lambda r: _level_ratio(r["grad_norms"], False),
    "grad norm: level / start": lambda r: _level_ratio(r["grad_norms"], True),
    "update norm: level / trailing median (not measured per step)": lambda r: _level_ratio(r["update_norms"], False),
    "||dw|| / ||w|| per step (the monitor's relative update)": _update_ratio,
    "weight norm growth over 5 steps (not measured)": _weight_growth,
}


def limits(runs: list[dict[str, Any]], healthy: list[dict[str, Any]]) -> dict[str, Any]:
    """Per family: for each signal, how many diverged runs it leaves the healthy
    range >= 10 steps ahead of, and the median lead; and the best of all."""
    thresholds = {}
    for name, sig in SIGNALS.items():
        vals = [x for r in healthy for x in sig(r) if x is not None]
        thresholds[name] = max(vals) if vals else None
    out: dict[str, Any] = {"thresholds (largest value on healthy tuned runs)": thresholds}
    for fam in sorted({r["family"] for r in runs}):
        div = [r for r in runs if r["family"] == fam and r["first_nonfinite"] is not None]
        best = [0] * len(div)
        rows = {}
        for name, sig in SIGNALS.items():
            th = thresholds[name]
            leads = []
            for i, r in enumerate(div):
                n = r["first_nonfinite"]
                t = next((t for t, x in enumerate(sig(r)[:n]) if x is not None and th is not None and x > th), None)
                lead = n - t if t is not None else 0
                leads.append(lead)
                best[i] = max(best[i], lead)
            rows[name] = {"warned_10_ahead": sum(1 for x in leads if x >= 10), "median_lead": statistics.median(leads)}
        rows["best of all"] = {"warned_10_ahead": sum(1 for x in best if x >= 10),
                               "median_lead": statistics.median(best) if best else None}
        out[fam] = {"diverged": len(div), "signals": rows}
    return out
