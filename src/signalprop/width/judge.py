"""From readings to verdicts: a power law per layer and step, its slope judged.

For one layer, role and step, the scale ``s`` at widths ``n`` is fitted per
seed as ``log s = a + b log n`` (least squares); the slope ``b`` is the
mean over seeds, its uncertainty the standard error across seeds (one seed:
the regression's own standard error).  Thresholds, and why:

* ``SLOPE_TOLERANCE = 0.25``: a wrong parametrization is off by a power of
  the width whose exponent is a multiple of 1/2 (Yang & Hu 2021, Tensor
  Programs IV, the abc-parametrizations: SP's readout at 1/sqrt(n) where
  muP's is 1/n, a learning rate off by n); half of the smallest such
  exponent separates "Theta(1)" from "off by sqrt(n)", leaving room for
  finite-width curvature (a 16x width range moves a slope-0.25 law by 2x).
* ``Z = 2``: a slope is only called off when it is also two standard errors
  away from zero (seed noise).
* Growth at any reading is a problem (it compounds); shrinking is judged
  at the last reading only: muP starts the output and attention logits at
  o(1) on purpose (zero-initialized read-out and query, 1/d attention; Yang
  et al. 2022, Tensor Programs V, section 3 / appendix D.2), and what must
  not vanish is the scale after training steps.
* ``RANGE_FACTOR = 10``: the healthy range of a layer is within 10x of its
  scale at the smallest width (where hyperparameters are tuned, as in
  muTransfer); the fitted law predicts the width at which it leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

SLOPE_TOLERANCE = 0.25
Z = 2.0
RANGE_FACTOR = 10.0


def fit_slope(widths: Sequence[int], values: np.ndarray) -> tuple[float, float, int]:
    """``values[seed, width]`` -> (slope, standard error, seeds used).  Seeds
    with a zero or non-finite value are left out (a zero-initialized
    read-out at t = 0 has no scale to fit); no usable seed gives NaN."""
    x = np.log(np.asarray(widths, dtype=float))
    slopes, ses = [], []
    for row in np.atleast_2d(values):
        if not (np.all(np.isfinite(row)) and np.all(row > 0)):
            continue
        y = np.log(row)
        xc = x - x.mean()
        b = float(xc @ (y - y.mean()) / (xc @ xc))
        dof = len(x) - 2
        resid = y - y.mean() - b * xc
        ses.append(math.sqrt(float(resid @ resid) / dof / float(xc @ xc)) if dof > 0 else 0.0)
        slopes.append(b)
    if not slopes:
        return math.nan, math.nan, 0
    if len(slopes) == 1:
        return slopes[0], ses[0], 1
    return float(np.mean(slopes)), float(np.std(slopes, ddof=1) / math.sqrt(len(slopes))), len(slopes)


def direction(slope: float, se: float) -> int:
    """+1 grows, -1 shrinks, 0 width-stable (within tolerance or within seed noise)."""
    if not math.isfinite(slope) or abs(slope) <= SLOPE_TOLERANCE:
        return 0
    if math.isfinite(se) and abs(slope) <= Z * se:
        return 0
    return 1 if slope > 0 else -1


def leaves_range_at(widths: Sequence[int], slope: float) -> int | None:
    """The width at which the fitted law moves the scale ``RANGE_FACTOR``
    times from its value at the smallest width: n0 * RANGE_FACTOR ** (1/|b|)."""
    if not math.isfinite(slope) or slope == 0:
        return None
    return int(round(min(widths) * RANGE_FACTOR ** (1.0 / abs(slope))))


def position(fan: tuple[int, int] | None, fan_wide: tuple[int, int] | None) -> str:
    """Where a weight sits, from which of its fans grow with width (mup's infshape idea)."""
    if fan is None or fan_wide is None:
        return "layer"
    grows_in, grows_out = fan_wide[0] > fan[0], fan_wide[1] > fan[1]
    return {(False, True): "input layer", (True, True): "hidden layer", (True, False): "output layer"}.get(
        (grows_in, grows_out), "layer")


def _lr_fix(optimizer: str, where: str, sign: int) -> str:
    """The learning-rate rule of muP (Yang et al. 2022, Table 3) for a layer whose update grows or shrinks."""
    adam = "adam" in optimizer.lower()
    vector = where in ("input layer", "layer")  # fan-in does not grow: embeddings, input weights, gains, biases
    if sign > 0:
        if adam:
            return ("per-layer Adam learning rates proportional to 1/fan-in for hidden and read-out weights (muP: "
                    "mup.MuAdam after mup.set_base_shapes), or u-muP's unit scaling")
        if where == "output layer":
            return ("muP's output multiplier 1/width on the read-out (mup.MuReadout) with its SGD learning rate "
                    "unchanged, or a learning rate proportional to 1/width for this layer")
        return ("muP for SGD: the read-out's output multiplier 1/width (mup.MuReadout) makes hidden gradients "
                "O(1/width) with hidden learning rates unchanged (mup.MuSGD), or u-muP's unit scaling")
    if vector:
        return ("the layer stops learning as width grows (the kernel regime): muP keeps the learning rate of "
                "input weights, embeddings, gains and biases " +
                ("independent of width under Adam (mup.MuAdam)" if adam else
                 "proportional to width under SGD (mup.MuSGD)"))
    return ("the layer stops learning as width grows: its learning rate falls faster than muP's " +
            ("1/fan-in (Adam, mup.MuAdam)" if adam else "(SGD: unchanged for hidden weights, mup.MuSGD)"))


def fix_for(role: str, sign: int, where: str, optimizer: str, at_init: bool) -> str:
    """The parametrization change that removes a layer's width dependence."""
    if role == "logits":
        if sign > 0:
            return ("muP's output multiplier 1/width: replace the read-out Linear by mup.MuReadout (or multiply "
                    "its output by base_width/width) and zero-initialize it; " + _lr_fix(optimizer, "hidden layer", 1))
        return "the read-out's output multiplier is too small: muP's is 1/width (mup.MuReadout), not smaller"
    if role == "attention":
        if sign > 0:
            return ("attention scale 1/d instead of 1/sqrt(d) (muP: scale=1/head_dim in "
                    "scaled_dot_product_attention, e.g. sqrt(d_base)/d), with a zero-initialized query")
        return "the attention scale shrinks the logits faster than muP's 1/d: use 1/d (times a width-free constant)"
    if at_init:
        if sign > 0:
            return ("initialize with variance proportional to 1/fan-in (sp.init.kaiming_normal_ / lecun_normal_; "
                    "muP keeps standard fan-in init for input and hidden weights)")
        return "initialize with variance proportional to 1/fan-in, not smaller"
    return _lr_fix(optimizer, where, sign)


_WHAT = {"activation": "activations", "update": "update (output change from its own weight step)",
         "logits": "output logits", "attention": "attention logits"}


def message(name: str, role: str, where: str, sign: int, slope: float, se: float, step: int,
            widths: Sequence[int], statistic: str) -> str:
    label = name or "the model's output"
    trend = "grow" if sign > 0 else "shrink"
    when = "at initialization" if step == 0 else f"after {step} step{'s' * (step != 1)}"
    bound = leaves_range_at(widths, slope)
    where_txt = f" ({where})" if where != "layer" and role in ("activation", "update") else ""
    out = (f"{label}{where_txt}: {_WHAT[role]} {trend} as width^{slope:.2f} ± {se:.2f} {when} "
           f"({statistic}, widths {min(widths)}-{max(widths)})")
    if bound is not None:
        out += (f"; the fitted law leaves {RANGE_FACTOR:g}x of the width-{min(widths)} scale at width "
                f"~{bound:,}")
    return out


def describe(widths: Sequence[int], statistic: str) -> dict[str, Any]:
    """The thresholds, for the record."""
    return {"slope_tolerance": SLOPE_TOLERANCE, "z": Z, "range_factor": RANGE_FACTOR, "statistic": statistic,
            "widths": list(widths)}
