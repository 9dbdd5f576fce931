"""Mean-field signal propagation: q-map, c-map, fixed points, chi1, the critical line.

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
from .gaussian import N_1D, _standard_pieces, expect2, level, level_groups, nodes_1d

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
_LINEAR_PIECES: dict[Callable[[Array], Array], bool] = {}


def piecewise_linear(a: _act.Activation) -> bool:
    """Whether phi' is constant between phi's kinks (ReLU family, linear,
    hardtanh): the kink-split Gaussian rule is then exact at every q and
    needs no grading toward large q.  Read once per activation on a grid
    over [-60, 60] and at +-1e6."""
    if a.phi not in _LINEAR_PIECES:
        edges = np.array([-np.inf, *sorted(set(a.kinks)), np.inf])
        x = np.concatenate([np.linspace(-60.0, 60.0, 4801), [-1e6, 1e6]])
        x = x[~np.isin(x, edges)]
        with np.errstate(all="ignore"):
            d = np.asarray(a.dphi(x), dtype=float)
        piece = np.searchsorted(edges, x)
        flat = bool(np.all(np.isfinite(d)))
        for k in np.unique(piece):
            dk = d[piece == k]
            flat = flat and bool(np.all(np.abs(dk - dk[0]) <= 1e-12 * max(1.0, abs(dk[0]))))
        _LINEAR_PIECES[a.phi] = flat
    return _LINEAR_PIECES[a.phi]


def gaussian_moments(act: Any, q: Array | float, which: tuple[str, ...] = ("m2", "d2"),
                     n: int = N_1D) -> dict[str, Array]:
    """E[phi(h)], E[phi(h)^2], E[phi'(h)^2], E[phi'(h)^4] and the q-derivatives
    theory uses ("m1", "m2", "d2", "d4", "dm1", "pdx"), h ~ N(0, q), vectorized
    over q: the one routine every map, critical point and spectrum reads.
    Closed forms where the activation has them (E[phi^2], E[phi'^2] of linear,
    ReLU family, erf, hardtanh); otherwise all on one shared set of
    kink-aware quadrature nodes, graded for large q (see
    :mod:`signalprop.theory.gaussian`), each q on the rule of its own grading
    level.  At q = 0 exactly, the q -> 0 limits (:func:`at_zero`).
    (Bivariate expectations at a correlation c are
    :func:`signalprop.theory.expect2`'s.)"""
    a = _act.resolve(act)
    unknown = sorted(set(which) - set(_INTEGRANDS))
    if unknown:
        raise ValueError(f"unknown Gaussian moment(s) {unknown}; choose from {sorted(_INTEGRANDS)}")
    q0 = np.asarray(q, dtype=float)
    qa = np.maximum(q0, Q_MIN)
    out = _moments_of(a, qa, which, n)
    if np.any(q0 == 0.0):
        # q = 0 exactly (q* = 0: sigma_b2 = 0 in the ordered phase): the q -> 0 limits, not the
        # floor Q_MIN's values (E[erf'^2] is 2e-12 lower there, which put xi_c 2e-6 off at 1e-6
        # below erf's critical point)
        exact = at_zero(a)
        for k in set(out) & set(exact):
            out[k] = np.where(q0 == 0.0, exact[k], out[k])
    return out


def at_zero(a: _act.Activation) -> dict[str, float]:
    """The limits as q -> 0 of E[phi], E[phi^2], E[phi'^2], E[phi'^4]: phi(0)^k,
    and the mean of the k-th powers of phi''s two one-sided values at 0 (they
    differ where phi' jumps at 0: ReLU's E[phi'^2] -> 1/2, SELU's)."""
    p0 = float(a.phi(np.zeros(1))[0])
    dm, dp = (float(v) for v in a.dphi(np.array([-5e-324, 5e-324])))
    return {"m1": p0, "m2": p0 * p0, "d2": (dm * dm + dp * dp) / 2, "d4": (dm ** 4 + dp ** 4) / 2}


def _moments_of(a: _act.Activation, qa: Array, which: tuple[str, ...], n: int) -> dict[str, Array]:
    """:func:`gaussian_moments` at q >= Q_MIN."""
    out: dict[str, Array] = {}
    if "m2" in which and a.second_moment is not None:
        out["m2"] = np.asarray(a.second_moment(qa), dtype=float)
    if "d2" in which and a.deriv_second_moment is not None:
        out["d2"] = np.asarray(a.deriv_second_moment(qa), dtype=float)
    todo = [k for k in which if k not in out]
    if not todo:
        return out
    need_p, need_d = any(k in _USES_PHI for k in todo), any(k not in ("m1", "m2") for k in todo)
    graded = not piecewise_linear(a)
    if qa.ndim == 0 and all(k == 0.0 for k in a.kinks):
        # one q (a layer of propagate's recursion): the q = 1 rule of its level scaled, dot products
        s = math.sqrt(float(qa))
        z0, w0 = _standard_pieces(n, level(s, n) if graded else 0)
        x = s * z0
        p, d = (a.phi(x) if need_p else None), (a.dphi(x) if need_d else None)
        out.update({k: w0 @ _INTEGRANDS[k](x, p, d, qa) for k in todo})  # type: ignore[arg-type]
        return out
    groups = level_groups(qa, n) if graded else None
    if groups is None:  # one rule for all
        x, w = nodes_1d(qa, a.kinks, n, graded)
        p, d = (a.phi(x) if need_p else None), (a.dphi(x) if need_d else None)
        out.update({k: np.sum(w * _INTEGRANDS[k](x, p, d, qa), -1) for k in todo})  # type: ignore[arg-type]
        return out
    flat = qa.ravel()
    res = {k: np.empty(flat.shape) for k in todo}
    for ix in groups:  # each q on the rule of its own grading level
        qs = flat[ix]
        x, w = nodes_1d(qs, a.kinks, n)
        p, d = (a.phi(x) if need_p else None), (a.dphi(x) if need_d else None)
        for k in todo:
            res[k][ix] = np.sum(w * _INTEGRANDS[k](x, p, d, qs), -1)  # type: ignore[arg-type]
    out.update({k: v.reshape(qa.shape) for k, v in res.items()})
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
    steps = list(zip(forms, integrands))

    graded = not piecewise_linear(a)
    zero = at_zero(a)  # gaussian_moments' values at q = 0 exactly
    zeros = [zero.get(k) for k in which]

    def at(q: float) -> tuple[float, ...]:
        qf = float(q)
        qa = np.float64(Q_MIN if qf < Q_MIN else qf)  # np.maximum's: a NaN stays NaN
        s = math.sqrt(qa)
        z0, w0 = _standard_pieces(n, level(s, n) if graded else 0)
        x = s * z0
        p = phi(x) if phi is not None else None
        d = dphi(x) if dphi is not None else None
        out = [float(form(qa)) if form is not None else float(w0 @ f(x, p, d, qa))  # type: ignore[arg-type]
               for form, f in steps]
        if qf == 0.0:
            out = [v if z is None else z for v, z in zip(out, zeros)]
        return tuple(out)

    return at


def _second_moment(act: _act.Activation, q: Array | float, n: int = N_1D) -> Array:
    return gaussian_moments(act, q, ("m2",), n)["m2"]


def _deriv_second_moment(act: _act.Activation, q: Array | float, n: int = N_1D) -> Array:
    return gaussian_moments(act, q, ("d2",), n)["d2"]


def _qmap_slope(act: _act.Activation, q: Array | float, sw2: Array | float, sb2: Array | float,
                n: int = N_1D) -> tuple[Array, Array]:
    """qmap(q) and d qmap / dq = sigma_w2 * E[phi(x) phi'(x) x] / q (Stein's lemma
    form of Schoenholz's chi_q = sigma_w2 E[phi'^2 + phi phi''], which needs no phi'')."""
    m = gaussian_moments(act, q, ("m2", "pdx"), n)
    return sw2 * m["m2"] + sb2, sw2 * m["pdx"]


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
        hh, _ = h(hi, todo)
        grow = np.flatnonzero(hh >= 0)
        while grow.size:  # grow hi until h(hi) < 0, or give up at Q_MAX: q diverges
            lo[grow] = hi[grow]
            # x 4, then x 256 past 1e4: large q is dearer (graded rule) and far fewer steps reach Q_MAX
            hi[grow] *= np.where(hi[grow] < 1e4, 4.0, 256.0)
            hh[grow] = h(hi[grow], todo[grow])[0]
            grow = grow[(hh[grow] >= 0) & (hi[grow] < Q_MAX)]
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
    grows without bound (the signal explodes with depth): qmap(q) > q up to
    q = 1e15, judged on moments accurate at any q (a one-panel rule's error
    made SiLU's length map at sigma_w2 = 2, sigma_b2 = 0.5 turn back at
    q ~ 4e5 and report a fixed point where q in fact keeps growing).
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
