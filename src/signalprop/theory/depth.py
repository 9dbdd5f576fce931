"""Depth scales xi_q and xi_c (Schoenholz et al. 2017) and the correlation
fixed point c* that xi_c is read at, vectorized over cells of a grid."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import activations as _act
from .gaussian import N_2D, Z_MAX, nodes_2d, span
from .maps import Q_MIN, _chi1_at, _qmap_slope, fixed_point, piecewise_linear

Array = np.ndarray
CHUNK_CELLS = 128  # cells per batch in the bivariate solve
# The inner integral of the bivariate rule stays one panel per side of z2 = 0
# while it spans at most this many span(n) in u2, and is graded beyond (see
# signalprop.theory.gaussian.nodes_2d).  Measured against long-double
# quadrature, E[tanh'(u1) tanh'(u2)] at c = 0 with 40 nodes: the plain rule is
# within 2e-13 up to 2 span(40) = 16, 1e-10 at 27 (q = 5), 2e-6 at q = 150.
INNER_PLAIN = 2.0


def _chi_c_vec(act: _act.Activation, q: Array, sw2: Array, sb2: Array, chi_1: Array,
               n: int = N_2D, iters: int = 200, inner_plain: float = INNER_PLAIN) -> Array:
    """chi_c = sigma_w2 E[phi'(u1) phi'(u2)] at the stable correlation fixed point c*.

    Ordered phase (chi1 <= 1): c* = 1 and chi_c = chi1.  Chaotic phase: c* < 1
    is the other root of g(c) = cmap(c) - c, solved for eps = 1 - c -- near the
    critical line c* approaches 1, where c itself keeps too few digits:
    G(eps) = eps - D(eps), D(eps) = 1 - cmap(1 - eps)
    = sigma_w2 E[(phi(u1) - phi(u2))^2] / (2 q*) (q1 = q2 = q*), a mean of
    squares of differences formed on the nodes, with u2 - u1 carrying eps's
    own digits (no cancellation anywhere), and
    G'(eps) = 1 - sigma_w2 E[phi'(u1) phi'(u2)] (Price's theorem).  G is
    convex with G(0) = 0, G'(0) = 1 - chi1 < 0 and G(1) = cmap(0) >= 0, so
    Newton from eps = 1 (c = 0) descends monotonically onto eps* without
    overshooting; where G(1) = 0 (odd phi, sigma_b2 = 0) c* = 0.  Then
    chi_c = 1 - G'(eps*).  The descent uses the plain bivariate rule; where
    the graded one differs (large q*, or an inner integral wider than
    ``inner_plain`` span(n)), Newton steps with it finish from there.  Where
    the activation has closed forms of the two expectations (erf), they
    replace the quadrature.
    """
    out = np.array(chi_1, dtype=float, copy=True)
    idx = np.flatnonzero((chi_1 > 1.0) & np.isfinite(q))
    if not idx.size:
        return out
    q, sw2 = np.maximum(q[idx], Q_MIN), sw2[idx]

    polish = np.zeros(idx.size, dtype=bool)
    if act.corr_moments is None and not piecewise_linear(act):  # piecewise linear: the plain rule is exact
        polish = _graded_differs(q, 1.0, n, np.inf)  # q alone decides; the inner rule is judged at eps*

    def g_and_slope(eps: Array, rows: Array, graded: bool = False) -> tuple[Array, Array]:
        if act.corr_moments is not None:  # closed form (erf): no nodes at all
            d, dd = act.corr_moments(q[rows], eps)
        else:
            d, dd = _corr_moments(act, q[rows], eps, n, graded, inner_plain)
        return eps - sw2[rows] * d / q[rows], 1.0 - sw2[rows] * dd

    # where a graded polish follows, eps* to 1e-4 is close enough (two graded steps finish it)
    eps = _descend(g_and_slope, out, idx, np.where(polish, 1e-4, 1e-7), iters)
    if polish.any():
        _polish(g_and_slope, eps, out, idx, q, n, inner_plain)
    return out


def _graded_differs(q: Array, eps: Array | float, n: int, inner_plain: float) -> Array:
    """Cells whose graded bivariate rule differs from the plain one: the outer
    integral spans more than span(n) in u1, or the inner one more than
    ``inner_plain`` span(n) in u2."""
    b = np.sqrt(q * eps * (2.0 - eps))
    return (np.sqrt(q) * Z_MAX > span(n)) | (b * Z_MAX > inner_plain * span(n))


def _corr_moments(act: _act.Activation, q: Array, eps: Array, n: int, graded: bool,
                  inner_plain: float) -> tuple[Array, Array]:
    """(E[(phi(u1) - phi(u2))^2] / 2, E[phi'(u1) phi'(u2)]) at second moment q and
    correlation 1 - eps, by quadrature, in chunks of cells (nodes are (cells, m1, m2))."""
    d, dd = np.empty(q.size), np.empty(q.size)
    order = np.argsort(q, kind="stable")  # chunks of like q share a grading level (fewer nodes)
    for k in range(0, q.size, CHUNK_CELLS):
        sl = order[k:k + CHUNK_CELLS]
        e = eps[sl]
        u1, w1, u2, w2 = nodes_2d(q[sl], q[sl], 1.0 - e, act.kinks, act.kinks, n, eps=e, graded=graded,
                                  inner_plain=inner_plain)
        diff = act.phi(u1)[..., None] - act.phi(u2)
        sq = diff * diff
        if w2.strides[-2] != 0:  # the inner rule differs per outer node (a shared one is a broadcast view)
            inner, dinner = np.sum(w2 * sq, -1), np.sum(w2 * act.dphi(u2), -1)
        else:  # one shared inner rule: matrix products
            w0 = w2[(0,) * (w2.ndim - 1)]
            inner, dinner = sq @ w0, act.dphi(u2) @ w0
        d[sl] = 0.5 * np.sum(w1 * inner, -1)
        dd[sl] = np.sum(w1 * act.dphi(u1) * dinner, -1)
    return d, dd


def _descend(g_and_slope: Callable[..., tuple[Array, Array]], out: Array, idx: Array, tol: Array,
             iters: int) -> Array:
    """Monotone Newton from eps = 1 (see :func:`_chi_c_vec`), to a relative
    step ``tol`` per cell; writes chi_c = 1 - G'(eps) into ``out`` and returns
    eps* per cell.

    Newton's error after a step of relative size t is ~t^2 (quadratic
    convergence, G smooth), so a step below 1e-7 leaves eps* ~1e-14 off and
    chi_c (through G'' (eps - eps*)) as little: one evaluation fewer than
    waiting for a step below 1e-13."""
    rows = np.arange(idx.size)
    sol = np.ones(idx.size)
    eps = np.ones(idx.size)
    g, slope = g_and_slope(eps, rows)
    done = (g <= 1e-13) | ~(slope > 0)  # c* = 0 (up to round-off)
    out[idx[done]] = 1.0 - slope[done]
    rows, eps, g, slope, tol = rows[~done], eps[~done], g[~done], slope[~done], tol[~done]
    for _ in range(iters):
        if not rows.size:
            break
        new = np.clip(eps - g / slope, 0.0, eps)  # monotone from the right (convex G)
        g_new, s_new = g_and_slope(new, rows)
        stop = (np.abs(new - eps) <= tol * eps) | (g_new <= 0) | ~(s_new > 0)
        # G(new) <= 0 only by round-off (Newton from the right on a convex G stays right of eps*), so
        # new is within round-off of eps* and its slope is the one to keep (taking the previous
        # iterate's instead was 7e-10 off in chi_c for erf at sigma_b2 = 2); a slope <= 0 at new
        # (round-off, left of G's minimum) keeps the previous one
        ok = s_new[stop] > 0
        out[idx[rows[stop]]] = 1.0 - np.where(ok, s_new[stop], slope[stop])
        sol[rows[stop]] = np.where(ok, new[stop], eps[stop])
        keep = ~stop
        rows, eps, g, slope, tol = rows[keep], new[keep], g_new[keep], s_new[keep], tol[keep]
    out[idx[rows]] = 1.0 - slope
    sol[rows] = eps
    return sol


def _polish(g_and_slope: Callable[..., tuple[Array, Array]], eps: Array, out: Array, idx: Array,
            q: Array, n: int, inner_plain: float, steps: int = 12) -> None:
    """Newton steps with the graded bivariate rule from the eps* the plain one
    found, for the cells where the two rules differ (usually two steps).  G is
    convex, so from any point where G' > 0 Newton lands right of the root and
    then descends onto it; where the plain eps* is left of G's minimum (the
    plain rule far off: GELU at q* = 100 with 32 nodes put it at half eps*)
    eps doubles until G' > 0."""
    rows = np.flatnonzero(_graded_differs(q, eps, n, inner_plain))
    close = np.zeros(rows.size, dtype=bool)  # the step that led to eps was below 1e-7 eps
    for _ in range(steps):
        if not rows.size:
            return
        e = eps[rows]
        g, s = g_and_slope(e, rows, graded=True)
        good = s > 0
        out[idx[rows[good]]] = 1.0 - s[good]
        step = np.where(good, g / np.where(good, s, 1.0), 0.0)
        new = np.where(good, np.clip(e - step, 0.0, 1.0), np.minimum(1.0, 2.0 * e))
        # e is within ~(previous step / e)^2 of eps* (Newton): 1e-14 after a step of 1e-7 e, and the
        # slope kept is e's; or e is the root already
        stop = good & (close | (np.abs(step) <= 1e-13 * e))
        eps[rows] = np.where(stop, e, new)
        close = np.abs(new - e) <= 1e-7 * e
        rows, close = rows[~stop], close[~stop]


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
