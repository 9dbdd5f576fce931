"""One bad batch: a transient loss spike, told apart from divergence.

A corrupted batch (wrong labels, garbage tokens) or a rare batch the model
cannot fit gives one step a loss far above the run's recent level; the next
batch is back to normal.  It is not divergence (the median-of-3 level that
:mod:`signalprop.monitor.divergence` judges does not move for one step), but
its gradient is: applied, it can set the run back for many steps.  OLMo-core
skips such steps (its skip-step optimizers: loss or gradient norm 6 sigma
above a rolling mean); ``monitor(..., skip=optimizer)`` does the same on this
rule's alert (kind ``batch-spike``).

The rule and its thresholds (measured on the early-warning benchmark's
recorded runs, ``benchmarks/bench_early_warning.py``: 62 healthy SGD runs,
18,600 steps, and 9 runs with one corrupted batch):

* ``SIGMAS = 6``: the loss is more than 6 robust standard deviations
  (1.4826 x the median absolute deviation) above the median of the last
  ``WINDOW = 32`` losses -- OLMo-core's 6 sigma, made robust so that one
  earlier spike does not widen the band for the next 32 steps;
* ``SHARE = 1.0``: and it has risen above that median by at least the whole
  progress the run has made (from the starting level, the median of the
  first 16 losses): on this batch the model does worse than it did at
  initialisation.  Late in a converged run the loss is heavy-tailed (a
  batch at 3x the median is common); a 6 sigma rule alone flagged 42 of
  the 62 healthy runs, this one 5 (9 steps of 18,600), and every corrupted
  batch (9 of 9).
* The rule speaks once the run has made ``PROGRESS = 0.2`` of its starting
  loss in progress, as the divergence rule does.
* ``TAIL = 128``: and the loss is above every one of the last 128 (OLMo-core's
  window): a bad batch is exceptional for this run.  A loss whose batches
  are heavy-tailed by nature -- a Gaussian likelihood with a learned
  variance, where a batch of large residuals under a small predicted
  variance costs 10x the median -- passes the first two bars every few
  steps: 12 healthy such runs of 300 steps (an outside stress test) drew 30
  alerts, and with ``skip=`` 5% of one run's optimizer steps were skipped;
  above the last 128 as well, 7.  The first 16 losses, the start, are not
  among the 128: they are a run's highest, and a bad batch in its first
  128 steps had to beat them (one at 3.5, 600 sigma out, after a first loss
  of 4.2 was missed); the spike's own bar already asks for a loss above the
  start's level.  The benchmark's corrupted batches are still called, 9 of
  9, and its healthy grid runs drew alerts in 2 of 59 runs (3 before the
  tail bar; 0 with the start counted in the tail).  A second bad batch
  within 128 steps of a worse one is not called.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .divergence import PROGRESS, WARMUP, WINDOW, head_end, last_finite, robust_sigma, start_level

SIGMAS = 6.0
SHARE = 1.0
TAIL = 128


@dataclass(frozen=True)
class Spike:
    """The step's ``loss`` against the median ``level`` of the last losses,
    their robust standard deviation ``sigma`` and the run's ``start``."""

    loss: float
    level: float
    sigma: float
    start: float

    @property
    def sigmas(self) -> float:
        return (self.loss - self.level) / self.sigma if self.sigma > 0 else float("inf")


def batch_spike(losses: Sequence[float | None], loss: float) -> Spike | None:
    """The spike at the step whose loss is ``loss`` (``losses``: the steps
    before it), or None when the loss is within the run's recent range."""
    start = start_level(losses)
    if start is None or not loss == loss:  # NaN: the non-finite watch's, not this rule's
        return None
    recent = last_finite(losses, WINDOW)
    level = statistics.median(recent)
    progress = start - level
    # (a run whose loss starts at 0 -- a margin most batches satisfy -- has made no progress to speak of)
    if len(recent) < WARMUP or not progress >= PROGRESS * abs(start) or progress <= 0:
        return None
    sigma = robust_sigma(recent, level)
    if loss > level + SIGMAS * sigma and loss - level >= SHARE * progress and loss > _tail_top(losses):
        return Spike(loss, level, sigma, start)
    return None


def _tail_top(losses: Sequence[float | None]) -> float:
    """The largest of the last ``TAIL`` finite losses after the first
    ``WARMUP`` finite ones (the start, which the spike's own bar compares with: a run's
    first losses are its highest, and in its first 128 steps a bad batch
    would have had to beat them); read on a bounded slice of the series."""
    tail = last_finite(losses[max(head_end(losses), len(losses) - 4 * TAIL):], TAIL)
    return max(tail) if tail else -math.inf
