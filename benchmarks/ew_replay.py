"""signalprop's per-step rules replayed over a recorded run, as the monitor
calls them (the series before the step, the step's own value), and the rules
of the previous version (signalprop before issue 27, commit 1191398) for the
side-by-side: a loss above 3x its trailing median, median + 8 MADs and the
starting loss; a gradient norm above 10x its trailing median and 3x its start.

``grad_every``: the gradient norm is read on every n-th step only, as the
monitor does on a CPU by default (4); the loss is read every step.

The relative update ||dw|| / ||w|` (the ``update-growth`` rule) is replayed
from the run's exact per-step norms (``update_norms``, ``weight_norms``),
shifted by one step as the monitor sees it: at step t it reads the update of
step t - 1 (its own estimate, from sampled entries, is within 1-3% of these).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

from signalprop.monitor.alerts import scalar_alerts

Series = Sequence[float | None]
Rule = Callable[[int, float | None, float | None, Series, Series, float | None, Series], list[str]]


def relative_updates(run: dict) -> list[float | None]:
    """The monitor's relative-update series of a recorded run: at step t,
    ||w_t - w_{t-1}|| / ||w_{t-1}|| (None at step 0 and where not recorded)."""
    u, w = run.get("update_norms") or [], run.get("weight_norms") or []
    ratios = [a / b if a is not None and b else None for a, b in zip(u, w)]
    return [None, *ratios[:-1]] if ratios else []


def _current(step: int, loss: float | None, grad_norm: float | None, losses: Series, grad_norms: Series,
             update: float | None = None, updates: Series = ()) -> list[str]:
    # a batch-spike is one bad batch (what skip= skips), not a warning of divergence: scored apart
    return [a.kind for a in scalar_alerts(step, loss, grad_norm, losses, grad_norms, None, update, updates)
            if a.kind != "batch-spike"]


def _previous(step: int, loss: float | None, grad_norm: float | None, losses: Series, grad_norms: Series,
              update: float | None = None, updates: Series = ()) -> list[str]:
    window, warmup = 32, 16

    def trailing(v: Series) -> list[float]:
        return [x for x in v if x is not None and math.isfinite(x)][-window:]

    def start(v: Series) -> float | None:
        f = [x for x in v if x is not None and math.isfinite(x)][:warmup]
        return statistics.median(f) if f else None

    out = []
    gn, sg = trailing(grad_norms), start(grad_norms)
    if grad_norm is not None and len(gn) >= warmup and sg is not None:
        med = statistics.median(gn)
        if med > 0 and grad_norm > 10 * med and grad_norm > 3 * sg:
            out.append("grad-surge")
    ls, sl = trailing(losses), start(losses)
    if loss is not None and len(ls) >= warmup and sl is not None:
        med = statistics.median(ls)
        mad = statistics.median(abs(v - med) for v in ls) * 1.4826
        if loss > 3 * abs(med) and loss > med + 8 * mad and loss > sl:
            out.append("loss-spike")
    return out


RULES: dict[str, Rule] = {"current": _current, "previous": _previous}


def first_alert(losses: Series, grad_norms: Series, *, grad_every: int = 1, rules: str = "current",
                until: int | None = None, updates: Series = ()) -> tuple[int, str] | None:
    """(step, kind) of the first per-step alert over the recorded series (up to
    ``until``, excluded), or None.  ``updates``: the relative-update series
    (:func:`relative_updates`; empty: that rule is not replayed)."""
    rule = RULES[rules]
    gn: list[float | None] = [g if t % grad_every == 0 else None for t, g in enumerate(grad_norms)]
    n = len(losses) if until is None else min(until, len(losses))
    rel: list[float | None] = list(updates)[:len(losses)]
    for t in range(n):
        loss = losses[t]
        if loss is None:
            continue
        g = gn[t] if t < len(gn) else None
        u = rel[t] if t < len(rel) else None
        kinds = rule(t, loss, g, losses[:t], gn[:t], u, rel[:t] if rel else [])
        if kinds:
            return t, kinds[0]
    return None
