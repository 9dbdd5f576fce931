"""Other projects' divergence / spike rules, as pure functions over the
per-step series a run recorded (``losses``, ``grad_norms``: one value per
step, None where the value was not read or not finite).  Each returns the
first step it flags, or None.  The rules are re-implemented from their
sources (cited at each); none of their code is copied.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

Series = Sequence[float | None]


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def olmo_core(losses: Series, grad_norms: Series, window: int = 128, sigmas: float = 6.0) -> int | None:
    """OLMo-core's ``StabilityMonitorCallback`` (allenai/OLMo-core,
    ``src/olmo_core/train/callbacks/stability_monitor.py``): a loss or
    gradient-norm value is a spike when it exceeds the mean of the previous
    ``window_size=128`` values by more than ``threshold_std=6`` (population)
    standard deviations; nothing is judged until 128 values were seen, or
    when the standard deviation is below 1e-10."""
    first = None
    for series in (losses, grad_norms):
        hist: list[float] = []
        for t, v in enumerate(series):
            if not _finite(v):
                continue
            assert v is not None
            if len(hist) >= window:
                mean = sum(hist) / len(hist)
                std = math.sqrt(sum((x - mean) ** 2 for x in hist) / len(hist))
                if std >= 1e-10 and v > mean + sigmas * std:
                    first = t if first is None else min(first, t)
                    break
            hist.append(v)
            if len(hist) > window:
                hist.pop(0)
    return first


def megatron(losses: Series, grad_norms: Series, factor: float = 10.0, samples: int = 100) -> int | None:
    """Megatron-LM's spiky-loss check (``megatron/core/rerun_state_machine.py``,
    ``RerunStateMachine.is_unexpectedly_large`` with ``threshold=10``, as
    ``check_for_spiky_loss`` calls it): the largest |loss| of the first
    ``num_samples=100`` values is the reference; afterwards a loss >= 10x it
    is flagged.  NaN/Inf are left to the separate non-finite check."""
    seen = 0
    ref = 0.0
    for t, v in enumerate(losses):
        if not _finite(v):
            continue
        assert v is not None
        if seen < samples:
            seen += 1
            ref = max(ref, abs(v))
            continue
        if abs(v) >= factor * ref:
            return t
    return None


def zclip(losses: Series, grad_norms: Series, z_thresh: float = 2.5, alpha: float = 0.97, warmup: int = 25,
          eps: float = 1e-6) -> int | None:
    """ZClip's z-score on the gradient norm (Kumar et al. 2025, "ZClip:
    Adaptive Spike Mitigation for LLM Pre-Training", arXiv:2504.02507;
    bluorion-com/ZClip ``zclip/zclip.py``): mean and variance of the first
    ``warmup_steps=25`` norms, then EMAs with ``alpha=0.97``; a norm with
    z = (g - mean) / (std + eps) > ``z_thresh`` (2.5 by default) is a spike.
    Only the first spike is wanted here, so what ZClip does after one (the
    EMAs take the clipped value) never comes into play."""
    buf: list[float] = []
    mean = var = 0.0
    for t, g in enumerate(grad_norms):
        if not _finite(g):
            continue
        assert g is not None
        if len(buf) < warmup:
            buf.append(g)
            if len(buf) == warmup:
                mean = sum(buf) / warmup
                var = sum((x - mean) ** 2 for x in buf) / warmup
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + eps)
        if z > z_thresh:
            return t
        mean = alpha * mean + (1 - alpha) * g
        var = alpha * var + (1 - alpha) * (g - mean) ** 2
    return None


def zclip3(losses: Series, grad_norms: Series) -> int | None:
    """:func:`zclip` at z > 3."""
    return zclip(losses, grad_norms, z_thresh=3.0)


PEERS: dict[str, Callable[[Series, Series], int | None]] = {
    "olmo-core (6 sigma / 128 steps)": olmo_core,
    "megatron (loss >= 10x max of first 100)": megatron,
    "zclip z > 2.5": zclip,
    "zclip z > 3": zclip3,
}


def median_or_none(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None
