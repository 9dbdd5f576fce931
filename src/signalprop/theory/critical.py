"""Choosing a point on the critical line: the (sigma_w2, sigma_b2, q*) a layer gets.

On the critical line chi1 = sigma_w2 E[phi'(sqrt(q*) z)^2] = 1, and q* is a
fixed point of the length map.  The line is one-dimensional: each q* gives
sigma_w2 = 1 / E[phi'^2](q*) and sigma_b2 = q* - sigma_w2 m(q*), where m is
E[phi^2], or Var[phi] when the weights annihilate the constant direction.

Which q*: Pennington et al. (2017) -- with orthogonal weights the squared
singular values of a depth-L Jacobian have variance L (mu2 / mu1^2 - 1), and
for tanh-like activations mu2 / mu1^2 - 1 -> 0 as q* -> 0.  So q* is the
largest value for which that spread stays below ``isometry`` at the given
depth (tanh at L = 1000: q* ~= 0.01).  Activations whose derivative is not
constant near 0 (ReLU: mu2 / mu1^2 = 2 at every q) cannot reach isometry;
they get q* = 1.

The mean: sigmoid, softplus, GELU and the ReLU family have E[phi] != 0, a
constant vector on every layer's input that carries no information but
dominates the second moment (a quarter of sigmoid's 0.29 at q = 1).  For
these the next layer removes it -- through its bias, b -= mu W 1, keeping W
fully orthogonal (weights that annihilated the all-ones vector would also
kill that direction of the gradient, a leak that compounds over depth) --
and the length map becomes sigma_w2 Var[phi] + sigma_b2 ("centered").
For sigmoid this is exact: sigmoid(x) = 1/2 + tanh(x / 2) / 2, so a centered
sigmoid stack is a tanh stack in disguise and inherits its small-q* critical
point (sigma_w2 = 16 at q* -> 0 instead of ~103 at q* ~= 56 uncentered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import activations as _act
from .gaussian import N_1D
from .maps import NoCriticalPointError, gaussian_moments

MEAN_TOL = 1e-6  # |E[phi]| / sqrt(E[phi^2]) above this: centre the weights


@dataclass(frozen=True)
class CriticalPoint:
    activation: str
    q_star: float
    sigma_w2: float
    sigma_b2: float
    chi1: float
    centered: bool
    slope: float  # d qmap / dq at q*: < 1 means q* attracts
    spread: float  # predicted variance of J J^T's eigenvalues at the depth asked (orthogonal weights)
    mean: float = 0.0  # E[phi(sqrt(q*) z)]: what the next layer removes when centered
    note: str = ""


def _stats(a: _act.Activation, q: np.ndarray) -> dict[str, np.ndarray]:
    return gaussian_moments(a, q, ("m1", "m2", "d2", "dm1", "d4", "pdx"), N_1D)


def critical_point(act: Any, *, depth: int = 1, isometry: float = 0.25, q_star: float | None = None,
                   center: bool | None = None) -> CriticalPoint:
    """The critical (sigma_w2, sigma_b2) for ``act`` with q* chosen as above
    (or given), for a stack of ``depth`` layers with orthogonal weights.

    ``center``: None decides from E[phi] at q*; True/False forces it.
    """
    a = _act.resolve(act)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    qs = np.geomspace(1e-6, 1.0, 121) if q_star is None else np.array([float(q_star)])
    s = _stats(a, qs)
    cen = (np.abs(s["m1"]) > MEAN_TOL * np.sqrt(s["m2"])) if center is None else np.full(qs.shape, bool(center))
    m = np.where(cen, s["m2"] - s["m1"] ** 2, s["m2"])
    sw2 = 1.0 / s["d2"]
    sb2 = qs - sw2 * m
    # d/dq of the (centered) length map: sigma_w2 (E[phi phi' x]/q - [2 E[phi] E[phi' x]/(2q)])
    slope = sw2 * (s["pdx"] - np.where(cen, 2.0 * s["m1"] * s["dm1"], 0.0))
    spread = depth * (s["d4"] / s["d2"] ** 2 - 1.0)
    ok = (sb2 >= -1e-12 * qs) & (slope < 1.0 + 1e-9) & np.isfinite(sw2)
    if not ok.any():
        raise NoCriticalPointError(
            f"{a.name}: no q* in [{qs[0]:g}, {qs[-1]:g}] has a non-negative bias variance and an attracting "
            "fixed point on the critical line")
    note = ""
    good = ok & (spread <= isometry)
    if q_star is not None:
        i = 0
    elif good.any():
        i = int(np.flatnonzero(good)[-1])
    else:
        i = int(np.flatnonzero(ok)[-1])
        note = (f"no dynamical isometry for {a.name}: mu2/mu1^2 - 1 >= {float(np.min(spread[ok]) / depth):.3g} "
                f"at every q*, so the Jacobian spread grows as {float(np.min(spread[ok]) / depth):.3g} x depth")
    chi = float(sw2[i] * s["d2"][i])
    return CriticalPoint(a.name, float(qs[i]), float(sw2[i]), float(max(sb2[i], 0.0)), chi, bool(cen[i]),
                         float(slope[i]), float(spread[i]), float(s["m1"][i]), note)


__all__ = ["CriticalPoint", "critical_point"]
