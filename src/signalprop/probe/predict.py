"""Theory beside measurement, for stacks that mean-field theory covers:
Linear/Conv layers, each optionally followed by one elementwise activation."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from ..records import InputStats, LayerStats, evolve
from ..theory import propagate
from .recorder import Row
from .stats import acc

_WEIGHT = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _chain(rows: list[Row]) -> list[tuple[Row, Row | None]] | None:
    """[(weight row, activation row or None)], or None if rows are not such a chain."""
    out: list[tuple[Row, Row | None]] = []
    i = 0
    while i < len(rows):
        r = rows[i]
        if not isinstance(r.module, _WEIGHT) or getattr(r.module, "groups", 1) != 1:
            return None
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        if nxt is not None and nxt.act is not None:
            out.append((r, nxt))
            i += 2
        else:
            out.append((r, None))
            i += 1
    return out or None


def _width(m: nn.Module, which: str) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features if which == "in" else m.out_features
    return m.in_channels if which == "in" else m.out_channels  # type: ignore[return-value]


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter (FSDP2's ``DTensor``) gathered whole; others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _weight_terms(m: nn.Module) -> torch.Tensor:
    """[sigma_w2, sigma_b2, BS, S2] of one layer, on its device: sigma_w2 =
    fan_in * mean(W^2), sigma_b2 = mean(b^2), and the mean coupling of
    :func:`signalprop.theory.propagate` from the row sums s_i of W."""
    W = _whole(cast(torch.Tensor, m.weight))
    rows = W.reshape(W.shape[0], -1)
    a = acc(W)  # float32 accumulation for half precision, no copy of W
    s = rows.sum(dim=1, dtype=a)  # row sums
    n = rows.shape[0]
    b = getattr(m, "bias", None)
    b = _whole(b) if b is not None else None
    w2 = torch.linalg.vector_norm(rows, dtype=a).square() / n
    if b is None:
        zero = torch.zeros((), dtype=a, device=W.device)
        return torch.stack([w2, zero, zero, s.square().mean()]).double()
    b = b.to(a)
    return torch.stack([w2, b.square().mean(), torch.dot(b, s) / n, s.square().mean()]).double()


def predictions(rows: list[Row], layers: list[LayerStats], inp: InputStats | None) -> list[LayerStats] | None:
    """Layers with ``predicted_second_moment`` and ``predicted_grad_rms`` filled,
    from each layer's measured weights (sigma_w2, sigma_b2 and the coupling
    of the input's mean through the row sums, so a bias that cancels
    sigmoid's mean is predicted as such); None when the model is not a plain
    chain of Linear/Conv layers and elementwise activations -- normalisation,
    attention, residual branches and pooling are outside what the theory
    predicts, and no number is shown there."""
    chain = _chain(rows)
    if chain is None or inp is None:
        return None
    widths = [_width(chain[0][0].module, "in")]  # type: ignore[arg-type]
    for w, _ in chain:
        if _width(w.module, "in") != widths[-1]:  # type: ignore[arg-type]
            return None
        widths.append(_width(w.module, "out"))  # type: ignore[arg-type]
    with torch.no_grad():
        terms = torch.stack([_weight_terms(w.module) for w, _ in chain]).cpu().tolist()  # type: ignore[arg-type]
    sw2, sb2 = [t[0] for t in terms], [t[1] for t in terms]
    try:
        p = propagate(widths, [_exact(r) for r in chain], sw2, sb2, q0=inp.second_moment,
                      mean_coupling=[(t[2], t[3]) for t in terms], m0=inp.mean)
    except ValueError:
        return None
    last = layers[-1]
    cot_ms = (last.grad_rms or 0.0) ** 2
    out = list(layers)
    for l_idx, (w, a) in enumerate(chain):
        out[w.index] = evolve(out[w.index], predicted_second_moment=float(p.q[l_idx]),
                               predicted_grad_rms=math.sqrt(p.grad_pre[l_idx] * cot_ms) if a is not None
                               else math.sqrt(p.grad_post[l_idx] * cot_ms))
        if a is not None:
            out[a.index] = evolve(out[a.index], predicted_second_moment=float(p.post[l_idx]),
                                   predicted_grad_rms=math.sqrt(p.grad_post[l_idx] * cot_ms))
    return out


def _exact(pair: tuple[Row, Row | None]) -> Any:
    """The exact activation (with parameters such as LeakyReLU's slope) for theory."""
    _, a = pair
    if a is None:
        return "linear"
    return a.act
