"""Gaussian expectations E[f(sqrt(q) z)] and E[f(u1) g(u2)] by quadrature.

Why not plain Gauss-Hermite: its nodes are fixed in z, so as q grows the
transition region of tanh or sigmoid (|x| < ~3, i.e. |z| < 3/sqrt(q)) falls
between nodes.  Measured against ``scipy.integrate.quad``: 300-node
Gauss-Hermite is off by 7e-3 for E[tanh(10 z)^2]; the rule below is within
1e-14.  The rule: truncate z to [-Z, Z] with Z = 12 (Gaussian tail mass
3.6e-33, negligible for integrands of polynomial growth), split at every kink
of f and at x = 0 (mapped to z), and apply n-point Gauss-Legendre on each
piece.  Each piece's integrand is then smooth, so the error decays
geometrically in n; kinks are integrated exactly, not smoothed.

Large q: the activation's nonlinear part (|x| of order 1) shrinks to
|z| ~ 1 / sqrt(q), which one panel over [0, Z] no longer resolves (E[tanh'^2]
was 1.3e-10 off at q = 100, 1.7e-2 at q = 1e4, 94% at 1e6).  So the rule is
graded toward z = 0: breaks at +-Z / 2^k, k = 1..K, with K the least number of
levels that leaves the innermost panel spanning |x| <= span(n) = n / 4.
Measured against 30-digit mpmath quadrature for tanh, erf, SiLU and GELU,
E[phi^2] and E[phi'^2] at q = 1e-3..1e12: within 6e-16 relative with 40 or 96
nodes a piece, 1.4e-14 with 32.  K = 0 -- one panel a side -- up to
q = (span / Z)^2 (4 for 96 nodes); K grows as log2(sqrt(q)), 24 levels at
q = 1e15.  Activations linear between their kinks (ReLU family, hardtanh)
need no grading: the kink-split rule is exact for them at any q.

The bivariate rule grades its outer integral the same way, and its inner one
(per outer node) in doubling steps in u2 away from u2 = 0 when that integral
spans more than ``inner_plain`` span(n) in u2 (see :func:`nodes_2d`).

Everything is vectorized over arrays of q (and of c for the bivariate case),
so a whole phase-diagram grid is one call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from numpy.polynomial.legendre import leggauss

Array = np.ndarray
Z_MAX = 12.0
N_1D = 96  # nodes per piece (one-dimensional expectations)
N_2D = 40  # nodes per piece and axis for bivariate expectations
MAX_LEVELS = 60  # grading levels at most (q ~ 1e33 at 96 nodes; theory treats q > 1e15 as divergent)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _legendre_p(x: Array, n: int) -> tuple[Array, Array]:
    """P_n(x) and P_n'(x) by the three-term recurrence (x inside (-1, 1))."""
    p0, p1 = np.ones_like(x), x.copy()
    for k in range(2, n + 1):
        p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
    return p1, n * (x * p1 - p0) / (x * x - 1)


@functools.lru_cache(maxsize=16)
def _legendre(n: int) -> tuple[Array, Array]:
    """n-point Gauss-Legendre on [-1, 1], nodes and weights to ~1 ulp.

    numpy's ``leggauss`` weights are up to 1.5e-12 off each (96 nodes; they
    are rescaled to sum to 2), which biased every Gaussian expectation by
    ~1e-14 relative (the 96-node rule's weights summed to 1 - 1.4e-14).  Its
    nodes are polished here by two Newton steps on P_n and the weights
    recomputed as 2 / ((1 - x^2) P_n'(x)^2), all in long double (the
    three-term recurrence; where long double is float64 this is still 2e-16).
    """
    x = leggauss(n)[0].astype(np.longdouble)
    for _ in range(2):
        p, dp = _legendre_p(x, n)
        x = x - p / dp
    dp = _legendre_p(x, n)[1]
    w = (2 / ((1 - x * x) * dp * dp)).astype(float)
    x = x.astype(float)
    x.setflags(write=False)
    w.setflags(write=False)
    return x, w


def _pieces(breaks: Array, n: int) -> tuple[Array, Array]:
    """Nodes and weights in z for E over N(0,1), split at ``breaks``.

    ``breaks`` has shape (..., k) in z; returns arrays of shape (..., (k+1)*n)
    whose weights already include the Gaussian density.
    """
    shape = breaks.shape[:-1]
    lo_end = np.full(shape + (1,), -Z_MAX)
    hi_end = np.full(shape + (1,), Z_MAX)
    edges = np.concatenate([lo_end, np.sort(np.clip(breaks, -Z_MAX, Z_MAX), axis=-1), hi_end], -1)
    lo, hi = edges[..., :-1, None], edges[..., 1:, None]
    x, w = _legendre(n)
    half = 0.5 * (hi - lo)
    z = lo + half * (x + 1.0)
    wz = half * w * np.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return z.reshape(shape + (-1,)), wz.reshape(shape + (-1,))


def _kink_breaks(kinks: tuple[float, ...], centre: Array, scale: Array) -> Array:
    """Break points in z where centre + scale * z hits 0 or a kink."""
    pts = np.asarray(sorted(set(kinks) | {0.0}), dtype=float)
    scale = np.maximum(scale, 1e-300)
    return (pts - centre[..., None]) / scale[..., None]


def span(n: int) -> float:
    """The widest |x| span one n-node panel of the rule integrates to ~1e-14
    relative or better: n / 4 (measured, module docstring)."""
    return n / 4.0


def levels(scale: Array | float, n: int) -> int:
    """Grading levels K for Gaussian scale(s) ``scale`` (sqrt(q)): the least K
    with Z scale / 2^K <= span(n) for the largest finite scale, 0 if none."""
    s = np.asarray(scale, dtype=float).ravel()
    s = s[np.isfinite(s)]
    return level(float(np.max(s)), n) if s.size else 0


def level(scale: float, n: int) -> int:
    """:func:`levels` of one finite scale (sqrt(q)), in plain floats."""
    top = scale * Z_MAX
    if not top > span(n):
        return 0
    return min(MAX_LEVELS, math.ceil(math.log2(top / span(n))))


def level_groups(q: Array, n: int) -> list[Array] | None:
    """Flat indices of ``q`` grouped by :func:`level` of sqrt(q) (each group
    then takes the rule of its own level: a few large q do not grade every
    other one); None when they all share one level."""
    s = np.sqrt(np.maximum(np.asarray(q, dtype=float).ravel(), 0.0))
    with np.errstate(invalid="ignore"):
        top = s * Z_MAX / span(n)
        k = np.where(np.isfinite(top) & (top > 1.0), np.minimum(MAX_LEVELS, np.ceil(np.log2(top))), 0.0)
    if k.size == 0 or k.min() == k.max():
        return None
    return [np.flatnonzero(k == v) for v in np.unique(k)]


def _ladder(k: int) -> Array:
    """The graded breaks in z: +-Z / 2^j, j = 1..k."""
    half = Z_MAX * 0.5 ** np.arange(1, k + 1)
    return np.concatenate([-half, half])


def nodes_1d(q: Array | float, kinks: tuple[float, ...] = (), n: int = N_1D,
             graded: bool = True) -> tuple[Array, Array]:
    """Pre-activation nodes x and weights w with sum(w * f(x)) = E[f(sqrt(q) z)].

    Shapes: q's shape plus one trailing axis.  The grading (module docstring)
    is chosen for the largest q of the array and shared by all of them;
    ``graded=False`` leaves it out (f linear between its kinks: exact anyway).
    """
    q = np.asarray(q, dtype=float)
    s = np.sqrt(np.maximum(q, 0.0))
    k = levels(s, n) if graded else 0
    if all(kk == 0.0 for kk in kinks):  # breaks at z = 0 whatever q is: the same rule, scaled
        z0, w0 = _standard_pieces(n, k)
        return s[..., None] * z0, np.broadcast_to(w0, s.shape + w0.shape)
    breaks = _kink_breaks(kinks, np.zeros_like(s), s)
    breaks = np.concatenate([breaks, np.broadcast_to(_ladder(k), s.shape + (2 * k,))], -1)
    z, w = _pieces(breaks, n)
    return s[..., None] * z, w


@functools.lru_cache(maxsize=64)
def _standard_pieces(n: int, k: int = 0) -> tuple[Array, Array]:
    """The rule of :func:`nodes_1d` for q = 1 split only at 0 (no kink
    elsewhere), graded with ``k`` levels: scaled by sqrt(q) it serves every q
    whose :func:`levels` is ``k``."""
    z, w = _pieces(np.concatenate([np.zeros(1), _ladder(k)]), n)
    z.setflags(write=False)
    w.setflags(write=False)
    return z, w


def expect(f: Callable[[Array], Array], q: Array | float, kinks: tuple[float, ...] = (),
           n: int = N_1D) -> Array:
    """E[f(sqrt(q) z)], z ~ N(0, 1), vectorized over ``q``."""
    x, w = nodes_1d(q, kinks, n)
    return np.sum(w * f(x), axis=-1)


def nodes_2d(q1: Array | float, q2: Array | float, c: Array | float,
             kinks_f: tuple[float, ...] = (), kinks_g: tuple[float, ...] = (),
             n: int = N_2D, eps: Array | float | None = None,
             graded: bool = True, inner_plain: float = 2.0) -> tuple[Array, Array, Array, Array]:
    """Nodes for E[f(u1) g(u2)], (u1, u2) jointly Gaussian with second moments
    q1, q2 and correlation c: returns u1 (..., m1), w1 (..., m1), u2 (..., m1, m2)
    and w2 (..., m1, m2) with E = sum(w1 * f(u1) * sum(w2 * g(u2), -1), -1).

    Written as u1 = sqrt(q1) z1, u2 = sqrt(q2) (c z1 + sqrt(1-c^2) z2): the
    outer rule splits z1 at f's kinks and at 0, the inner one splits z2 at
    g's kinks (which move with z1) *and at z2 = 0*, the peak of the Gaussian
    weight -- without it, as c -> 1 g's breaks leave [-Z, Z] and one coarse
    panel remained.  ``eps``: 1 - c when known more precisely than c itself
    (near c = 1, where 1 - c^2 = eps (2 - eps) keeps its digits, and u2's
    centre sqrt(q2) (z1 - eps z1) keeps eps's: rounding 1 - eps to c was a
    relative 1e-10 of eps at eps = 1e-6).  ``graded``: the outer rule graded
    toward z1 = 0 as the 1-D one (module docstring), and the inner one, per
    outer node, in doubling steps in u2 from span(n) away from u2 = 0 once
    the inner integral spans more than ``inner_plain`` span(n) in u2 (the
    shared plain rule is within 2e-13 of long-double quadrature up to
    2 span(40) for tanh, 1e-10 at 27 (q = 5, c = 0), 2e-6 at q = 150).
    """
    q1a, q2a, ca = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (q1, q2, c)))
    cc = np.clip(ca, -1.0, 1.0)
    if eps is None:
        sc = np.sqrt(np.maximum(1.0 - cc * cc, 0.0))
    else:
        e = np.broadcast_to(np.clip(np.asarray(eps, dtype=float), 0.0, 2.0), cc.shape)
        cc, sc = 1.0 - e, np.sqrt(e * (2.0 - e))
    q1, q2, c = q1a, q2a, cc
    s1, s2 = np.sqrt(np.maximum(q1, 0.0)), np.sqrt(np.maximum(q2, 0.0))
    k1 = levels(s1, n) if graded else 0
    br1 = _kink_breaks(kinks_f, np.zeros_like(s1), s1)
    br1 = np.concatenate([br1, np.broadcast_to(_ladder(k1), s1.shape + (2 * k1,)),
                          _kink_shadows(kinks_g, s2, cc, sc)], -1)
    z1, w1 = _pieces(br1, n)  # (..., m1)
    if eps is None:
        a = (s2 * c)[..., None] * z1  # centre of u2 given z1
    else:  # sqrt(q2) (1 - eps) z1 with eps's own digits (u1 - u2 is of order eps near c = 1)
        a = s2[..., None] * z1 - (s2 * e)[..., None] * z1
    b = np.broadcast_to((s2 * sc)[..., None], a.shape)
    reach = _inner_points(float(np.max(b, initial=0.0, where=np.isfinite(b))), n, inner_plain) if graded else 0
    if kinks_g or reach:  # g's kinks (0 at least) move with z1: the inner rule per node of the outer one
        breaks = [_kink_breaks(kinks_g, a, b), np.zeros(a.shape + (1,))]  # and z2 = 0
        if reach:  # graded in u2 toward 0 (its nonlinear part), in doubling steps from span(n)
            breaks.append(_inner_ladder(a, b, reach, n))
        z2, w2 = _pieces(np.concatenate(breaks, -1), n)  # (..., m1, m2)
    else:  # smooth g: one fixed rule in z2, split at 0 (built once, shared by every cell)
        z0, w0 = _standard_pieces(n)
        z2, w2 = np.broadcast_to(z0, a.shape + z0.shape), np.broadcast_to(w0, a.shape + w0.shape)
    return s1[..., None] * z1, w1, a[..., None] + b[..., None] * z2, w2


def _kink_shadows(kinks_g: tuple[float, ...], s2: Array, c: Array, sc: Array) -> Array:
    """Outer breaks where the inner integral turns: g's kink k at u2 = k crosses
    the inner Gaussian's bulk for z1 within a few sc / |c| of k / (sqrt(q2) c)
    -- a sharp (near c = 1), smooth step in z1 that one outer panel resolves
    badly unless it sits at a break: at 0 it does (f's own break), for k != 0
    (hardtanh's +-1) it is off f's kink k / sqrt(q1) by ~(1 - c) k / sqrt(q2),
    and the xi_c of hardtanh was 1e-4 off beside its critical line.  Breaks
    at the centre and 2 and 5 widths either side (the step's tail is below
    e^-12 beyond)."""
    ks = [k for k in sorted(set(kinks_g)) if k != 0.0]
    if not ks:
        return np.zeros(s2.shape + (0,))
    with np.errstate(all="ignore"):  # c = 0 or q2 = 0: no such step (the points are dropped)
        centre = np.stack([k / (s2 * c) for k in ks], -1)
        width = (sc / np.abs(c))[..., None, None] * np.array([-5.0, -2.0, 0.0, 2.0, 5.0])
        pts = (centre[..., None] + width).reshape(s2.shape + (-1,))
    return np.where(np.isfinite(pts), pts, 0.0)


def _inner_points(b: float, n: int, inner_plain: float) -> int:
    """How many doubling points per side the inner rule needs when u2 = a + b z2
    spans 2 Z b: none while one panel per side spans at most inner_plain span(n)."""
    if not b * Z_MAX > inner_plain * span(n):
        return 0
    return math.ceil(math.log2(1.0 + 2.0 * Z_MAX * b / span(n))) + 1


def _inner_ladder(a: Array, b: Array, reach: int, n: int) -> Array:
    """Breaks in z2 where u2 = a + b z2 = +-span(n) 2^j, for ``reach``
    consecutive j from the one just below the range's distance to 0: every
    panel then spans at most span(n) in u2 or lies in [x, 2x] (x >= span(n)),
    wherever the range [a - Z b, a + Z b] sits; points outside it are clipped."""
    gap = np.maximum(np.abs(a) - Z_MAX * b, span(n))
    j0 = np.floor(np.log2(gap / span(n)))
    pts = span(n) * np.exp2(j0[..., None] + np.arange(reach))
    pts = np.concatenate([pts, -pts], -1)
    return (pts - a[..., None]) / np.maximum(b, 1e-300)[..., None]


def expect2(f: Callable[[Array], Array], g: Callable[[Array], Array], q1: Array | float,
            q2: Array | float, c: Array | float, kinks_f: tuple[float, ...] = (),
            kinks_g: tuple[float, ...] = (), n: int = N_2D) -> Array:
    """E[f(u1) g(u2)] for jointly Gaussian (u1, u2) with second moments q1, q2
    and correlation c, vectorized over broadcast (q1, q2, c); see :func:`nodes_2d`."""
    u1, w1, u2, w2 = nodes_2d(q1, q2, c, kinks_f, kinks_g, n)
    return np.sum(w1 * f(u1) * np.sum(w2 * g(u2), axis=-1), axis=-1)
