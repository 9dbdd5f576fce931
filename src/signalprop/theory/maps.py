"""Mean-field signal propagation: q-map, c-map, fixed points, chi1, depth scales.

Notation follows Poole et al. (2016) and Schoenholz et al. (2017): a layer is
h = W phi(h_prev) + b with W_ij ~ (0, sigma_w2 / fan_in) and b_i ~ (0, sigma_b2).
For wide layers the pre-activation second moment q obeys

    q' = qmap(q) = sigma_w2 * E[phi(sqrt(q) z)^2] + sigma_b2,    z ~ N(0, 1)

-- a *second moment*, not a variance: Dive into Deep Learning's derivation
assumes zero-mean inputs, which sigmoid's outputs are not.  All
functions take plain floats or numpy arrays and broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import activations as _act
from .gaussian import N_1D, N_2D, _standard_pieces, expect2, nodes_1d, nodes_2d

Array = np.ndarray
Q_MIN = 1e-12  # q below this is treated as the q -> 0+ limit
Q_MAX = 1e15  # q beyond this counts as divergent
_TOL = 1e-13


class FixedPointError(ValueError):
    """The length map has no finite attracting fixed point (q diverges)."""


class NoCriticalPointError(ValueError):
    """No sigma_w2 puts the network at chi1 = 1 for this activation and sigma_b2."""


# The Gaussian moments theory needs, h = sqrt(q) z, z ~ N(0, 1): what each
# integrates on the nodes (x, phi(x), phi'(x), q).  "dm1" is d E[phi] / dq and
# "pdx" d E[phi^2] / dq / 2, both by Stein's lemma (no phi'' needed).
_INTEGRANDS: dict[str, Callable[[Array, Array, Array, Array], Array]] = {
    "m1": lambda x, p, d, q: p,
    "m2": lambda x, p, d, q: p * p,
    "d2": lambda x, p, d, q: d * d,
    "d4": lambda x, p, d, q: (d * d) ** 2,
    "dm1": lambda x, p, d, q: d * x / (2.0 * q[..., None]),
    "pdx": lambda x, p, d, q: p * d * x / q[..., None],
}


_USES_PHI = ("m1", "m2", "pdx")


def gaussian_moments(act: Any, q: Array | float, which: tuple[str, ...] = ("m2", "d2"),
                     n: int = N_1D) -> dict[str, Array]:
    """E[phi(h)], E[phi(h)^2], E[phi'(h)^2], E[phi'(h)^4] and the q-derivatives
    theory uses ("m1", "m2", "d2", "d4", "dm1", "pdx"), h ~ N(0, q), vectorized
    over q: the one routine every map, critical point and spectrum reads.
    Closed forms where the activation has them (E[phi^2], E[phi'^2] of linear,
    ReLU family, erf, hardtanh); otherwise all on one shared set of
    kink-aware quadrature nodes.  (Bivariate expectations at a correlation c
    are :func:`signalprop.theory.expect2`'s.)"""
    a = _act.resolve(act)
    unknown = sorted(set(which) - set(_INTEGRANDS))
    if unknown:
        raise ValueError(f"unknown Gaussian moment(s) {unknown}; choose from {sorted(_INTEGRANDS)}")
    qa = np.maximum(np.asarray(q, dtype=float), Q_MIN)
    out: dict[str, Array] = {}
    if "m2" in which and a.second_moment is not None:
        out["m2"] = np.asarray(a.second_moment(qa), dtype=float)
    if "d2" in which and a.deriv_second_moment is not None:
        out["d2"] = np.asarray(a.deriv_second_moment(qa), dtype=float)
    todo = [k for k in which if k not in out]
    if todo:
        one = qa.ndim == 0 and all(k == 0.0 for k in a.kinks)
        if one:  # one q (a layer of propagate's recursion): the q = 1 rule scaled, dot products
            z0, w0 = _standard_pieces(n)
            x = math.sqrt(float(qa)) * z0
        else:
            x, w = nodes_1d(qa, a.kinks, n)
        p = a.phi(x) if any(k in _USES_PHI for k in todo) else None
        d = a.dphi(x) if any(k not in ("m1", "m2") for k in todo) else None
        for k in todo:
            f = _INTEGRANDS[k](x, p, d, qa)  # type: ignore[arg-type]
            out[k] = w0 @ f if one else np.sum(w * f, -1)
    return out


def moments_at(act: Any, which: tuple[str, ...], n: int = N_1D) -> Callable[[float], tuple[float, ...]]:
    """:func:`gaussian_moments` at one q at a time, as a function of q that
    returns the moments in the order of ``which``: for a layer-by-layer
    recursion (:func:`signalprop.theory.propagate` calls it once per layer,
    thousands of times for a deep net).  The activation, its closed forms and
    the quadrature rule are looked up once; a call then evaluates the
    activation on the nodes and takes one dot product per moment -- the
    same nodes and operations as :func:`gaussian_moments`, so the same
    values."""
    a = _act.resolve(act)
    unknown = sorted(set(which) - set(_INTEGRANDS))
    if unknown:
        raise ValueError(f"unknown Gaussian moment(s) {unknown}; choose from {sorted(_INTEGRANDS)}")
    if any(k != 0.0 for k in a.kinks):  # nodes depend on q through the kinks: the general path
        def general(q: float) -> tuple[float, ...]:
            r = gaussian_moments(a, q, which, n)
            return tuple(float(r[k]) for k in which)

        return general
    closed = {"m2": a.second_moment, "d2": a.deriv_second_moment}
    forms = [closed.get(k) for k in which]
    integrands = [_INTEGRANDS[k] for k in which]
    phi = a.phi if any(k in _USES_PHI and f is None for k, f in zip(which, forms)) else None
    dphi = a.dphi if any(k not in ("m1", "m2") and f is None for k, f in zip(which, forms)) else None
    z0, w0 = _standard_pieces(n)

    steps = list(zip(forms, integrands))

    def at(q: float) -> tuple[float, ...]:
        qf = float(q)
        qa = np.float64(Q_MIN if qf < Q_MIN else qf)  # np.maximum's: a NaN stays NaN
        x = math.sqrt(qa) * z0
        p = phi(x) if phi is not None else None
        d = dphi(x) if dphi is not None else None
        return tuple([float(form(qa)) if form is not None else float(w0 @ f(x, p, d, qa))  # type: ignore[arg-type]
                      for form, f in steps])

    return at


def _second_moment(act: _act.Activation, q: Array | float, n: int = N_1D) -> Array:
    return gaussian_moments(act, q, ("m2",), n)["m2"]


def _deriv_second_moment(act: _act.Activation, q: Array | float, n: int = N_1D) -> Array:
    return gaussian_moments(act, q, ("d2",), n)["d2"]


def _qmap_slope(act: _act.Activation, q: Array | float, sw2: Array | float, sb2: Array | float,
                n: int = N_1D) -> tuple[Array, Array]:
    """qmap(q) and d qmap / dq = sigma_w2 * E[phi(x) phi'(x) x] / q (Stein's lemma
    form of Schoenholz's chi_q = sigma_w2 E[phi'^2 + phi phi''], which needs no phi'')."""
    q = np.maximum(np.asarray(q, dtype=float), Q_MIN)
    x, w = nodes_1d(q, act.kinks, n)
    p = act.phi(x)
    m2 = np.sum(w * p * p, axis=-1)
    slope = np.sum(w * p * act.dphi(x) * x, axis=-1) / q
    return sw2 * m2 + sb2, sw2 * slope


def qmap(act: Any, q: Array | float, sigma_w2: Array | float, sigma_b2: Array | float) -> Array | float:
    """Next layer's pre-activation second moment: sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2."""
    a = _act.resolve(act)
    out = sigma_w2 * _second_moment(a, np.asarray(q, dtype=float)) + np.asarray(sigma_b2, dtype=float)
    return out if np.ndim(out) else float(out)


def _fixed_point_vec(act: _act.Activation, sw2: Array, sb2: Array, q0: float = 1.0,
                     n: int = N_1D, max_iter: int = 100) -> Array:
    """Attracting fixed point of the q-map, vectorized; inf where q diverges,
    0 where it collapses to 0 (sigma_b2 = 0 in the ordered phase).

    Safeguarded Newton on h(q) = qmap(q) - q inside a bracket [lo, hi] with
    h(lo) > 0 > h(hi): the root found has h' <= 0 there, i.e. qmap's slope is
    at most 1 -- the attracting fixed point, the one a deep network reaches.
    """
    sw2, sb2 = np.broadcast_arrays(np.asarray(sw2, dtype=float), np.asarray(sb2, dtype=float))
    shape = sw2.shape
    sw2, sb2 = sw2.ravel(), sb2.ravel()
    out = np.full(sw2.shape, np.nan)

    def h(q: Array, idx: Array) -> tuple[Array, Array]:
        m, s = _qmap_slope(act, q, sw2[idx], sb2[idx], n)
        return m - q, s - 1.0

    allidx = np.arange(sw2.size)
    # Every q a fixed point (positively homogeneous phi at its critical weight, sigma_b2 = 0).
    hq0, _ = h(np.full(sw2.size, q0), allidx)
    marginal = np.abs(hq0) <= _TOL * max(1.0, q0)
    out[marginal] = q0
    # Collapse: h(0+) <= 0 and the slope at 0+ below 1 means q -> 0.
    h0, dh0 = h(np.full(sw2.size, Q_MIN), allidx)
    collapse = ~marginal & (h0 <= Q_MIN * 1e-3) & (dh0 < 0)
    out[collapse] = 0.0
    todo = np.flatnonzero(~marginal & ~collapse)
    if todo.size:
        lo = np.full(todo.size, Q_MIN)
        hi = np.maximum(1.0, sw2[todo] + sb2[todo])
        for _ in range(60):  # doubling until h(hi) < 0, or give up: q diverges
            hh, _ = h(hi, todo)
            grow = (hh >= 0) & (hi < Q_MAX)
            if not grow.any():
                break
            lo = np.where(grow, hi, lo)
            hi = np.where(grow, hi * 4.0, hi)
        hh, _ = h(hi, todo)
        diverge = hh >= 0
        out[todo[diverge]] = np.inf
        keep = ~diverge
        todo, lo, hi = todo[keep], lo[keep], hi[keep]
        q = 0.5 * (lo + hi)
        for _ in range(max_iter):
            if not todo.size:
                break
            hq, dh = h(q, todo)
            lo = np.where(hq > 0, q, lo)
            hi = np.where(hq > 0, hi, q)
            with np.errstate(divide="ignore", invalid="ignore"):
                newton = q - hq / dh
            bisect = np.where(lo > 0, np.sqrt(lo * hi), 0.5 * (lo + hi))
            ok = np.isfinite(newton) & (newton > lo) & (newton < hi)
            q_new = np.where(ok, newton, bisect)
            done = np.abs(q_new - q) <= 1e-13 * np.maximum(q, 1e-300) + 1e-300
            out[todo[done]] = q_new[done]
            todo, q, lo, hi = todo[~done], q_new[~done], lo[~done], hi[~done]
        out[todo] = q
    return out.reshape(shape)


def fixed_point(act: Any, sigma_w2: float, sigma_b2: float, q0: float = 1.0) -> float:
    """The attracting fixed point q* of the q-map.

    Returns 0.0 when the signal collapses (only possible with sigma_b2 = 0 in
    the ordered phase), ``q0`` when every q is a fixed point (ReLU at
    sigma_w2 = 2, sigma_b2 = 0), and raises :class:`FixedPointError` when q
    grows without bound (the signal explodes with depth).
    """
    a = _act.resolve(act)
    _check_params(sigma_w2, sigma_b2)
    q = float(_fixed_point_vec(a, np.float64(sigma_w2), np.float64(sigma_b2), q0))
    if not math.isfinite(q):
        raise FixedPointError(
            f"q diverges for {a.name} at sigma_w2={sigma_w2:g}, sigma_b2={sigma_b2:g}: "
            f"qmap(q) > q up to q = {Q_MAX:g}, so the forward signal grows without bound "
            "with depth; lower sigma_w2 (or sigma_b2)"
        )
    return q


def _check_params(sigma_w2: Any, sigma_b2: Any) -> None:
    if np.any(np.asarray(sigma_w2) <= 0) or np.any(np.asarray(sigma_b2) < 0):
        raise ValueError(
            f"need sigma_w2 > 0 and sigma_b2 >= 0, got sigma_w2={sigma_w2}, sigma_b2={sigma_b2}"
        )


def _chi1_at(act: _act.Activation, q: Array | float, sw2: Array | float, n: int = N_1D) -> Array:
    return sw2 * _deriv_second_moment(act, q, n)


def chi1(act: Any, sigma_w2: float, sigma_b2: float, q: float | None = None) -> float:
    """chi1 = sigma_w2 E[phi'(sqrt(q*) z)^2]: the mean squared singular value of
    one layer's Jacobian, i.e. the per-layer backward gain of gradient second
    moments.  < 1 ordered (gradients vanish), > 1 chaotic (they explode)."""
    a = _act.resolve(act)
    qs = fixed_point(a, sigma_w2, sigma_b2) if q is None else q
    return float(_chi1_at(a, np.float64(qs), np.float64(sigma_w2)))


def _moments(act: _act.Activation, q: Array, n: int = N_1D) -> tuple[Array, Array]:
    """E[phi(sqrt(q) z)^2] and E[phi'(sqrt(q) z)^2]."""
    m = gaussian_moments(act, q, ("m2", "d2"), n)
    return m["m2"], m["d2"]


def critical_sigma_w2(act: Any, sigma_b2: float = 0.0, *, lo: float = 1e-2, hi: float = 1e4) -> float:
    """The sigma_w2 in [lo, hi] at which chi1(q*) = 1 for the given sigma_b2 (the edge of chaos).

    Solved as one equation in q rather than a root search over sigma_w2 with
    a fixed-point solve inside: chi1 = 1 fixes sigma_w2(q) = 1 / E[phi'^2](q),
    and q must be a fixed point of the q-map at that weight,
    G(q) = E[phi^2](q) / E[phi'^2](q) + sigma_b2 - q = 0.  Sign changes of G
    on a log grid of q are refined by Brent's method, and a root is accepted
    only if q is the *attracting* fixed point at sigma_w2(q).

    Raises :class:`NoCriticalPointError` when no such point exists, e.g. ReLU
    with sigma_b2 > 0 (there G = sigma_b2 > 0: q diverges on chi1 = 1).

    This is the classic mean-field critical line, for the activation as it is,
    mean included (sigmoid: ~103 at sigma_b2 = 0).  It is *not* what
    :func:`signalprop.init.critical_` draws: that uses
    :func:`signalprop.theory.critical_point`, where q* is chosen so the
    depth's Jacobian stays near-isometric and an activation's Gaussian mean
    is removed by the next layer's bias, so only the centred part propagates
    (sigmoid then needs a far smaller sigma_w2).  ``signalprop theory ACT``
    prints both, with this explanation.
    """
    from scipy.optimize import brentq

    a = _act.resolve(act)
    _check_params(1.0, sigma_b2)
    qs = np.geomspace(1e-8, 1e8, 97)
    m2, d2 = _moments(a, qs)
    g = m2 / d2 + sigma_b2 - qs
    scale = np.maximum(1.0, qs)
    if np.all(np.abs(g) <= 1e-10 * scale):  # every q critical: positively homogeneous phi
        return _in_range(a, float(1.0 / d2[np.searchsorted(qs, 1.0)]), sigma_b2, lo, hi)
    if np.all(g > 0):
        raise NoCriticalPointError(
            f"{a.name}: on the line chi1 = 1 the length map has qmap(q) > q for every q up to "
            f"{qs[-1]:g}, so q diverges with sigma_b2={sigma_b2:g}: no finite fixed point is "
            "critical (for ReLU-like activations use sigma_b2 = 0)"
        )

    def G(q: float) -> float:
        m, d = _moments(a, np.float64(q))
        return float(m / d + sigma_b2 - q)

    # m2 / d2 carries ~1e-14 relative round-off, so |G| below ~1e-12 q is noise: for
    # tanh at sigma_b2 = 0, G ~ -4/3 q^3 sinks into it below q ~ 1e-6 and fakes roots.
    # Sign changes count only between points where G is above that floor.
    reliable = np.flatnonzero(np.abs(g) > 1e-12 * qs)
    candidates: list[float] = []
    phi0, dphi0 = (float(v) for v in (a.phi(np.zeros(1))[0], a.dphi(np.zeros(1))[0]))
    if sigma_b2 == 0 and abs(phi0) <= 1e-15 and dphi0 != 0:
        # q* = 0 is a fixed point, critical at sigma_w2 = 1 / phi'(0)^2 exactly (the small-q limit of
        # chi1 = sigma_w2 E[phi'(sqrt(q) z)^2] = 1); it is the attracting one when the length map at
        # that weight has qmap(q) < q just above 0 (tanh: q - 4/3 q^3 ...; not SiLU: q + 3/4 q^2 ...)
        w0 = 1.0 / (dphi0 * dphi0)
        small = np.geomspace(1e-4, 1e-2, 9)
        gap = w0 * _second_moment(a, small) - small
        sure = np.flatnonzero(np.abs(gap) > 1e-12 * small)
        if sure.size and gap[sure[0]] < 0:
            return _in_range(a, w0, sigma_b2, lo, hi)
    gr, qr = g[reliable], qs[reliable]
    candidates += [brentq(G, qr[i], qr[i + 1], xtol=1e-15, rtol=1e-14)
                   for i in np.flatnonzero((gr[:-1] > 0) & (gr[1:] <= 0))]
    for q in candidates:
        w = float(1.0 / _deriv_second_moment(a, np.float64(q)))
        q_att = float(_fixed_point_vec(a, np.float64(w), np.float64(sigma_b2)))
        if math.isfinite(q_att) and abs(q_att - q) <= 1e-6 * max(1.0, q):
            return _in_range(a, w, sigma_b2, lo, hi)
    raise NoCriticalPointError(
        f"{a.name}: chi1 = 1 has no attracting fixed point at sigma_b2={sigma_b2:g} "
        f"(candidates q = {[round(c, 6) for c in candidates]})"
    )


def _in_range(a: _act.Activation, w: float, sigma_b2: float, lo: float, hi: float) -> float:
    if not lo <= w <= hi:
        raise NoCriticalPointError(
            f"chi1 of {a.name} does not cross 1 for sigma_w2 in [{lo:g}, {hi:g}] at "
            f"sigma_b2={sigma_b2:g} (it does at sigma_w2 = {w:.6g})"
        )
    return w


def covmap(act: Any, q1: Array | float, q2: Array | float, c: Array | float,
           sigma_w2: Array | float, sigma_b2: Array | float) -> tuple[Array, Array, Array]:
    """One layer's map of two inputs' (q1, q2, correlation c) to the next layer's."""
    a = _act.resolve(act)
    q1n = sigma_w2 * _second_moment(a, q1) + sigma_b2
    q2n = sigma_w2 * _second_moment(a, q2) + sigma_b2
    q12 = sigma_w2 * expect2(a.phi, a.phi, q1, q2, c, a.kinks, a.kinks) + sigma_b2
    return q1n, q2n, q12 / np.sqrt(q1n * q2n)


def cmap(act: Any, c: Array | float, sigma_w2: float, sigma_b2: float,
         q: float | None = None) -> Array | float:
    """Correlation map at the length fixed point (both inputs at q = q*):
    c' = (sigma_w2 E[phi(u1) phi(u2)] + sigma_b2) / q*."""
    a = _act.resolve(act)
    qs = fixed_point(a, sigma_w2, sigma_b2) if q is None else q
    qs = max(qs, Q_MIN)
    out = (sigma_w2 * expect2(a.phi, a.phi, qs, qs, np.asarray(c, dtype=float),
                              a.kinks, a.kinks) + sigma_b2) / qs
    return out if np.ndim(out) else float(out)


CHUNK_CELLS = 128  # cells per batch in the bivariate solve


def _chi_c_vec(act: _act.Activation, q: Array, sw2: Array, sb2: Array, chi_1: Array,
               n: int = N_2D, iters: int = 200) -> Array:
    """chi_c = sigma_w2 E[phi'(u1) phi'(u2)] at the stable correlation fixed point c*.

    Ordered phase (chi1 <= 1): c* = 1 and chi_c = chi1.  Chaotic phase: c* < 1
    is the other root of g(c) = cmap(c) - c, solved for eps = 1 - c -- near the
    critical line c* approaches 1, where c itself keeps too few digits:
    G(eps) = eps - D(eps), D(eps) = 1 - cmap(1 - eps)
    = sigma_w2 E[phi(u1) (phi(u1) - phi(u2))] / q*, formed as a difference on
    the nodes (no cancellation), and G'(eps) = 1 - sigma_w2 E[phi'(u1) phi'(u2)]
    (Price's theorem).  G is convex with G(0) = 0, G'(0) = 1 - chi1 < 0 and
    G(1) = cmap(0) >= 0, so Newton from eps = 1 (c = 0) descends monotonically
    onto eps* without overshooting; where G(1) = 0 (odd phi, sigma_b2 = 0) c* = 0.
    Then chi_c = 1 - G'(eps*).  Where the activation has closed forms of
    the two expectations (erf), they replace the quadrature.
    """
    out = np.array(chi_1, dtype=float, copy=True)
    idx = np.flatnonzero((chi_1 > 1.0) & np.isfinite(q))
    if not idx.size:
        return out
    q, sw2 = np.maximum(q[idx], Q_MIN), sw2[idx]

    def g_and_slope(eps: Array, rows: Array) -> tuple[Array, Array]:
        if act.corr_moments is not None:  # closed form (erf): no nodes at all
            d, dd = act.corr_moments(q[rows], eps)
            return eps - sw2[rows] * d / q[rows], 1.0 - sw2[rows] * dd
        d, dd = np.empty(rows.size), np.empty(rows.size)
        for k in range(0, rows.size, CHUNK_CELLS):  # bounded memory: nodes are (cells, m1, m2)
            r, e = rows[k:k + CHUNK_CELLS], eps[k:k + CHUNK_CELLS]
            u1, w1, u2, w2 = nodes_2d(q[r], q[r], 1.0 - e, act.kinks, act.kinks, n, eps=e)
            p1 = act.phi(u1)
            if act.kinks:  # the inner rule differs per outer node
                inner = np.sum(w2 * (p1[..., None] - act.phi(u2)), -1)
                dinner = np.sum(w2 * act.dphi(u2), -1)
            else:  # one shared inner rule: matrix products
                w0 = w2[(0,) * (w2.ndim - 1)]
                inner = (p1[..., None] - act.phi(u2)) @ w0  # the difference first: no cancellation
                dinner = act.dphi(u2) @ w0
            d[k:k + CHUNK_CELLS] = np.sum(w1 * p1 * inner, -1)
            dd[k:k + CHUNK_CELLS] = np.sum(w1 * act.dphi(u1) * dinner, -1)
        return eps - sw2[rows] * d / q[rows], 1.0 - sw2[rows] * dd

    rows = np.arange(idx.size)
    eps = np.ones(idx.size)
    g, slope = g_and_slope(eps, rows)
    done = (g <= 1e-13) | ~(slope > 0)  # c* = 0 (up to round-off)
    out[idx[done]] = 1.0 - slope[done]
    rows, eps, g, slope = rows[~done], eps[~done], g[~done], slope[~done]
    for _ in range(iters):
        if not rows.size:
            break
        new = np.clip(eps - g / slope, 0.0, eps)  # monotone from the right (convex G)
        g_new, s_new = g_and_slope(new, rows)
        stop = (np.abs(new - eps) <= 1e-13 * eps) | (g_new <= 0) | ~(s_new > 0)
        # crossing zero by round-off: the previous iterate is the last trustworthy one
        out[idx[rows[stop]]] = 1.0 - np.where(g_new[stop] < 0, slope[stop], s_new[stop])
        keep = ~stop
        rows, eps, g, slope = rows[keep], new[keep], g_new[keep], s_new[keep]
    out[idx[rows]] = 1.0 - slope
    return out


def _xi(chi: Array) -> Array:
    with np.errstate(divide="ignore"):
        return np.where(chi > 0, -1.0 / np.log(np.abs(chi) + (chi == 0)), 0.0)


def depth_scales(act: Any, sigma_w2: float, sigma_b2: float) -> tuple[float, float]:
    """(xi_q, xi_c): depths over which the length and the correlation of two
    inputs approach their fixed points, xi = -1 / ln(chi) (Schoenholz et al.
    2017, eqs. 5 and 9).  ``inf`` at the critical point; networks deeper than
    about 6 xi_c do not train (see :func:`trainable_depth`)."""
    a = _act.resolve(act)
    qs = np.float64(fixed_point(a, sigma_w2, sigma_b2))
    _, chi_q = _qmap_slope(a, qs, sigma_w2, sigma_b2)
    w, b = np.atleast_1d(np.float64(sigma_w2)), np.atleast_1d(np.float64(sigma_b2))
    chi_c = _chi_c_vec(a, np.atleast_1d(qs), w, b, np.atleast_1d(_chi1_at(a, qs, sigma_w2)))
    xi_q = float(np.abs(_xi(np.atleast_1d(chi_q)))[0])
    xi_c = float(np.abs(_xi(chi_c))[0])
    return xi_q, xi_c


def trainable_depth(act: Any, sigma_w2: float, sigma_b2: float) -> float:
    """6 xi_c: Schoenholz et al. (2017) found networks train up to about this depth."""
    return 6.0 * depth_scales(act, sigma_w2, sigma_b2)[1]
