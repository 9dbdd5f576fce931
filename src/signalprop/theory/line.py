"""The critical line chi1 = 1 at a given sigma_b2 (the edge of chaos), or why there is none."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import activations as _act
from .maps import NoCriticalPointError, _check_params, _chi1_at, _fixed_point_vec, at_zero, gaussian_moments

Array = np.ndarray
Q_GRID = np.geomspace(1e-8, 1e8, 97)  # where the critical q is looked for


def critical_sigma_w2(act: Any, sigma_b2: float = 0.0, *, lo: float = 1e-2, hi: float = 1e4) -> float:
    """The sigma_w2 in [lo, hi] at which chi1(q*) = 1 for the given sigma_b2 (the edge of chaos).

    Solved as one equation in q rather than a root search over sigma_w2 with
    a fixed-point solve inside: chi1 = 1 fixes ``sigma_w2(q) = 1 / E[phi'^2](q)``,
    and q must be a fixed point of the q-map at that weight,
    ``G(q) = E[phi^2](q) / E[phi'^2](q) + sigma_b2 - q = 0``.  Sign changes of G
    on a log grid of q in [1e-8, 1e8] are refined by Brent's method, and a
    root is accepted only if q is the *attracting* fixed point at
    sigma_w2(q) -- the one a deep network's q settles at.

    Raises :class:`NoCriticalPointError` (a ValueError) saying why when no
    such point exists: ReLU with sigma_b2 > 0 (G = sigma_b2 > 0: q diverges
    on chi1 = 1); SiLU, GELU and Mish at sigma_b2 = 0 (G < 0 for every q > 0,
    and q* = 0 repels); SiLU at sigma_b2 = 0.5 (G's one root, q = 11.5,
    repels: the length map's slope there is above 1, so q runs away from it).

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
    qs = Q_GRID
    m = gaussian_moments(a, qs, ("m2", "d2"))
    g = m["m2"] / m["d2"] + sigma_b2 - qs
    if np.all(np.abs(g) <= 1e-10 * np.maximum(1.0, qs)):  # every q critical: positively homogeneous phi
        return _in_range(a, float(1.0 / m["d2"][np.searchsorted(qs, 1.0)]), sigma_b2, lo, hi)
    if np.all(g > 0):
        raise NoCriticalPointError(
            f"{a.name}: on the line chi1 = 1 the length map has qmap(q) > q for every q up to "
            f"{qs[-1]:g}, so q diverges with sigma_b2={sigma_b2:g}: no finite fixed point is "
            "critical (for ReLU-like activations use sigma_b2 = 0)"
        )
    why: list[str] = []
    at_zero = _critical_at_zero(a) if sigma_b2 == 0 else None
    if at_zero is not None:
        w0, reason = at_zero
        if reason is None:
            return _in_range(a, w0, sigma_b2, lo, hi)
        why.append(reason)

    def G(q: float) -> float:
        r = gaussian_moments(a, np.float64(q), ("m2", "d2"))
        return float(r["m2"] / r["d2"] + sigma_b2 - q)

    # m2 / d2 carries ~1e-15 relative round-off, so |G| below ~1e-12 q is noise: for
    # tanh at sigma_b2 = 0, G ~ -4/3 q^3 sinks into it below q ~ 1e-6 and fakes roots.
    # Sign changes count only between points where G is above that floor.
    reliable = np.flatnonzero(np.abs(g) > 1e-12 * qs)
    gr, qr = g[reliable], qs[reliable]
    candidates = [brentq(G, qr[i], qr[i + 1], xtol=1e-15, rtol=1e-14)
                  for i in np.flatnonzero((gr[:-1] > 0) & (gr[1:] <= 0))]
    for q in candidates:
        r = gaussian_moments(a, np.float64(q), ("d2", "pdx"))
        w = float(1.0 / r["d2"])
        q_att = float(_fixed_point_vec(a, np.float64(w), np.float64(sigma_b2)))
        if math.isfinite(q_att) and abs(q_att - q) <= 1e-6 * max(1.0, q):
            return _in_range(a, w, sigma_b2, lo, hi)
        why.append(_repels(a, q, w, float(w * r["pdx"]), q_att, sigma_b2))
    if not candidates:
        why.append(f"G(q) = E[phi^2]/E[phi'^2] + sigma_b2 - q, whose roots are the critical q, never turns from "
                   f"+ to - for q in [{qs[0]:g}, {qs[-1]:g}], so on the line chi1 = 1 no q is an attracting "
                   f"fixed point (G < 0 from q = {qr[np.argmax(gr < 0)]:.3g} on: there the weight that makes "
                   "chi1 = 1 pulls q lower, to where chi1 < 1)")
    raise NoCriticalPointError(f"{a.name}: no attracting critical point at sigma_b2={sigma_b2:g}: " + "; ".join(why))


def _critical_at_zero(a: _act.Activation) -> tuple[float, str | None] | None:
    """sigma_b2 = 0 and phi(0) = 0: q* = 0 is a fixed point, critical at
    sigma_w2 = 1 / lim_{q -> 0} E[phi'(sqrt(q) z)^2] -- 1 / phi'(0)^2 exactly,
    or one over the mean of the two one-sided slopes squared where phi' jumps
    at 0 (SELU; phi'(0) alone gave 0.324 instead of 0.477).  Returns that weight and None when q* = 0
    attracts there -- the length map has qmap(q) < q just above 0 (tanh:
    q - 4/3 q^3 ...; hardtanh: q minus its clipped tails) -- else the reason it
    does not (SiLU: q + 3/4 q^2 ...); None when phi(0) != 0 (no such point)."""
    lim = at_zero(a)
    if abs(lim["m1"]) > 1e-15:
        return None
    d2 = lim["d2"]
    if d2 == 0:
        return math.nan, "phi' vanishes at 0, so chi1 -> 0 as q* -> 0"
    w0 = 1.0 / d2
    small = np.geomspace(1e-4, 1.0, 17)
    gap = w0 * gaussian_moments(a, small, ("m2",))["m2"] - small
    sure = np.flatnonzero(np.abs(gap) > 1e-12 * small)
    if sure.size and gap[sure[0]] < 0:
        return w0, None
    return w0, (f"q* = 0 is critical at sigma_w2 = {w0:.6g} but repels there (qmap(q) > q just above 0: "
                f"{gap[sure[0]]:+.2g} at q = {small[sure[0]]:g})" if sure.size else
                f"q* = 0 is critical at sigma_w2 = {w0:.6g} but there the length map is q itself to 12 "
                "digits for q <= 1, so it does not attract")


def _repels(a: _act.Activation, q: float, w: float, slope: float, q_att: float, sigma_b2: float) -> str:
    """Why the root q of G (critical at sigma_w2 = w) is not where the layers settle."""
    head = f"q = {q:.6g} is critical at sigma_w2 = {w:.6g}"
    if slope > 1.0:
        head += f" but repels (the length map's slope there is {slope:.6g} > 1)"
    if not math.isfinite(q_att):
        return head + ": from any q above it, q grows without bound at that weight"
    chi = float(_chi1_at(a, np.float64(q_att), np.float64(w)))
    return head + f": at that weight the layers settle at q = {q_att:.6g} instead, where chi1 = {chi:.6g}"


def _in_range(a: _act.Activation, w: float, sigma_b2: float, lo: float, hi: float) -> float:
    if not lo <= w <= hi:
        raise NoCriticalPointError(
            f"chi1 of {a.name} does not cross 1 for sigma_w2 in [{lo:g}, {hi:g}] at "
            f"sigma_b2={sigma_b2:g} (it does at sigma_w2 = {w:.6g})"
        )
    return w
