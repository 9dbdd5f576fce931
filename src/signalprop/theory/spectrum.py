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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import activations as _act
from .gaussian import expect
from .maps import Q_MIN, fixed_point

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
    d2 = float(expect(lambda x: a.dphi(x) ** 2, qs, a.kinks))
    d4 = float(expect(lambda x: a.dphi(x) ** 4, qs, a.kinks))
    mu1, mu2 = sigma_w2 * d2, sigma_w2**2 * d4
    mean = mu1**depth
    var = mean**2 * depth * (mu2 / mu1**2 - 1.0 - _S1[weights])
    return JacobianSpectrum(depth, weights, qs, mu1, mu2, mean, var)
