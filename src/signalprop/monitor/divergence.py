"""Early warning of divergence from the per-step loss and gradient-norm series.

Pure functions of the values the monitor read: no state, nothing measured
here.  Each takes the series before the current step and the current value.

**The mechanism.**  Past the stable learning rate (for SGD with momentum
``beta``: once ``lr * sharpness > 2 (1 + beta)``; with a warm-up, once the
rising rate crosses it) the component of the weights along the sharpest
direction grows by a fixed factor per step.  What a monitor sees first is
not that geometric growth -- it is too small to see against the batch
noise until a few steps before the loss overflows -- but its first
consequence: the run *un-learns*.  For several steps in a row the loss
climbs back most of the way to where training started (a catapult, Lewkowycz
et al. 2020); the run may partly recover, and then blows up.  Measured on
real runs (``benchmarks/bench_early_warning.py``, 84 tuned runs of a ReLU MLP,
a residual MLP and a character transformer under SGD with and without
warm-ups): that first episode comes 10-40 steps before the first non-finite
loss in the MLPs; a healthy run's hard batch or catapult gives back at most
64% of its progress (median of 3 steps), a diverging one 70% or more.

**Why no gradient-norm rule.**  The gradient norm is a poorer early signal:
late in a healthy run it swings 100x between batches (a batch the model fits
already has a gradient near zero), so a ratio to its trailing median (the
previous rule) alerted on 4 of 32 healthy tuned runs, and its geometric
growth shows only in the last few steps.  A sustained version (median of 3
readings >= 3x the trailing median and >= 4x where training started) added
no warning >= 10 steps ahead on the tuned runs, and on the held-out ones
its extra warnings came from the same early rise that alarmed 4 of 12
healthy runs: a CNN or a deep MLP whose gradients start small and grow as
it begins to learn.  The gradient norm stays in the series (and the
non-finite watch); no rule judges it.

**What bounds the lead.**  A run diverges at a learning rate; the first
un-learning happens at about two thirds of it.  With a warm-up that raises
the rate by ``d`` per step, the lead is about ``lr_diverge / (3 d)`` steps:
a warm-up fast enough to cross that third in under 10 steps cannot be
warned 10 steps ahead from the loss, nor from the gradient norm, which rises
later (the character transformer here un-learns only 5-8 steps before its
loss overflows).

The thresholds and why:

* ``SMOOTH = 3``: the loss level is the median of the last 3 steps, so one
  bad batch (a corrupted batch, a hard one) moves it not at all; two in a
  row do.
* ``UNLEARN = 0.7``: the level has given back 70% of the progress from the
  starting loss (median of the first ``WARMUP`` steps) to the best level of
  the last ``LEARNED_WINDOW = 256`` steps.  Healthy runs measured up to 64%
  (a residual MLP at the edge of its stable rate), diverging ones crossed
  70% a median 13 steps before their loss overflowed.  Relative to the
  progress, not the loss, so the same share fits a loss that fell from 2.3
  to 1e-3 and one that fell from 4.6 to 2.
* ``RISE = 1.5``: and the level is at least 1.5x the median of the
  ``WINDOW = 32`` losses before it -- a rise out of the run's own recent
  range.  Without it, a loss still falling slowly under large batch noise
  (synthetic: 30-50% per batch, a 20-40 step decay) trips the share in its
  first 30 steps, when the best level is one lucky batch; with it, 2 of 240
  such series did, and 3 of the 49 tuned divergences lost their warning.
* ``PROGRESS = 0.2``: the rule speaks only once the run has learned, i.e. the
  best level is at least 20% below the start: before that, "giving back
  progress" is noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

WARMUP = 16  # steps that set the starting level; no rule speaks before them
WINDOW = 32  # the recent losses the level must rise out of
SMOOTH = 3
UNLEARN = 0.7
PROGRESS = 0.2
LEARNED_WINDOW = 256
RISE = 1.5


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that were read and are finite, in order (steps that skipped
    the reading hold None)."""
    return [v for v in values if v is not None and math.isfinite(v)]


def start_level(values: Sequence[float | None]) -> float | None:
    """Median of the first ``WARMUP`` finite values: the level training started at."""
    head: list[float] = []
    for v in values:
        if v is not None and math.isfinite(v):
            head.append(v)
            if len(head) == WARMUP:
                return statistics.median(head)
    return None


def _median3(a: float, b: float, c: float) -> float:
    return a + b + c - max(a, b, c) - min(a, b, c)


@dataclass(frozen=True)
class Unlearning:
    """How much of its progress the run has given back: ``share`` =
    (``level`` - ``best``) / (``start`` - ``best``)."""

    share: float
    level: float  # median of the last SMOOTH losses, the current one included
    best: float  # lowest such level over the last LEARNED_WINDOW steps
    start: float  # median of the first WARMUP losses
    trailing: float  # median of the WINDOW losses before the current one

    @property
    def alarming(self) -> bool:
        """Given back ``UNLEARN`` of the progress, and risen out of the run's recent range."""
        return self.share >= UNLEARN and self.level >= RISE * self.trailing


def unlearning(losses: Sequence[float | None], loss: float) -> Unlearning | None:
    """The share of the progress given back at the step whose loss is
    ``loss`` (``losses``: the steps before it); None until the run has
    ``WARMUP`` losses and has learned ``PROGRESS`` of its starting loss.
    The best level is the lowest over the last ``LEARNED_WINDOW`` steps from
    the ``WARMUP``-th on (the first steps are the start, not progress)."""
    start = start_level(losses)
    if start is None or not math.isfinite(loss):
        return None
    # the levels at the WARMUP-th loss and after: counted from the first loss while the series is
    # shorter than the window, and the whole window once it is longer
    recent = last_finite(losses, LEARNED_WINDOW + WARMUP - 1) + [loss]
    levels = [_median3(recent[i - 2], recent[i - 1], recent[i]) for i in range(WARMUP - 1, len(recent))]
    level, best = levels[-1], min(levels)
    progress = start - best
    if not progress >= PROGRESS * abs(start) or progress <= 0:
        return None
    trailing = statistics.median(recent[-(WINDOW + 1):-1])
    return Unlearning((level - best) / progress, level, best, start, trailing)


def last_finite(values: Sequence[float | None], n: int) -> list[float]:
    """The last ``n`` finite values, in order (fewer when there are fewer)."""
    out: list[float] = []
    for v in reversed(values):
        if v is not None and math.isfinite(v):
            out.append(v)
            if len(out) == n:
                break
    return out[::-1]
