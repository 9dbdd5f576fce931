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
  The ratio reads a loss whose floor is 0 (cross-entropy, a squared
  error); a loss that takes values below 0 (a Gaussian negative
  log-likelihood with a learned variance, an ELBO's bound) has no known
  floor, and a ratio to a median near or below 0 says nothing (a level
  *below* a negative median passed it: a healthy run's flat plateau was
  alarming at every step).  The rise is therefore measured above the floor,
  taken as 0 or the lowest loss in the window where one is lower:
  ``level - trailing >= (RISE - 1) (trailing - floor)``, which is the ratio
  itself for a loss that never went below 0.  Such a loss must also rise
  ``RISE_SIGMAS = 3`` robust standard deviations of the ``WINDOW`` losses
  above their median: where 0 is not its floor, the ratio's guard against
  batch noise (a noisy loss near 0 is far from 1.5x its median) is gone --
  a Gaussian likelihood with a learned variance at batch 8, +-0.3 around
  0.15, gave back "100%" of a progress made of noise three steps in a row
  in 6 places of a healthy 300-step run; with this, in none.
* ``PROGRESS = 0.2``: the rule speaks only once the run has learned, i.e. the
  best level is at least 20% below the start: before that, "giving back
  progress" is noise.
* ``UNLEARN_PERSIST = 3``: all of the above at 3 steps in a row.  On one step
  it alerted healthy runs that catapult: a BatchNorm MLP (width 128) under
  SGD with momentum 0.9 at 0.05-0.2, which trains to 91-93% accuracy, gave
  back 77-125% for a step or two in 10 of 12 runs (an outside check; the
  benchmark's healthy runs, at lower rates, never do); 3 in a row, 2 of 12,
  and none of 4 plain MLPs at 0.2 (2 before).  It costs warnings on the
  benchmark's grid: 35 of its 68 held-out divergences warned >= 10 steps
  ahead instead of 39, 21 of 49 tuned instead of 24 -- a catapult and the
  first episode of a divergence look alike for their first steps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

WARMUP = 16  # steps that set the starting level; no rule speaks before them
WINDOW = 32  # the recent losses the level must rise out of
SMOOTH = 3
UNLEARN = 0.7
PROGRESS = 0.2
LEARNED_WINDOW = 256
RISE = 1.5
RISE_SIGMAS = 3.0
UNLEARN_PERSIST = 3
MAD_TO_SIGMA = 1.4826  # the median absolute deviation of a normal distribution is 0.6745 sigma


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that were read and are finite, in order (steps that skipped
    the reading hold None)."""
    return [v for v in values if v is not None and math.isfinite(v)]


def head_end(values: Sequence[float | None]) -> int:
    """How many leading entries hold the first ``WARMUP`` finite values (the start: a run may begin with gaps)."""
    seen = 0
    for i, v in enumerate(values):
        if v is not None and math.isfinite(v):
            seen += 1
            if seen == WARMUP:
                return i + 1
    return len(values)


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

    floor: float = 0.0  # 0, or the lowest loss of the window where one is below 0 (see _rise_bar)
    sigma: float = 0.0  # the trailing losses' robust standard deviation (read where the floor is below 0)

    @property
    def alarming(self) -> bool:
        """Given back ``UNLEARN`` of the progress, and risen out of the run's recent range."""
        return self.share >= UNLEARN and self.level >= _rise_bar(self.trailing, self.floor, self.sigma)


def _rise_bar(trailing: float, floor: float, sigma: float) -> float:
    """The level a loss must reach to have risen out of its recent range:
    ``RISE`` times above its ``floor`` from the ``trailing`` median -- ``RISE
    * trailing`` for a loss whose floor is 0 (the same arithmetic:
    subtracting 0.0 changes no bit) --, and where the floor is below 0 also
    ``RISE_SIGMAS`` robust standard deviations (``sigma``) above that median."""
    bar = RISE * trailing - (RISE - 1.0) * floor
    return max(bar, trailing + RISE_SIGMAS * sigma) if floor < 0 else bar


def robust_sigma(values: Sequence[float], mid: float) -> float:
    """The robust standard deviation of ``values`` around their median ``mid``: 1.4826 x their median absolute
    deviation."""
    return MAD_TO_SIGMA * statistics.median(abs(v - mid) for v in values)


def unlearned(losses: Sequence[float | None], loss: float) -> Unlearning | None:
    """The step's :func:`unlearning` when it is alarming here and at each of
    the ``UNLEARN_PERSIST - 1`` steps before (for several steps in a row the
    run has given the progress back), else None.  The steps before are
    judged only when this one is alarming."""
    if not _risen(losses, loss):  # (not alarming: most steps end here)
        return None
    u = unlearning(losses, loss)
    if u is None or not u.alarming:
        return None
    seq = [*losses, loss]
    for j in range(2, UNLEARN_PERSIST + 1):
        i = len(seq) - j
        if i < 1 or seq[i] is None:
            return None
        before = unlearning(seq[:i], cast(float, seq[i]))
        if before is None or not before.alarming:
            return None
    return u


def _risen(losses: Sequence[float | None], loss: float) -> bool:
    """Whether the loss's level is ``RISE`` times the median of the
    ``WINDOW`` finite losses before it, or there are too few to tell: the half
    of :attr:`Unlearning.alarming` that the last ``WINDOW`` losses decide, read
    before :func:`unlearning`, whose best level takes the last
    ``LEARNED_WINDOW`` (a quarter of a millisecond of Python at every step).
    The same losses and arithmetic as there: a False here is a False there."""
    if not math.isfinite(loss):
        return False
    recent = last_finite(losses, WINDOW) + [loss]
    if len(recent) < SMOOTH:
        return True
    # (the floor of these WINDOW + 1 losses is at least that of unlearning's longer window, so its bar is at
    # most that one's)
    floor = min(0.0, min(recent))
    trailing = recent[:-1]
    mid = statistics.median(trailing)
    return _median3(recent[-3], recent[-2], recent[-1]) >= _rise_bar(
        mid, floor, robust_sigma(trailing, mid) if floor < 0 else 0.0)


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
    window = recent[-(WINDOW + 1):-1]
    floor = min(0.0, min(recent))
    mid = statistics.median(window)
    return Unlearning((level - best) / progress, level, best, start, mid, floor,
                      robust_sigma(window, mid) if floor < 0 else 0.0)


# -- a loss that grows from the start ------------------------------------------------------------------------
#
# The un-learning rule needs progress to give back; a run that diverges from
# its first steps -- fine-tuning or a resumed run at too high a rate, a rate
# past the stable one from step 0 -- has none, and its loss grows
# geometrically from where it started (an outside check: 0.017 to 4e35 in 20
# steps, 1.5-300x a step, with no warning before the weights were
# non-finite).  The rule: the level (median of ``SMOOTH`` losses) at least
# ``EXPLODE = 10`` times where the run started (the median of its first
# ``WARMUP`` losses, of its first ``SMOOTH`` while it has fewer -- a start
# level that does not climb with the divergence), having grown at least
# ``EXPLODE_STEP = 1.5`` times at each of the last ``SMOOTH`` steps.  A
# healthy run's catapult gives back at most part of its progress (64%
# measured) and never reaches 10x its starting loss; on the benchmark's
# recorded grids (216 runs) it spoke on one run that stayed finite -- a CNN
# whose loss went from 2.3 to 60 and ended at chance -- and on 66 of the
# 124 diverged ones, 2 steps ahead (their loss explodes late: the other rules
# warn them earlier).
EXPLODE = 10.0
EXPLODE_STEP = 1.5


@dataclass(frozen=True)
class Explosion:
    """The loss's level, where the run started, and the smallest factor of the last ``SMOOTH`` level-to-level steps."""

    level: float
    start: float
    growth: float


def loss_explosion(losses: Sequence[float | None], loss: float) -> Explosion | None:
    """The rule's values at the step whose loss is ``loss`` (``losses``: the
    steps before it) when it alarms; None otherwise."""
    if not math.isfinite(loss):
        return None
    head = finite(losses[:WARMUP])
    start = statistics.median(head[:WARMUP] if len(head) >= WARMUP else head[:SMOOTH]) if len(head) >= SMOOTH else None
    recent = last_finite(losses, 2 * SMOOTH) + [loss]
    if start is None or not start > 0 or len(recent) < 2 * SMOOTH:
        return None
    levels = [_median3(recent[i - 2], recent[i - 1], recent[i]) for i in range(2, len(recent))][-(SMOOTH + 1):]
    if min(levels) < 0:  # growth by a factor reads a loss whose floor is 0 (a level crossing 0 grew by no factor)
        return None
    growth = min(b / a if a > 0 else math.inf for a, b in zip(levels, levels[1:]))
    if levels[-1] >= EXPLODE * start and growth >= EXPLODE_STEP:
        return Explosion(levels[-1], start, growth)
    return None


def last_finite(values: Sequence[float | None], n: int) -> list[float]:
    """The last ``n`` finite values, in order (fewer when there are fewer)."""
    out: list[float] = []
    for v in reversed(values):
        if v is not None and math.isfinite(v):
            out.append(v)
            if len(out) == n:
                break
    return out[::-1]


# -- the relative update of every step ------------------------------------------------------------------------
#
# **The mechanism.**  Past the stable rate the weights along the sharpest
# direction grow by a factor each step; for SGD (with or without momentum)
# the update is the learning rate times the gradient, and the gradient grows
# with the weights, so the step's relative update ``||dw|| / ||w||`` rises
# step after step: larger weights, larger gradients, larger steps.  It rises
# well before the loss shows it -- the loss is flat while the update triples
# -- which is what makes it the earliest per-step signal measured here
# (``benchmarks/ew_limits.py``: on every diverged run of both grids it left
# the healthy runs' range 10 or more steps ahead; the loss un-learned that
# early on half of them).
#
# The rule and its thresholds (all on the level, the median of the last
# ``SMOOTH`` relative updates, so one odd step moves nothing):
#
# * ``UPDATE_LEVEL = 0.015``: 1.5% of the weights' norm per step, above the
#   usual band of 1e-4 to 1e-2 (the monitor's per-layer update rule says the
#   same of one sample); the healthy runs of both grids stayed under 1.4%
#   except inside a catapult (below) or a CNN whose slow warm-up took it to
#   3.9% over 100 steps;
# * ``UPDATE_GROWTH = 3``: at least 3x the level ``UPDATE_SPAN = 10`` steps
#   before -- a level that high reached *fast*: a warm-up into a stable rate
#   raises the update linearly with the rate (the CNN's 3.9% rose 1.4x in
#   10 steps), the feedback of a rate past the stable one geometrically;
# * still rising, gradually: the level is at least the level 2 steps before
#   and at most ``UPDATE_JUMP = 3`` times it, and no single step of the last
#   ``UPDATE_SPAN`` (after the first ``WARMUP``, where every run's update
#   starts from nothing) multiplied the relative update by
#   ``UPDATE_STEP_JUMP = 2.5`` or more.  A healthy run's catapult (one sharp
#   step that the run recovers from, Lewkowycz et al. 2020) jumps 3-8x within
#   one step and then decays, and its median can still look like a tripling;
#   a diverging run climbs 10-40% a step.
#
# * and the loss has stopped improving: its level (median of 3) is at least
#   ``LOSS_STALL = 1`` times its level ``UPDATE_SPAN`` steps before;
# * all of it on ``UPDATE_PERSIST = 3`` steps in a row.  The
#   update also grows while a healthy run speeds up -- momentum building up
#   (up to 1/(1 - beta) = 10x over its first tens of steps), a warm-up's
#   rising rate, the onset of learning in a net without normalisation, SGD
#   on the scale-invariant weights of a BatchNorm net (2-7% a step) -- and
#   in all of those the loss is falling fast; past the stable rate it is not.
#
#   Nothing is judged before the loss has a level ``UPDATE_SPAN`` steps
#   back (step 12): in the first steps momentum building up and a warm-up
#   raise the update 3x in 10 steps in healthy and diverging runs alike, and
#   the loss falls in both.
#
# Measured on the benchmark's recorded runs (``bench_early_warning.py``,
# relative updates replayed from the exact per-step norms), with the loss
# rule: 32 of 49 tuned and 44 of 66 held-out divergences warned >= 10 steps
# ahead (the loss rule alone: 32 and 37), no healthy run of either grid
# alerted.  On 62 runs of an outside check that stayed finite and trained
# (SGD, Adam, AdamW; MLPs, CNNs and ResNets with and without BatchNorm, a
# small GPT; warm-ups, step decay, clipping, frozen and tied weights) it
# spoke in 3, each inside a catapult that took the loss 1.2-4x up before it
# recovered (deep tanh MLPs at SGD 0.2-0.5); with 1 step instead of 3 in a
# row, in 13.  A first version judged the first 12 steps and had no loss
# condition: 42/49 and 62/66 there -- most of that gain was the early ramp
# -- but an outside check (SGD with momentum on CNNs and ResNets with
# BatchNorm, Adam with a warm-up, a small GPT; ``tests/test_relative_update.py``
# keeps its cases) found it alarming in the first 15 steps of 10 of 21
# healthy runs.  The gradient norm as a further condition (it grows with the
# weights in a feedback) lost most warnings: it rises only in the last steps.
#
# Not judged: the level alone.  Adam's first steps move every entry by about
# the learning rate (m/sqrt(v) is +-1 while the moments are fresh), so a
# GPT-2-style weight of RMS 0.02 at lr 1e-3 moves 5% a step in a healthy
# run; Adam's update is bounded by the rate and shows no feedback growth
# while the rate is constant.
UPDATE_LEVEL = 0.015
UPDATE_GROWTH = 3.0
UPDATE_SPAN = 10
UPDATE_JUMP = 3.0
UPDATE_STEP_JUMP = 2.5
LOSS_STALL = 1.0
UPDATE_PERSIST = 3


@dataclass(frozen=True)
class UpdateGrowth:
    """The level of the relative update (median of the last ``SMOOTH``
    steps), the levels ``UPDATE_SPAN`` and 2 steps before (0 where the run
    had not started), the largest one-step factor of the relative update
    over the last ``UPDATE_SPAN`` steps after the first ``WARMUP``, and the
    loss's level now and ``UPDATE_SPAN`` steps before (None: not read)."""

    level: float
    earlier: float
    recent: float
    jump: float
    loss: float | None = None
    loss_earlier: float | None = None

    @property
    def stalled(self) -> bool:
        """The loss has stopped improving; False until it has a level ``UPDATE_SPAN`` steps back (the first
        12 steps are not judged: momentum building up moves the update as fast as feedback does there) and
        where no loss was read."""
        return self.loss is not None and self.loss_earlier is not None and self.loss >= LOSS_STALL * self.loss_earlier

    @property
    def alarming(self) -> bool:
        return (self.level > UPDATE_LEVEL and self.level >= UPDATE_GROWTH * self.earlier
                and 0 < self.recent <= self.level <= UPDATE_JUMP * self.recent and self.jump < UPDATE_STEP_JUMP
                and self.stalled)


def _level(values: Sequence[float | None], end: int) -> float | None:
    """Median of the ``SMOOTH`` values up to position ``end`` (inclusive); None where one is missing."""
    if end < SMOOTH - 1:
        return None
    window = values[end - SMOOTH + 1:end + 1]
    if any(v is None or not math.isfinite(v) for v in window):
        return None
    return statistics.median(window)  # type: ignore[type-var]


def update_growth(updates: Sequence[float | None], update: float | None, losses: Sequence[float | None] = (),
                  loss: float | None = None) -> UpdateGrowth | None:
    """The relative-update rule's values at the step whose relative update is
    ``update`` and loss ``loss`` (``updates``, ``losses``: the steps before
    it, None where not read); None without ``SMOOTH`` finite relative
    updates ending here."""
    keep = UPDATE_SPAN + SMOOTH
    series = [*updates[-keep:], update] if len(updates) > WARMUP + UPDATE_SPAN else [*updates, update]
    offset = len(updates) + 1 - len(series)  # the step index of series[0]
    t = len(series) - 1
    level = _level(series, t)
    if level is None:
        return None
    # before the run's first levels: 0 (the level rose from nothing)
    earlier = _level(series, t - UPDATE_SPAN) if offset + t - UPDATE_SPAN >= SMOOTH - 1 else 0.0
    recent = _level(series, t - 2) if offset + t - 2 >= SMOOTH - 1 else 0.0
    if earlier is None or recent is None:
        return None
    start = max(WARMUP - offset, t - UPDATE_SPAN, 0)
    window = series[start:]
    jump = max((b / a for a, b in zip(window, window[1:]) if a is not None and b is not None and a > 0
                and math.isfinite(a) and math.isfinite(b)), default=0.0)
    ls = [*losses[-keep:], loss]
    u = len(ls) - 1
    loss_level = _level(ls, u)
    loss_earlier = _level(ls, u - UPDATE_SPAN) if u - UPDATE_SPAN >= SMOOTH - 1 else None
    return UpdateGrowth(level, earlier, recent, jump, loss_level, loss_earlier)


def update_growth_alarming(updates: Sequence[float | None], update: float | None,
                           losses: Sequence[float | None] = (), loss: float | None = None) -> UpdateGrowth | None:
    """The rule's values at this step when they were alarming here and on the
    ``UPDATE_PERSIST - 1`` steps before (``updates``, ``losses``: the steps
    before this one, aligned); None otherwise."""
    if len(losses) != len(updates):
        return None
    # the tail the rule reads (long enough that the first WARMUP steps are behind it once it is cut)
    tail = 4 * (WARMUP + UPDATE_SPAN + SMOOTH + UPDATE_PERSIST)
    cut = max(len(updates) - tail, 0) if len(updates) > 2 * tail else 0
    us, ls = [*updates[cut:], update], [*losses[cut:], loss]
    out = None
    for back in range(UPDATE_PERSIST):
        i = len(us) - 1 - back
        if i < 0:
            return None
        g = update_growth(us[:i], us[i], ls[:i], ls[i])
        if g is None or not g.alarming:
            return None
        out = out or g
    return out
