"""Low-precision headroom over time: warn before a float16 (or bfloat16, FP8)
run's first infinity, naming the module.

A value past a format's largest finite number (float16: 65504) becomes inf
and the loss turns NaN on that step: without loss scaling there is no
second chance.  On each sampled step of a run that computes in a
low-precision format (autocast's dtype at that step, or the parameters'),
every module's largest |output| and |output gradient| (``forward_absmax``,
``grad_absmax``), and its largest |input| where no module wrote that input
(``input_absmax``: a residual sum in a parent's forward) is compared with
the format's largest value, two ways:

* **within reach** (:func:`signalprop.monitor.alerts.overflow_alerts`):
  the headroom log2(max / absmax) under 4 binades (``HEADROOM = 16``) --
  an activation doubling every sample crosses it within four samples;
* **closing in** (:func:`trend_alerts`): the module's max |value| has grown
  at least ``GROWTH = 4`` times (2 binades) above its own baseline (the
  median of its first samples, so a module that is large by design is not
  news), it grew on each of the last ``RECENT = 2`` sample intervals, and at
  the rate of those intervals (binades per step, a straight line in log2)
  it would reach the format's largest value within ``LOOKAHEAD = 2``
  sampling intervals (``every`` steps) -- before the sample after next of
  the regular schedule could see it -- while
  still under ``FAR = 12`` binades from it (a rate measured far away is not
  extrapolated over dozens of binades).  Growth that speeds up (a
  catapult) reaches overflow sooner than the line says.

**Sampling that follows the risk** (:func:`closing_in`): a sample where a
module is within ``FAR`` binades of the format's largest value and grew by
``DOUBLED = 2`` or more since the previous sample makes the monitor sample
every step for the next ``every`` steps.  A float16 activation that a
learning run drives past 65504 can go from 12 binades below it to inf in
15-20 steps (measured: a residual regression net's read-out went 23 -> 100
-> 3,088 -> inf over steps 175-193), faster than one sample in 25 can see;
sampled every step, the trend rule sees the doubling and warns before the
inf.  Between samples the model's output is watched the same way (its
largest |entry|, one reduction a step, read only when the output is in a
low-precision format): doubled since the last sample and within ``FAR``
binades, the next steps are sampled.  A float32 run, or one that stays far
from its format's range, is never sampled more than ``every`` says.

Fix: a GradScaler (loss scaling) for gradients, bfloat16 (float32's range),
normalising or scaling down the module's input or output, or a lower
learning rate where the growth is the optimizer's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ..records import FORMATS, Alert, LayerStats, MonitorStep
from .alerts import BASELINE_SAMPLES, HEADROOM, headroom_quantities, overflow_alerts

GROWTH = 4.0
DOUBLED = 2.0
RECENT = 2
LOOKAHEAD = 2.0
FAR = 12.0

FIX = ("use a GradScaler (loss scaling) or bfloat16 (float32's range); normalise or scale down this module's input "
       "or output, or lower the learning rate if the optimizer is growing it")


class _Samples:
    """The samples of a run (``history`` then ``current``), each one's layers
    by name (a module called twice: its first call), indexed on demand: the
    rules read a layer's first and last few values, and a run sampled every
    step near a limit has thousands of samples -- so only the first
    ``BASELINE_SAMPLES + 1`` and the last ``RECENT + 1`` samples are read (a
    module that first runs later has no baseline there)."""

    def __init__(self, history: Sequence[MonitorStep], current: MonitorStep) -> None:
        self.samples = [*history[:BASELINE_SAMPLES + 1], *history[-(RECENT + 1):], current] \
            if len(history) > BASELINE_SAMPLES + RECENT + 2 else [*history, current]
        self._named: dict[int, dict[str, LayerStats]] = {}

    def _value(self, i: int, name: str, key: str) -> float | None:
        named = self._named.get(i)
        if named is None:
            named = self._named[i] = {}
            for row in self.samples[i].layers:
                named.setdefault(row.name, row)
        found = named.get(name)
        v = found.stats.get(key) if found is not None else None
        return v if v is not None and math.isfinite(v) and v > 0 else None

    def ends(self, name: str, key: str) -> tuple[list[float], bool, list[tuple[int, float]]]:
        """The first ``BASELINE_SAMPLES`` values of ``name``'s ``key``, whether
        it has more than that, and its last ``RECENT + 1`` (step, value)."""
        head: list[float] = []
        for i in range(len(self.samples)):
            v = self._value(i, name, key)
            if v is not None:
                head.append(v)
                if len(head) > BASELINE_SAMPLES:
                    break
        tail: list[tuple[int, float]] = []
        for i in range(len(self.samples) - 1, -1, -1):
            v = self._value(i, name, key)
            if v is not None:
                tail.append((self.samples[i].step, v))
                if len(tail) == RECENT + 1:
                    break
        return head[:BASELINE_SAMPLES], len(head) > BASELINE_SAMPLES, tail[::-1]


def trend_alerts(current: MonitorStep, history: Sequence[MonitorStep], limit: float, dtype: str,
                 every: int | None = None) -> list[Alert]:
    """The "closing in" rule (module docstring) at ``current`` against the
    samples of ``history`` (with a verdict, without ``current``): one alert,
    for the module and quantity nearest to overflowing in steps.  ``every``:
    the monitor's regular sampling interval (the lookahead is ``LOOKAHEAD``
    of them also while it samples every step); None: the samples' own."""
    if len(history) < BASELINE_SAMPLES:
        return []
    closing: list[tuple[float, str, str, str, float, float, float]] = []
    samples = _Samples(history, current)
    for layer in current.layers:
        for what, key, phase in headroom_quantities(current):
            v = layer.stats.get(key)
            if v is None or not math.isfinite(v) or v <= 0:
                continue
            room = math.log2(limit / v)
            if not 0 < room < FAR:
                continue
            head, enough, recent = samples.ends(layer.name, key)
            base = statistics.median(head) if enough else None
            if base is None or v < GROWTH * base or len(recent) < RECENT + 1 or \
                    any(b[1] <= a[1] for a, b in zip(recent, recent[1:])):
                continue
            span = recent[-1][0] - recent[0][0]
            rate = math.log2(recent[-1][1] / recent[0][1]) / span if span > 0 else 0.0
            interval = max(span / RECENT, every or 0)
            if rate > 0 and room / rate <= LOOKAHEAD * interval:
                closing.append((room / rate, layer.name, what, phase, v, base, room))
    if not closing:
        return []
    steps, name, what, phase, v, base, room = min(closing)
    return [Alert(current.step, "overflow-risk", name,
                  f"the largest |{what}| entry of {name} grew to {v:.3g} ({v / base:.3g}x its first samples'), "
                  f"{room:.1f} binades below {dtype}'s largest value {limit:g}: at its recent rate it overflows in "
                  f"about {steps:.0f} steps ({len({c[1] for c in closing})} module(s) closing in)", FIX, phase)]


def closing_in(current: MonitorStep, history: Sequence[MonitorStep], limit: float) -> bool:
    """Whether a module of ``current`` is within ``FAR`` binades of ``limit``
    and grew ``DOUBLED``-fold or more since the last sample of ``history``
    (the monitor then samples every step for a while: module docstring)."""
    if not history:
        return False
    prev = _Samples([], history[-1])
    for layer in current.layers:
        for _, key, _ in headroom_quantities(current):
            v = layer.stats.get(key)
            if v is None or not math.isfinite(v) or v <= 0 or not 0 < math.log2(limit / v) < FAR:
                continue
            before = prev._value(0, layer.name, key)
            if before is not None and v >= DOUBLED * before:
                return True
    return False


def output_closing_in(absmax: float, at_sample: float, dtype: str | None) -> bool:
    """Between samples: whether the model's output, whose largest |entry| is
    read every step of a low-precision run, is within ``FAR`` binades of its
    format's largest value and ``DOUBLED``-fold what it was at the last
    sample (the monitor then samples every step for a while)."""
    if dtype is None or dtype not in FORMATS or not math.isfinite(absmax) or not absmax > 0:
        return False
    return 0 < math.log2(FORMATS[dtype].max / absmax) < FAR and absmax >= DOUBLED * at_sample


def precision_alerts(current: MonitorStep, history: Sequence[MonitorStep], dtype: str | None,
                     every: int | None = None) -> list[Alert]:
    """Both rules for a run computing in ``dtype`` (a name in
    :data:`~signalprop.records.FORMATS`; None: a float32/float64 run, nothing to say)."""
    if dtype is None or dtype not in FORMATS:
        return []
    limit = FORMATS[dtype].max
    return overflow_alerts(current, limit, HEADROOM) + trend_alerts(current, history, limit, dtype, every)
