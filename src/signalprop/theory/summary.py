"""One activation's mean-field numbers at a point, as a plain dict (for the CLI and reports)."""

from __future__ import annotations

import math
from typing import Any

from .. import activations as _act
from .maps import (
    FixedPointError,
    NoCriticalPointError,
    chi1,
    critical_sigma_w2,
    depth_scales,
    fixed_point,
)


def summarize(act: Any, sigma_b2: float = 0.0, sigma_w2: float | None = None) -> dict[str, Any]:
    """Critical sigma_w2 at ``sigma_b2``; q*, chi1, xi_q, xi_c and the
    trainable-depth estimate 6 xi_c at ``sigma_w2`` (default: the critical one)."""
    a = _act.resolve(act)
    out: dict[str, Any] = {"activation": a.name, "sigma_b2": sigma_b2}
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
