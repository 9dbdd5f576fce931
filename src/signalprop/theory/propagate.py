"""Layer-by-layer predictions for a concrete stack of (possibly non-square) layers.

Dive into Deep Learning's variance argument made layer-specific: with weights of variance
gamma^2 = sigma_w2 / n_in, the forward second moment is multiplied by
n_in gamma^2 = sigma_w2 (times E[phi^2] / q through the activation) and the
backward one by n_out gamma^2 = sigma_w2 n_out / n_in (times E[phi'^2]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .. import activations as _act
from .maps import covmap, gaussian_moments, moments_at


@dataclass(frozen=True)
class Propagation:
    """Predictions for layers l = 1..L, each ``h_l = W_l x_{l-1} + b_l``, ``x_l = phi(h_l)``.

    All statistics are second moments per unit (mean of squares over units),
    gradients for a cotangent of unit second moment at the last layer's output
    x_L.  ``c`` holds the correlation of two inputs' pre-activations when
    ``c0`` was given.
    """

    widths: tuple[int, ...]
    activation: str
    q: np.ndarray  # E[h_l^2]
    post: np.ndarray  # E[x_l^2] = E[phi(h_l)^2]
    grad_pre: np.ndarray  # E[(dL/dh_l)^2]
    grad_post: np.ndarray  # E[(dL/dx_l)^2]; the last entry is 1
    forward_gain: np.ndarray  # q_l / q_{l-1} (q_0: the input's second moment)
    backward_gain: np.ndarray  # grad_pre_l / grad_pre_{l+1}: sigma_w2 n_{l+1}/n_l E[phi'^2]
    input_grad: float  # E[(dL/dx_0)^2]
    c: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def _per_layer(x: float | Sequence[float], n: int, what: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(x, dtype=float), (n,)) if np.ndim(x) == 0 else np.asarray(x, dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"{what} must be a scalar or have one entry per layer ({n}), got {arr.shape}")
    return arr


def propagate(widths: Sequence[int], act: Any, sigma_w2: float | Sequence[float],
              sigma_b2: float | Sequence[float] = 0.0, q0: float = 1.0,
              c0: float | None = None, *, mean_coupling: Sequence[tuple[float, float]] | None = None,
              m0: float = 0.0, fan_ratio: Sequence[float] | None = None) -> Propagation:
    """Predict forward and backward second moments layer by layer.

    ``widths = [n_0, n_1, ..., n_L]`` (n_0 the input size); ``act``,
    ``sigma_w2`` and ``sigma_b2`` may be per-layer sequences (e.g. a final
    ``"linear"`` read-out); ``q0`` is the input's second moment per unit;
    ``c0`` an optional correlation between two inputs.

    ``mean_coupling``: for concrete weights, per layer ``(BS, S2)`` with
    ``s_i = sum_j W_ij`` the row sums, ``S2 = mean_i s_i^2`` and
    ``BS = mean_i b_i s_i``.  A layer input of mean m and centred second
    moment v then gives ``q = sigma_w2 v + sigma_b2 + 2 m BS + m^2 S2``
    (each unit's mean m s_i + b_i enters squared).  For i.i.d. weights
    ``S2 ~ sigma_w2`` and ``BS ~ 0``, which is the usual
    ``sigma_w2 E[x^2] + sigma_b2``; when the bias cancels the mean
    (``b = -m W 1``, as ``critical_`` does for sigmoid) the terms cancel too.
    ``m0`` is the input's mean.  Without ``mean_coupling`` the usual formula.
    ``fan_ratio``: per layer, the backward fan over the forward fan
    (fan_out / fan_in) in place of ``n_l / n_{l-1}`` -- for convolutions, where
    a stride s makes each input entry feed 1/s of the outputs that the channel
    counts suggest (see :func:`signalprop.layers.fans`).
    """
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths needs at least two positive entries [n_in, ..., n_out], got {widths}")
    L = len(widths) - 1
    if isinstance(act, (list, tuple)):
        if len(act) != L:
            raise ValueError(f"act must be one activation or one per layer ({L}), got {len(act)}")
        acts = [_act.resolve(x) for x in act]
    else:
        acts = [_act.resolve(act)] * L
    sw2, sb2 = _per_layer(sigma_w2, L, "sigma_w2"), _per_layer(sigma_b2, L, "sigma_b2")
    # n_out / n_in as a numerator and a denominator: with widths, the same arithmetic as sw2 * n_out / n_in
    num: list[float] = _per_layer(fan_ratio, L, "fan_ratio").tolist() if fan_ratio is not None else list(widths[1:])
    den: list[float] = [1.0] * L if fan_ratio is not None else list(widths[:-1])
    # the recursions run on Python floats (the same IEEE double arithmetic as numpy's
    # scalars, without their per-operation overhead: a 2,000-layer chain is one loop each way)
    sw2l, sb2l = sw2.tolist(), sb2.tolist()
    ql: list[float] = []
    postl: list[float] = []
    cs = np.empty(L) if c0 is not None else None
    m_in, q_in = float(q0), float(q0)
    c_in: float = float(c0) if c0 is not None else 0.0
    mean_in = float(m0)
    need = ("m2",) if mean_coupling is None else ("m1", "m2")
    at = {id(a): moments_at(a, need) for a in {id(a): a for a in acts}.values()}  # one per distinct activation
    for layer in range(L):
        if mean_coupling is None:
            q_l = sw2l[layer] * m_in + sb2l[layer]
        else:
            bs, s2 = mean_coupling[layer]
            q_l = sw2l[layer] * max(m_in - mean_in**2, 0.0) + sb2l[layer] + 2 * mean_in * bs + mean_in**2 * s2
        ql.append(q_l)
        mom = at[id(acts[layer])](q_l)  # E[phi] and E[phi^2] on one set of nodes
        if mean_coupling is not None:
            mean_in = mom[0]
        if cs is not None:
            # correlation of pre-activations from the correlation of the inputs (numpy scalars: 0/0 is nan)
            cs[layer] = (sw2[layer] * c_in * m_in + sb2[layer]) / np.float64(q_l) if layer == 0 else c_in
        postl.append(mom[-1])
        if cs is not None and layer + 1 < L:
            _, _, c_next = covmap(acts[layer], q_l, q_l, cs[layer], sw2[layer + 1], sb2[layer + 1])
            c_in = float(c_next)
        m_in = mom[-1]
    q, post = np.array(ql), np.array(postl)
    # E[phi'^2] does not feed the forward recursion: one vectorised call per distinct activation
    dphi2 = np.empty(L)
    same: dict[int, list[int]] = {}
    for layer, a in enumerate(acts):
        same.setdefault(id(a), []).append(layer)
    for idx in same.values():
        dphi2[idx] = gaussian_moments(acts[idx[0]], q[idx], ("d2",))["d2"]
    d2 = dphi2.tolist()
    gpost = [0.0] * L
    gpre = [0.0] * L
    gpost[-1] = 1.0
    for layer in range(L - 1, -1, -1):
        gpre[layer] = d2[layer] * gpost[layer]
        if layer:
            gpost[layer - 1] = sw2l[layer] * num[layer] / den[layer] * gpre[layer]
    grad_post, grad_pre = np.array(gpost), np.array(gpre)
    input_grad = float(sw2[0] * num[0] / den[0] * grad_pre[0])
    with np.errstate(divide="ignore", invalid="ignore"):  # a collapsed layer gives 0/0 = nan, on purpose
        fwd = q / np.concatenate([[q_in], q[:-1]])
        bwd = np.append(grad_pre[:-1] / grad_pre[1:], np.nan)
    name = acts[0].name if len({a.name for a in acts}) == 1 else ",".join(a.name for a in acts)
    return Propagation(widths, name, q, post, grad_pre, grad_post, fwd, bwd, input_grad, cs)
