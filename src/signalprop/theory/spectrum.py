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

    For each x the moment generating function psi at w = 1 / (x (1 + i eta))
    solves chi_J(psi) = w; with u = chi_{D^2}(psi) that is one complex
    equation psi_{D^2}(u(psi)) = psi, u(psi) from the S-transform product,
    solved by Newton, continued from large x down (the L-th root followed
    continuously, the sheet with Im G <= 0 kept).  rho(x) = -Im G(z) / pi with
    G = (psi + 1) / z, z = x (1 + i eta): a Lorentzian smoothing of relative
    width ``eta`` (uniform on a log scale, so masses near 0 do not leak upward).
    Point masses (ReLU's zero eigenvalues) are not in the result: its integral
    over x > 0 is the continuous part's mass.
    """
    if weights not in _S1:
        raise ValueError(f"weights must be one of {sorted(_S1)}, got {weights!r}")
    a = _act.resolve(act)
    qs = max(fixed_point(a, sigma_w2, sigma_b2), Q_MIN)
    h, wq = nodes_1d(qs, a.kinks)
    lam = a.dphi(h) ** 2

    def psi_d(u: complex) -> complex:
        return complex(np.sum(wq * lam * u / (1 - u * lam)))

    def s_w(z: complex) -> complex:
        return 1 / sigma_w2 if weights == "orthogonal" else 1 / (sigma_w2 * (1 + z))

    xs = np.asarray(x, dtype=float)
    order = np.argsort(xs)[::-1]
    out = np.empty(xs.shape)
    mean = float(sigma_w2 * np.sum(wq * lam)) ** depth
    psi: complex | None = None
    last_root: complex | None = None
    turns = np.exp(2j * np.pi * np.arange(depth) / depth)

    def residual(p: complex, z: complex, prev: complex | None) -> tuple[complex, complex]:
        r0 = ((1 + p) / (p * z)) ** (1 / depth)
        if prev is not None:  # the L-th root continuous with the previous point's
            cands = r0 * turns
            r0 = cands[int(np.argmin(np.abs(cands - prev)))]
        return psi_d(p / (1 + p) * r0 / s_w(p)) - p, r0

    def solve(p: complex, z: complex, prev: complex | None) -> complex:
        for _ in range(100):
            f = residual(p, z, prev)[0]
            d = 1e-7 * (abs(p) + 1e-12)
            step = f / ((residual(p + d, z, prev)[0] - f) / d)
            p -= step
            if abs(step) <= 1e-13 * abs(p):
                break
        return p

    # The continuation starts beyond the spectrum's right edge, where psi ~ mean / z holds: the
    # edge of a product of L Gaussian layers is ~ e (L + 1) times the mean (Fuss-Catalan), so a
    # start at the largest requested x inside the support (depth 32: x ~ 40) converged to the
    # trivial root (all mass at 0).  Warm-up points walk down geometrically to the first x.
    top = float(xs.max()) if xs.size else 0.0
    start = 100.0 * (depth + 1) * max(mean, 1e-300)
    warm = list(np.geomspace(start, top, 48)[:-1]) if top > 0 and start > top else []
    points: list[tuple[float, int | None]] = [(float(v), None) for v in warm] + [(float(xs[i]), int(i)) for i in order]
    for xv, i in points:
        z = complex(xv, eta * xv)
        psi = solve(mean / z if psi is None else psi, z, last_root)
        if ((psi + 1) / z).imag > 0:  # landed on the conjugate sheet: restart from its mirror image
            alt = solve(psi.conjugate(), z, last_root)
            if ((alt + 1) / z).imag <= 0 and abs(residual(alt, z, last_root)[0]) < 1e-8 * (1 + abs(alt)):
                psi = alt
        last_root = residual(psi, z, last_root)[1]
        if i is not None:
            out[i] = max(-((psi + 1) / z).imag / np.pi, 0.0)
    return out
