"""Which layers would not survive a low-precision format, read off the rows a
pass measured: each row's largest |value| of its output, gradient and
weights (headroom before overflow) and, when the pass counted them
(``check(..., dtype=...)``; :mod:`signalprop.formats`), the shares of their
nonzero entries that a cast would overflow, leave below the smallest normal,
or flush to zero.  A row's input that no module wrote (a residual sum in a
parent's ``forward``, ``input_absmax``) is judged by its largest |value|
too: it would overflow in the format although no row outputs it.  Without
a loss the gradients' scale is that of check's random unit-variance
cotangent, so they are not judged against a format's limits.  Plain Python
over the records: the monitor's alerts read it too."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from ..formats import resolve
from ..records import FORMATS, LayerPrecision, LayerStats, PrecisionReport

# (quantity, max |value| statistic, shares statistic); an input's shares are not counted
QUANTITIES = (("output", "forward_absmax", "forward_formats"), ("gradient", "grad_absmax", "grad_formats"),
              ("weights", "weight_absmax", "weight_formats"), ("input", "input_absmax", ""))


def headroom(absmax: float | None, limit: float) -> float | None:
    """log2(limit / absmax): the binades (doublings) to spare before overflow;
    -inf for a non-finite value, None where nothing was measured or it is 0."""
    if absmax is None or absmax == 0 or math.isnan(absmax):
        return None
    return -math.inf if math.isinf(absmax) else math.log2(limit / absmax)


def _rms(layer: LayerStats, quantity: str) -> float | None:
    if quantity == "output":
        return math.sqrt(layer.forward_second_moment) if layer.forward_second_moment > 0 else None
    return layer.grad_rms if quantity == "gradient" else None


def flushed_mass(flushed: float | None, rms: float | None, dtype: str) -> float | None:
    """An upper bound on the share of a quantity's squared norm carried by
    its entries that a cast to ``dtype`` would flush to zero: each is at most
    the flush edge (half the smallest subnormal), so their mean square is at
    most ``flushed * edge^2``, over the quantity's mean square ``rms^2``
    (which the nonzero entries' mean square is at least).  None without both."""
    if flushed is None or rms is None or not rms > 0 or not math.isfinite(rms):
        return None
    edge = FORMATS[dtype].smallest_subnormal / 2
    return min(1.0, flushed * (edge / rms) ** 2)


def layer_precision(layers: Sequence[LayerStats], dtype: str) -> list[LayerPrecision]:
    """Per row and quantity with a measured max |value| or counted shares, its :class:`LayerPrecision`."""
    limit = FORMATS[dtype].max
    out = []
    for layer in layers:
        for quantity, top_key, shares_key in QUANTITIES:
            top = layer.stats.get(top_key)
            shares = (layer.stats.get(shares_key) or {}).get(dtype) if shares_key else None
            if top is None and shares is None:
                continue
            over, under, flushed = (shares[k] if shares is not None else None
                                    for k in ("overflow", "underflow", "flushed"))
            out.append(LayerPrecision(layer.name, layer.kind, quantity, top, headroom(top, limit), over, under,
                                      flushed, flushed_mass(flushed, _rms(layer, quantity), dtype)))
    return out


def overflows(p: LayerPrecision, limit: float) -> bool:
    """Whether a cast would overflow it: a counted share, else its max |value| past the format's largest."""
    if p.absmax is not None and not math.isfinite(p.absmax):
        return True
    if p.overflow is not None:
        return p.overflow > 0
    return p.absmax is not None and p.absmax > limit


def loss_given(report: Any) -> bool:
    """Whether the pass backpropagated a loss: without one (``cotangent_seed``
    set) check starts the backward from a random unit-variance cotangent on
    every output entry, a scale no loss has (a mean cross-entropy's is about
    1 / entries), so the gradients' absolute size says nothing about a
    format's range."""
    return getattr(report.summary, "cotangent_seed", None) is None


def _names(rows: list[LayerPrecision]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.layer for p in rows))


def _list(rows: list[LayerPrecision], what: Any, most: int = 3) -> str:
    shown = ", ".join(what(p) for p in rows[:most])
    return shown + (f" and {len(rows) - most} more" if len(rows) > most else "")


def precision_report(report: Any, dtype: Any = None, flush_limit: float = 0.01,
                     risk_binades: float = 3.0) -> PrecisionReport:
    """:meth:`signalprop.records.Report.precision`."""
    if dtype is None:
        dtype = report.summary.dtype
        if dtype is None:
            raise ValueError("name the format: report.precision('float16') (one of "
                             f"{sorted(FORMATS)}), or run check(model, inputs, dtype=...) to make it the default")
    dtype = resolve(dtype)
    if not (isinstance(flush_limit, (int, float)) and 0 <= flush_limit < 1):
        raise ValueError(f"flush_limit must be a share in [0, 1), got {flush_limit!r}")
    if not (isinstance(risk_binades, (int, float)) and risk_binades >= 0):
        raise ValueError(f"risk_binades must be a number of binades >= 0, got {risk_binades!r}")
    f = FORMATS[dtype]
    rows = layer_precision(report.layers, dtype)
    counted = any(p.overflow is not None for p in rows)
    # every row stays in the report's layers; without a loss the gradients are left out of the verdict
    grads = loss_given(report)
    judged = rows if grads else [p for p in rows if p.quantity != "gradient"]
    over = [p for p in judged if overflows(p, f.max)]
    over.sort(key=lambda p: p.headroom if p.headroom is not None else 0.0)
    # flushed entries that matter: over flush_limit of the entries, carrying over flush_limit of the norm
    flushed = sorted((p for p in judged if p.flushed is not None and p.flushed > flush_limit
                      and (p.flushed_mass is None or p.flushed_mass > flush_limit)),
                     key=lambda p: -(p.flushed or 0.0))
    risk = sorted((p for p in judged if p not in over and p.headroom is not None and p.headroom < risk_binades),
                  key=lambda p: p.headroom or 0.0)
    verdict: Literal["fits", "overflows", "underflows"] = "overflows" if over else "underflows" if flushed else "fits"
    parts = []
    if over:
        parts.append(f"{len(_names(over))} module(s) would overflow (" + _list(
            over, lambda p: f"{p.layer} {p.quantity}: max |value| {p.absmax:.3g}"
            + (f", {p.overflow:.2%} of its entries" if p.overflow else "")) + ")")
    if flushed:
        parts.append(f"{len(_names(flushed))} would flush over {flush_limit:.0%} of a quantity to zero ("
                     + _list(flushed, lambda p: f"{p.layer} {p.quantity}: {p.flushed:.1%}") + ")")
    if risk:
        parts.append(f"{len(_names(risk))} within {risk_binades:g} binades of overflowing ("
                     + _list(risk, lambda p: f"{p.layer} {p.quantity}: {p.headroom:.1f}") + ")")
    if not parts:
        least = min((p for p in judged if p.headroom is not None), key=lambda p: p.headroom or 0.0, default=None)
        parts.append("every measured layer fits" + (f" (least headroom: {least.headroom:.1f} binades, "
                                                    f"{least.layer} {least.quantity})" if least else ""))
    summary = f"{dtype} (largest {f.max:g}, smallest normal {f.smallest_normal:g}): " + "; ".join(parts)
    if not counted:
        summary += " [overflow read off max |value| only: check(..., dtype=...) counts the shares]"
    if not grads and len(judged) < len(rows):
        summary += " [gradients not judged: no loss_fn, so their scale is arbitrary; pass loss_fn to judge them]"
    return PrecisionReport(dtype, f.max, f.smallest_normal, verdict, summary, tuple(rows), _names(over),
                           _names(flushed), _names(risk), counted, float(flush_limit), float(risk_binades))
