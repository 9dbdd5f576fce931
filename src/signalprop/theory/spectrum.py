"""Moments of the input-output Jacobian's squared singular values.

Pennington, Schoenholz & Ganguli (2017), "Resurrecting the sigmoid": for a
deep network J = D_L W_L ... D_1 W_1 with D_l = diag(phi'(h_l)), the
eigenvalues of J J^T have, in the wide limit (free multiplicative
convolution, whose S-transforms multiply),

    mean     = chi1^L
    variance = chi1^(2L) * L * (mu2 / mu1^2 - 1 - s1)

where mu_k = sigma_w2^k E[phi'(h)^(2k)] and s1 is the first S-transform
coefficient of W W^T: -1 for Gaussian weights, 0 for orthogonal ones.
Dynamical isometry (all singular values near 1 at any depth) needs chi1 = 1,
orthogonal weights, and mu2 / mu1^2 -> 1, i.e. phi' nearly constant on the
pre-activations: small q* for tanh-like activations, impossible for ReLU.
:func:`jacobian_density` gives the whole density, not only its moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .. import activations as _act
from ._resolvent import Resolvent
from .gaussian import nodes_1d
from .maps import Q_MIN, fixed_point, gaussian_moments

Weights = Literal["gaussian", "orthogonal"]
_S1 = {"gaussian": -1.0, "orthogonal": 0.0}


@dataclass(frozen=True)
class JacobianSpectrum:
    depth: int
    weights: str
    q: float
    mu1: float
    mu2: float
    mean: float
    variance: float


def jacobian_spectrum(act: object, sigma_w2: float, sigma_b2: float, depth: int,
                      weights: Weights = "gaussian", q: float | None = None) -> JacobianSpectrum:
    """Mean and variance of the eigenvalues of J J^T for ``depth`` layers at q
    (default: the fixed point q*)."""
    if weights not in _S1:
        raise ValueError(f"weights must be one of {sorted(_S1)}, got {weights!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    a = _act.resolve(act)
    qs = fixed_point(a, sigma_w2, sigma_b2) if q is None else float(q)
    qs = max(qs, Q_MIN)
    m = gaussian_moments(a, qs, ("d2", "d4"))
    d2, d4 = float(m["d2"]), float(m["d4"])
    mu1, mu2 = sigma_w2 * d2, sigma_w2**2 * d4
    mean = mu1**depth
    var = mean**2 * depth * (mu2 / mu1**2 - 1.0 - _S1[weights])
    return JacobianSpectrum(depth, weights, qs, mu1, mu2, mean, var)


def jacobian_density(act: object, sigma_w2: float, sigma_b2: float, depth: int, x: np.ndarray,
                     weights: Weights = "orthogonal", eta: float = 1e-3) -> np.ndarray:
    """Density of the eigenvalues of J J^T (squared singular values of the
    depth-``depth`` input-output Jacobian) at the points ``x`` > 0, in the wide
    limit, by free probability (Pennington et al. 2017): S-transforms multiply,
    S_J = (S_{D^2} S_{W W^T})^L with D^2 = phi'(h)^2, h ~ N(0, q*), and
    S_{W W^T} = 1 / sigma_w2 (orthogonal) or 1 / (sigma_w2 (1 + z)) (Gaussian).

    At each x the moment generating function psi = z G - 1 at
    z = x (1 + i eta) solves chi_J(psi) = 1 / z, one complex equation in
    psi_{D^2} solved by Newton.  Of its many roots, the density's is known
    beyond the spectrum's right edge (psi ~ mean / z) and followed down from
    there by continuation: along a fixed log-spaced lattice (16 points per
    decade, steps halved wherever the root moves fast, as at the edges), then
    from the nearest state of that walk above x to x.  The path depends on x
    alone, so a point's value does not depend on the other points asked for,
    their order or their spacing.  (Depth 1 with orthogonal weights needs no
    equation: J J^T = sigma_w2 D^2.)

    rho(x) = -Im G(z) / pi: a Lorentzian smoothing of relative width ``eta``
    (uniform on a log scale, so masses near 0 do not leak upward).  Its 1 / x
    tail makes each eigenvalue lam in [a, b] count 1 + (eta / pi) (ln(b / lam) - 1)
    to first order in the integral over [a, b]: 1.002 for tanh, orthogonal,
    depth 8 (bulk near 1) on [1e-8, 1800] at eta = 1e-3.  Point masses at 0
    (ReLU's dead units: D^2's zero share, which the free product keeps) are
    not in the result, nor their smoothed tail, so its integral is the
    continuous part's mass.  Values under ~1e-16 |G| / pi are rounding: far
    below a spectral gap, where the smoothed value is eta x E[1 / lam^2] / pi,
    they stay under 1e-17 (tanh, orthogonal weights, x < 1e-13).  Raises
    ValueError for x <= 0, non-finite x or eta <= 0.
    """
    if weights not in _S1:
        raise ValueError(f"weights must be one of {sorted(_S1)}, got {weights!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not eta > 0:
        raise ValueError(f"eta (the smoothing's relative width) must be > 0, got {eta!r}")
    xs = np.asarray(x, dtype=float)
    if xs.size and not (np.all(xs > 0) and np.all(np.isfinite(xs))):
        raise ValueError("x must be finite and > 0: the density is over the positive eigenvalues (ReLU's zeros "
                         f"are a point mass, left out); got min {xs.min()!r}, max {xs.max()!r}")
    a = _act.resolve(act)
    qs = max(fixed_point(a, sigma_w2, sigma_b2), Q_MIN)
    h, wq = nodes_1d(qs, a.kinks)
    solver = Resolvent(a.dphi(h) ** 2, wq, sigma_w2, depth, weights == "gaussian", eta)
    return np.array([solver.density(float(v)) for v in xs.ravel()]).reshape(xs.shape)
