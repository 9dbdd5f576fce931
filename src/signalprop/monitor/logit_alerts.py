"""Alerts on the instabilities of large-transformer training, from sampled steps.

* **Attention logit growth** (Dehghani et al. 2023, "Scaling Vision
  Transformers to 22B"; Wortsman et al. 2023, "Small-scale proxies for
  large-scale Transformer training instabilities"): the largest attention
  logit q.k/sqrt(d) of a layer grows without bound, its softmax turns
  one-hot and training stalls or diverges.  Alerted when a layer's maximum
  logit passes ``ATTN_LOGIT_LIMIT = 100`` -- a gap of 100 gives the
  runner-up key a weight e^-100 ~ 4e-44 of the top one's, so no gradient
  reaches any other key -- *and* ``ATTN_GROWTH = 5`` times its own baseline,
  its first sample's (a model whose logits started large, by design, is
  judged against that; a layer that first runs after the baseline samples,
  against its own first sample).
  Fixes: QK-layernorm, smaller query/key initialisation, a lower learning
  rate.
* **Output logit divergence** (Wortsman et al. 2023): the output logits
  drift until their log-partition log sum_j exp(z_j) is far from where it
  started (the loss can stay finite while the logits diverge).  Alerted when
  the mean log-partition moved more than ``LOGZ_DRIFT = 50`` nats from its
  baseline, either way, and ended further from 0 than the baseline was:
  learning moves it by the loss's own scale (a few nats for a vocabulary of
  50k, log V ~ 11), so 50 is an order of magnitude beyond that.  Toward 0 is
  not divergence: a model whose logits start huge (a tied head at N(0, 1),
  log Z 130 at step 0) shrinks them as it learns.
  Fixes: z-loss (1e-4 * log^2 Z, as in PaLM), a lower learning rate.

**Sampling that follows the risk** (:func:`attention_closing_in`): a sample
where a layer's maximum logit is within ``ATTN_NEAR = 0.8`` of the level
its alert needs (80-100, or 80-100% of 5x its baseline for a layer whose
logits start large) and higher than at the previous sample makes the monitor sample
every step for the next ``every`` steps.  A logit that creeps up a few
percent per sample crosses 100 between two samples and can dip under it by
the next (measured: a nanoGPT at AdamW 0.01 crossed at step 159 and read 97
at step 160), so one sample in ``every`` says it up to two intervals late;
sampled every step near the limit, the alert comes within a few steps of
the crossing.  Logits far from the limit, or falling, are sampled as usual.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, MutableMapping, Sequence

from ..probe.attention import module_of
from ..records import Alert, MonitorStep
from .alerts import BASELINE_SAMPLES

ATTN_LOGIT_LIMIT = 100.0
ATTN_GROWTH = 5.0
ATTN_NEAR = 0.8
LOGZ_DRIFT = 50.0


def _baseline(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return statistics.median(v) if v else None


def first_attention_logits(sample: MonitorStep, firsts: MutableMapping[str, float]) -> None:
    """Add to ``firsts`` (layer name -> largest attention logit) the layers
    of ``sample`` (one with a verdict, the next in the run) not in it yet:
    each layer's baseline is its first sample -- the first of the baseline
    samples, or for a layer none of them measured (a branch or a block that
    runs from a later step on), its own first sample.  (The median of the
    first three took growth that starts within the first samples for the
    baseline: a nanoGPT at AdamW 0.02, sampled every 10 steps, read 0.2, 28
    and 78 at steps 0, 10 and 20, and 5x the median, 139, was reached 15
    steps after its logits crossed 100; their lowest would take a dip for
    the start -- logits that start large by design, 300, then 60, are not
    grown at 310.)"""
    for layer in sample.layers:
        x = layer.stats.get("attn_logit_max")
        if x is not None and math.isfinite(x) and layer.name not in firsts:
            firsts[layer.name] = x


def _firsts(history: Sequence[MonitorStep]) -> dict[str, float]:
    """:func:`first_attention_logits` over ``history`` (samples with a verdict, oldest first)."""
    out: dict[str, float] = {}
    for h in history:
        first_attention_logits(h, out)
    return out


def logit_alerts(current: MonitorStep, history: Sequence[MonitorStep],
                 firsts: Mapping[str, float] | None = None) -> list[Alert]:
    """Attention-logit growth (the layer that grew most, and how many did)
    and output-logit divergence at ``current`` against the first samples of
    ``history`` (samples with a verdict, without ``current``): a layer's
    own first sample (see :func:`first_attention_logits`), from ``firsts``
    where the caller keeps them (the monitor, whose history loses its
    middle), else from ``history``."""
    out: list[Alert] = []
    base = history[:BASELINE_SAMPLES]
    if not base:
        return out
    if firsts is None:
        firsts = _firsts(history)
    grown: list[tuple[float, str, float, float]] = []
    kinds = {layer.name: layer.kind for layer in current.layers}
    for layer in current.layers:
        top = layer.stats.get("attn_logit_max")
        if top is None or not math.isfinite(top) or top <= ATTN_LOGIT_LIMIT:
            continue
        b = firsts.get(layer.name)
        if b is not None and top > ATTN_GROWTH * b:
            grown.append((top / b if b > 0 else math.inf, layer.name, top, b))
    if grown:
        _, name, top, b = max(grown)
        module = module_of(name, kinds[name])
        out.append(Alert(current.step, "attention-logit-growth", module,
                         f"attention logits in {module} grew to {top:.3g} (q.k/sqrt(d); "
                         f"{f'{top / b:.3g}x' if b > 0 else 'up from'} its first sample's {b:.3g}, past "
                         f"{ATTN_LOGIT_LIMIT:g}): its softmax is turning one-hot "
                         f"({len(grown)} attention layer(s) past the limit)",
                         "add QK-layernorm (normalise q and k before their product), initialise the query/key "
                         "projections smaller, or lower the learning rate", "forward"))
    lg = current.output_logits
    if lg is not None and math.isfinite(lg.log_partition):
        b = _baseline([h.output_logits.log_partition for h in base if h.output_logits is not None])
        if b is not None and abs(lg.log_partition - b) > LOGZ_DRIFT and abs(lg.log_partition) > abs(b):
            out.append(Alert(current.step, "output-logit-divergence", "(output)",
                             f"the output logits' log-partition log sum exp(z) is {lg.log_partition:.4g}, "
                             f"{lg.log_partition - b:+.3g} nats from its first samples' {b:.4g} (max |logit| "
                             f"{lg.max:.3g}, RMS {lg.rms:.3g}): the logits are diverging",
                             "add z-loss (1e-4 * logsumexp(logits)^2 to the loss, as PaLM does) or lower the "
                             "learning rate", "forward"))
    return out


def attention_closing_in(current: MonitorStep, history: Sequence[MonitorStep],
                         firsts: Mapping[str, float] | None = None) -> bool:
    """Whether an attention layer's maximum logit at ``current`` is within
    ``ATTN_NEAR`` of the level its alert needs (``ATTN_LOGIT_LIMIT``, or
    ``ATTN_GROWTH`` times its baseline where that is higher: a layer large by
    design is not sampled more), not past it, and higher than at the last
    sample of ``history`` (``firsts``: as for :func:`logit_alerts`)."""
    if not history:
        return False
    prev = {layer.name: layer.stats.get("attn_logit_max") for layer in history[-1].layers}
    if firsts is None:
        firsts = _firsts(history)
    for layer in current.layers:
        top = layer.stats.get("attn_logit_max")
        before = prev.get(layer.name)
        if top is None or before is None or not math.isfinite(top) or not math.isfinite(before) or top <= before:
            continue
        b = firsts.get(layer.name)
        bar = max(ATTN_LOGIT_LIMIT, ATTN_GROWTH * b) if b is not None else ATTN_LOGIT_LIMIT
        if ATTN_NEAR * bar < top <= bar:
            return True
    return False
