"""Independent references for the theory tests (not collected: no ``test_`` prefix).

* erf: closed forms (Williams 1998) in 50-digit mpmath --
  E[erf(u1) erf(u2)] = (2/pi) asin(2 q c / (1 + 2q)),
  E[erf'(u1) erf'(u2)] = (4/pi) / sqrt((1 + 2q)^2 - (2 q c)^2).
* tanh and SiLU (odd and smooth non-odd): long-double (80-bit, eps 1.1e-19)
  Gauss-Legendre on fine fixed panels, written apart from the library's
  rule: panels of width 0.5 in the pre-activation over the activation's
  nonlinear region, geometric beyond it, plus unit panels in z; the
  bivariate moments in rotated coordinates u1,2 = sqrt(q) (alpha a +- beta b),
  alpha^2 = 1 - eps/2, beta^2 = eps/2, where
  D(eps) = E[phi(u1) (phi(u1) - phi(u2))] = E[(phi(u1) - phi(u2))^2] / 2
  is a mean of squares (no cancellation at all as eps = 1 - c -> 0).
* GELU: 30-digit mpmath quadrature (``mpmath.quad``) for one-dimensional moments.
"""

from __future__ import annotations

import functools

import mpmath as mp
import numpy as np
from numpy.polynomial.legendre import leggauss

LD = np.longdouble
_DPS = 50
Z_EDGE = 13.0  # Gaussian tail beyond 13 sd: 1.2e-38
PI_LD = 4 * np.arctan(LD(1))  # np.pi is the float64 value, 1.2e-16 off


# ---- erf, 50 digits -------------------------------------------------------------------------

def _mp(x):
    return mp.mpf(x) if not isinstance(x, mp.mpf) else x


def erf_qstar(w, b):
    """The attracting fixed point of q -> w (2/pi) asin(2q / (1 + 2q)) + b (0 when it collapses)."""
    with mp.workdps(_DPS):
        w, b = _mp(w), _mp(b)

        def h(q):
            return w * 2 / mp.pi * mp.asin(2 * q / (1 + 2 * q)) + b - q

        if b == 0 and w * 4 / mp.pi <= 1:
            return mp.mpf(0)
        lo, hi = mp.mpf(0), mp.mpf(1)
        while h(hi) > 0:
            lo, hi = hi, 2 * hi
        if b == 0:  # q = 0 is a (repelling) root too: step up to where h > 0
            lo = hi
            while h(lo) <= 0:
                lo /= 2
        for _ in range(30):  # bisection to a good start, then Newton (findroot's secant)
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if h(mid) > 0 else (lo, mid)
        return mp.findroot(h, (lo + hi) / 2)


def erf_chi1(w, b):
    with mp.workdps(_DPS):
        return _mp(w) * 4 / mp.pi / mp.sqrt(1 + 4 * erf_qstar(w, b))


def erf_xi_c(w, b):
    """xi_c = -1 / ln chi_c at the stable correlation fixed point, 50 digits."""
    with mp.workdps(_DPS):
        w, b = _mp(w), _mp(b)
        q = erf_qstar(w, b)
        chi1 = w * 4 / mp.pi / mp.sqrt(1 + 4 * q)
        if chi1 <= 1:
            return -1 / mp.log(chi1)
        s = 2 * q / (1 + 2 * q)

        def g(c):  # cmap(c) - c
            return (w * 2 / mp.pi * mp.asin(s * c) + b) / q - c

        if b == 0:
            c = mp.mpf(0)  # odd phi without bias: c* = 0
        else:
            lo, hi = mp.mpf(0), 1 - mp.mpf(10) ** -45  # g(0) > 0 > g(1 - delta) in the chaotic phase
            for _ in range(190):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if g(mid) > 0 else (lo, mid)
            c = (lo + hi) / 2
        return -1 / mp.log(w * 4 / mp.pi / mp.sqrt((1 + 2 * q) ** 2 - 4 * c * c * q * q))


def erf_critical(b):
    """sigma_w2 with chi1(q*) = 1 at sigma_b2 = b: q* = b + q*-independent closed form.

    On chi1 = 1, w = (pi/4) sqrt(1 + 4q) and q = w (2/pi) asin(2q / (1 + 2q)) + b."""
    with mp.workdps(_DPS):
        b = _mp(b)
        if b == 0:
            return mp.pi / 4

        def G(q):
            return mp.sqrt(1 + 4 * q) / 2 * mp.asin(2 * q / (1 + 2 * q)) + b - q

        q = mp.findroot(G, (b, 4 * b + 4), solver="anderson")
        return mp.pi / 4 * mp.sqrt(1 + 4 * q)


# ---- long-double Gauss-Legendre ---------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def gauss_legendre_ld(n):
    """Nodes and weights on [-1, 1] in long double: numpy's float64 rule polished
    by two Newton steps on P_n (three-term recurrence in long double)."""
    x = leggauss(n)[0].astype(LD)
    for _ in range(2):
        p0, p1 = np.ones_like(x), x.copy()
        for k in range(2, n + 1):
            p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
        dp = n * (x * p1 - p0) / (x * x - 1)
        x = x - p1 / dp
    p0, p1 = np.ones_like(x), x.copy()
    for k in range(2, n + 1):
        p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
    dp = n * (x * p1 - p0) / (x * x - 1)
    return x, 2 / ((1 - x * x) * dp * dp)


def _panels(breaks, n=16):
    """z nodes and N(0,1)-weighted weights on the sorted, unique ``breaks``."""
    e = np.unique(np.asarray(breaks, dtype=LD))
    x, w = gauss_legendre_ld(n)
    lo, hi = e[:-1, None], e[1:, None]
    half = (hi - lo) / 2
    z = (lo + half * (x + 1)).ravel()
    wz = (half * w).ravel() * np.exp(-z * z / 2) / np.sqrt(2 * PI_LD)
    return z, wz


def _axis(scale, spread=0.0, step=0.5, core=10.0):
    """Breaks in z for an integrand phi(scale * z + t), |t| <= spread: steps of
    ``step`` in x = scale * z over |x| <= core + spread, geometric (x 1.25)
    beyond up to the Gaussian's edge, and unit steps in z."""
    edge = Z_EDGE * scale
    reach = min(core + spread, edge)
    xs = list(np.arange(0.0, reach + step, step))
    while max(xs[-1], step) < edge:
        xs.append(max(xs[-1], step) * 1.25)
    xs = np.array(xs)
    zb = np.concatenate([-xs[::-1], xs]) / max(scale, 1e-300)
    zb = zb[np.abs(zb) < Z_EDGE]
    return np.concatenate([zb, np.arange(-Z_EDGE, Z_EDGE + 0.5, 1.0)])


def _tanh(x):
    return np.tanh(x)


def _dtanh(x):
    return 1 - np.tanh(x) ** 2


def _sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _silu(x):
    return x * _sigmoid(x)


def _dsilu(x):
    s = _sigmoid(x)
    return s * (1 + x * _sigmoid(-x))


LD_ACTS = {"tanh": (_tanh, _dtanh), "silu": (_silu, _dsilu)}


def moments_ld(act, q):
    """(E[phi^2], E[phi'^2], E[phi phi' x] / q) at pre-activation second moment q, long double."""
    phi, dphi = LD_ACTS[act]
    s = np.sqrt(LD(q))
    z, w = _panels(_axis(float(s)))
    x = s * z
    p, d = phi(x), dphi(x)
    return np.sum(w * p * p), np.sum(w * d * d), np.sum(w * p * d * x) / LD(q)


def mean_ld(act, q):
    """E[phi] at second moment q, long double."""
    phi, _ = LD_ACTS[act]
    s = np.sqrt(LD(q))
    z, w = _panels(_axis(float(s)))
    return np.sum(w * phi(s * z))


def corr_ld(act, q, eps):
    """(D, P) = (E[phi(u1) (phi(u1) - phi(u2))], E[phi'(u1) phi'(u2)]) at correlation 1 - eps."""
    phi, dphi = LD_ACTS[act]
    s, eps = np.sqrt(LD(q)), LD(eps)
    al, be = np.sqrt(1 - eps / 2), np.sqrt(eps / 2)
    za, wa = _panels(_axis(float(s * al), spread=Z_EDGE * float(s * be)))
    zb, wb = _panels(_axis(float(s * be), spread=Z_EDGE * float(s * al)))
    m = (s * al * za)[:, None]
    d = (s * be * zb)[None, :]
    u1, u2 = m + d, m - d
    diff = phi(u1) - phi(u2)
    D = wa @ (diff * diff) @ wb / 2
    P = wa @ (dphi(u1) * dphi(u2)) @ wb
    return D, P


def qstar_ld(act, w, b):
    """Attracting fixed point of q -> w E[phi^2] + b by Newton from above (long double)."""
    w, b = LD(w), LD(b)
    phi, dphi = LD_ACTS[act]
    zero = np.zeros(1, dtype=LD)
    if b == 0 and phi(zero)[0] == 0 and w * dphi(zero)[0] ** 2 <= 1:
        return LD(0)  # tanh-like, no bias, ordered: qmap(q) < q for every q > 0, the signal collapses
    q = LD(max(1.0, float(w + b)))
    for _ in range(200):  # grow until q is above the fixed point
        m2, _, _ = moments_ld(act, q)
        if w * m2 + b < q:
            break
        q *= 4
    last = LD(np.inf)
    for _ in range(100):
        m2, _, pdx = moments_ld(act, q)
        step = (w * m2 + b - q) / (w * pdx - 1)
        q = q - step
        if _converged(step, last, q):
            break
        last = abs(step)
    return q


def settle_ld(act, w, b, q0=1.0, steps=100000):
    """Where the length map q -> w E[phi^2] + b, iterated from q0, settles (long double)."""
    w, b, q = LD(w), LD(b), LD(q0)
    for _ in range(steps):
        new = w * moments_ld(act, q)[0] + b
        if abs(new - q) <= LD(1e-17) * q:
            return new
        q = new
    raise RuntimeError("the length map did not settle")


def _converged(step, last, x):
    """Newton has converged: a step below 1e-14 x (x is then ~1e-28 off), or
    the steps stopped shrinking below 1e-11 x (the round-off floor)."""
    return abs(step) <= LD(1e-14) * x or (abs(step) >= last / 2 and abs(step) <= LD(1e-11) * x)


def xi_c_ld(act, w, b):
    """xi_c at the stable correlation fixed point c* = 1 - eps* (eps* by Newton on
    G(eps) = eps - w D(eps) / q*, G' = 1 - w P), long double."""
    q = qstar_ld(act, w, b)
    w = LD(w)
    d2 = LD_ACTS[act][1](np.zeros(1, dtype=LD))[0] ** 2 if q == 0 else moments_ld(act, q)[1]
    chi1 = w * d2
    if chi1 <= 1:
        return -1 / np.log(chi1)
    # start right of the root, near it: G(0) = 0, G'(0) = 1 - chi1 and G(1) (c = 0: u1, u2 independent,
    # D(1) = Var[phi], one-dimensional) give a quadratic model whose root, doubled, is checked
    m1, m2 = mean_ld(act, q), moments_ld(act, q)[0]
    g1 = 1 - w * (m2 - m1 * m1) / q
    eps = min(LD(1), 2 * (chi1 - 1) / (g1 + chi1 - 1))
    while eps < 1 and eps - w * corr_ld(act, q, eps)[0] / q < 0:
        eps = min(LD(1), 2 * eps)
    last = LD(np.inf)
    for _ in range(100):
        D, P = corr_ld(act, q, eps)
        g, dg = eps - w * D / q, 1 - w * P
        step = g / dg
        eps = eps - step
        if _converged(step, last, eps):
            break
        last = abs(step)
    _, P = corr_ld(act, q, eps)
    return -1 / np.log(w * P)


def critical_ld(act, b, q_lo, q_hi):
    """sigma_w2 = 1 / E[phi'^2](q) where G(q) = E[phi^2]/E[phi'^2] + b - q changes sign in
    [q_lo, q_hi] (bisection in long double), with that q."""
    def G(q):
        m2, d2, _ = moments_ld(act, q)
        return m2 / d2 + LD(b) - q

    lo, hi = LD(q_lo), LD(q_hi)
    glo = G(lo)
    assert glo * G(hi) < 0, (act, b, q_lo, q_hi)
    for _ in range(90):
        mid = (lo + hi) / 2
        if (G(mid) > 0) == (glo > 0):
            lo = mid
        else:
            hi = mid
    q = (lo + hi) / 2
    return 1 / moments_ld(act, q)[1], q


# ---- GELU, mpmath quadrature ------------------------------------------------------------------

def gelu_moments_mp(q, dps=30):
    """(E[gelu^2], E[gelu'^2]) at second moment q by mpmath.quad split on a ladder of points."""
    with mp.workdps(dps):
        q = mp.mpf(q)
        s = mp.sqrt(q)
        pts = sorted({mp.mpf(0)} | {mp.mpf(2) ** k for k in range(-3, 8)} | {s * m for m in (0.25, 0.5, 1, 2, 4, 8)})
        pts = [-p for p in reversed(pts) if p > 0] + pts
        pts = [-40 * s] + pts + [40 * s]

        def dens(x):
            return mp.exp(-x * x / (2 * q)) / mp.sqrt(2 * mp.pi * q)

        m2 = mp.quad(lambda x: (x * mp.ncdf(x)) ** 2 * dens(x), pts)
        d2 = mp.quad(lambda x: (mp.ncdf(x) + x * mp.npdf(x)) ** 2 * dens(x), pts)
        return m2, d2
