"""One activation's mean-field numbers at a point, as a plain dict (for the CLI and reports)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import activations as _act
from .critical import critical_point
from .depth import depth_scales
from .line import critical_sigma_w2
from .maps import (
    FixedPointError,
    NoCriticalPointError,
    _deriv_second_moment,
    _second_moment,
    chi1,
    fixed_point,
)

TWO_CRITICAL_POINTS = (
    "critical_sigma_w2 is the classic mean-field critical line at the given sigma_b2 (Poole et al. 2016, "
    "Schoenholz et al. 2017): chi1 = 1 for the activation as it is, mean included. signalprop.init.critical_ "
    "uses critical_init_*: q* chosen so that the depth's Jacobian stays near-isometric (Pennington et al. 2017), "
    "and, when E[phi] != 0 (sigmoid, softplus, GELU, ReLU family), the mean removed by the next layer's bias, so "
    "only the centred part of phi propagates (for sigmoid a sigma_w2 several times below the uncentred line's ~103).")


def summarize(act: Any, sigma_b2: float = 0.0, sigma_w2: float | None = None) -> dict[str, Any]:
    """Critical sigma_w2 at ``sigma_b2``; q*, chi1, xi_q, xi_c and the
    trainable-depth estimate 6 xi_c at ``sigma_w2`` (default: the critical one)."""
    a = _act.resolve(act)
    if isinstance(sigma_b2, bool) or not isinstance(sigma_b2, (int, float)) or not (
            math.isfinite(sigma_b2) and sigma_b2 >= 0):
        raise ValueError(f"sigma_b2 must be a finite number >= 0, got {sigma_b2!r}")
    if sigma_w2 is not None and (isinstance(sigma_w2, bool) or not isinstance(sigma_w2, (int, float))
                                 or not (math.isfinite(sigma_w2) and sigma_w2 > 0)):
        raise ValueError(f"sigma_w2 must be a finite number > 0, got {sigma_w2!r}")
    out: dict[str, Any] = {"activation": a.name, "sigma_b2": sigma_b2}
    one = np.float64(1.0)
    out["gain_forward"] = 1.0 / math.sqrt(float(_second_moment(a, one)))
    out["gain_backward"] = 1.0 / math.sqrt(float(_deriv_second_moment(a, one)))
    try:
        cp = critical_point(a)
        out.update(critical_init_sigma_w2=cp.sigma_w2, critical_init_sigma_b2=cp.sigma_b2,
                   critical_init_q_star=cp.q_star, critical_init_centered=cp.centered)
    except NoCriticalPointError as e:
        out["critical_init_note"] = str(e)
    out["about"] = TWO_CRITICAL_POINTS
    try:
        out["critical_sigma_w2"] = critical_sigma_w2(a, sigma_b2)
    except NoCriticalPointError as e:
        out["critical_sigma_w2"] = None
        out["critical_note"] = str(e)
    w = sigma_w2 if sigma_w2 is not None else out["critical_sigma_w2"]
    if w is None:
        return out
    out["sigma_w2"] = w
    try:
        out["q_star"] = fixed_point(a, w, sigma_b2)
    except FixedPointError as e:
        out["q_star"] = math.inf
        out["note"] = str(e)
        return out
    out["chi1"] = chi1(a, w, sigma_b2)
    xi_q, xi_c = depth_scales(a, w, sigma_b2)
    out["xi_q"], out["xi_c"] = xi_q, xi_c
    out["trainable_depth"] = 6 * xi_c
    out["phase"] = "critical" if abs(out["chi1"] - 1) < 1e-6 else ("ordered" if out["chi1"] < 1 else "chaotic")
    return out
