"""Gathered values -> one :class:`~signalprop.records.LayerStats` per row."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..activations import can_die
from ..records import LayerStats, evolve
from ..statistics import STATISTICS
from .recorder import Row

_BLANK = LayerStats(index=0, name="", kind="", depth=0, shape=(), forward_mean=0.0, forward_var=0.0,
                    forward_second_moment=0.0, nonfinite_fraction=0.0, grad_rms=None)


def _dead(r: Row, v: dict[str, Any], m2: float) -> float | None:
    """The row's dead share: per unit for a rectifier (measured); for an
    activation that dies only where its output underflows (GELU, SiLU, Mish,
    softplus: see :func:`~signalprop.activations.can_die`), 1 where every
    output is exactly 0 and None otherwise -- per-unit flags on every GELU
    row measured ~9% of check on small GELU models, for units that die only
    past a pre-activation of about -13."""
    d = v.get("dead_fraction")
    if d is None and m2 == 0.0 and r.act is not None and v["nonfinite_fraction"] == 0.0 and can_die(r.act):
        return 1.0
    return d


def layer_stats(rows: list[Row], vals: list[dict[str, Any]], pgrads: dict[nn.Module, tuple[float, float]],
                 out_rms: float, pred: dict[int, tuple[float, float | None]] | None = None) -> list[LayerStats]:
    """One record per row; ``pred``: the theory column by row index (see
    :func:`~.predict.predictions`)."""
    # the declared statistics without a field of their own, kept in LayerStats.stats
    extra = [s.name for s in STATISTICS if s.name not in LayerStats.__dataclass_fields__]
    layers = []
    prev_m2: float | None = None
    prev_g2: float | None = None
    pred = pred or {}
    for r, v in zip(rows, vals):
        m2 = v["forward_second_moment"]
        g = v.get("grad_rms")
        g2 = None if g is None else g * g
        pg = pgrads.get(r.module) if r.module is not None else None
        pr = pred.get(r.index)
        layers.append(evolve(  # a copy of a blank record: LayerStats' frozen __init__ costs 4 us a row
            _BLANK, index=r.index, name=r.name, kind=r.kind, depth=r.depth, shape=r.shape,
            forward_mean=v["forward_mean"], forward_var=v["forward_var"], forward_second_moment=m2,
            nonfinite_fraction=v["nonfinite_fraction"], grad_rms=g,
            grad_nonfinite_fraction=v.get("grad_nonfinite_fraction"),
            param_grad_rms=pg[0] if pg else None, grad_to_weight=pg[1] if pg else None,
            saturation=v.get("saturation"), dead_fraction=_dead(r, v, m2),
            dead_samples=v.get("dead_samples"),
            forward_gain=m2 / prev_m2 if prev_m2 else None,
            # how much the gradient's mean square grows passing back through this row
            backward_gain=prev_g2 / g2 if (prev_g2 is not None and g2) else None,
            relative_grad_rms=None if g is None else (g / out_rms if out_rms > 0 else math.inf),
            activation=r.act.name if r.act is not None else None, role=r.role,
            predicted_second_moment=pr[0] if pr else None, predicted_grad_rms=pr[1] if pr else None,
            stats={k: v[k] for k in extra if k in v},
        ))
        prev_m2 = m2 if m2 > 0 else None
        prev_g2 = g2
    return layers

