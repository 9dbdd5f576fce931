"""The order-to-chaos phase diagram over a (sigma_w2, sigma_b2) grid, vectorized."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import activations as _act
from .depth import _chi_c_vec, _xi
from .maps import _chi1_at, _fixed_point_vec, _qmap_slope

# Nodes per piece for the grid: fewer than the pointwise defaults (N_1D = 96,
# N_2D = 40), graded the same way, and the bivariate rule's inner integral
# left plain (the pointwise solve grades it beyond 2 span(n)).  Measured
# against the pointwise functions (sigma_w2 0.25-4, sigma_b2 0-2, cells beside
# the critical line included): xi_c within 1.7e-9 relative for tanh and
# 3.2e-9 for erf through the quadrature (tests/test_theory_accuracy.py), the
# largest where c* = 0 and the plain inner integral spans the widest.
GRID_N_1D = 32
GRID_N_2D = 32
GRID_INNER_PLAIN = np.inf


@dataclass(frozen=True)
class PhaseDiagram:
    activation: str
    sigma_w2: np.ndarray  # (nw,)
    sigma_b2: np.ndarray  # (nb,)
    q_star: np.ndarray  # (nb, nw)
    chi1: np.ndarray
    xi_q: np.ndarray
    xi_c: np.ndarray
    critical_sigma_w2: np.ndarray  # (nb,) sigma_w2 where chi1 = 1 (interpolated), nan if none


def phase_diagram(act: Any, sigma_w2: np.ndarray, sigma_b2: np.ndarray) -> PhaseDiagram:
    """q*, chi1, xi_q and xi_c on the grid, and the critical line chi1 = 1."""
    a = _act.resolve(act)
    w = np.asarray(sigma_w2, dtype=float)
    b = np.asarray(sigma_b2, dtype=float)
    W, B = np.meshgrid(w, b)
    q = _fixed_point_vec(a, W, B, n=GRID_N_1D)
    finite = np.isfinite(q)
    qf = np.where(finite, q, 1.0)
    chi = np.where(finite, _chi1_at(a, qf, W, GRID_N_1D), np.nan)
    _, chi_q = _qmap_slope(a, qf, W, B, GRID_N_1D)
    chi_c = _chi_c_vec(a, q.ravel(), W.ravel(), B.ravel(), np.nan_to_num(chi.ravel(), nan=np.inf),
                       n=GRID_N_2D, inner_plain=GRID_INNER_PLAIN).reshape(W.shape)
    xi_q = np.where(finite, np.abs(_xi(chi_q)), np.nan)
    xi_c = np.where(finite, np.abs(_xi(chi_c)), np.nan)
    crit = _critical_line(a, w, b, chi - 1.0)
    return PhaseDiagram(a.name, w, b, q, chi, xi_q, xi_c, crit)


def _critical_line(a: Any, w: np.ndarray, b: np.ndarray, d: np.ndarray, steps: int = 40) -> np.ndarray:
    """Per row (sigma_b2), the first sigma_w2 where chi1 - 1 turns >= 0: the grid
    bracket, refined by vectorized bisection (chi1 can be flat near the root,
    e.g. tanh at sigma_b2 = 0, where linear interpolation would be off)."""
    crit = np.full(b.shape, np.nan)
    neg = (d[:, :-1] < 0) & (d[:, 1:] >= 0)
    rows = np.flatnonzero(neg.any(axis=1))
    if not rows.size:
        return crit
    j = neg[rows].argmax(axis=1)
    lo, hi, sb = w[j], w[j + 1], b[rows]
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        q = _fixed_point_vec(a, mid, sb, n=GRID_N_1D)
        q = np.where(np.isfinite(q), q, 1e6 * np.maximum(1.0, sb))
        below = _chi1_at(a, q, mid, GRID_N_1D) < 1.0
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    crit[rows] = 0.5 * (lo + hi)
    return crit
