"""Per-tensor statistics, reduced on the fly (a new statistic is one entry here).

Each function takes a float32 view of a module's output (or of the gradient
with respect to it) and returns 0-d tensors; nothing larger is kept, so
memory beyond autograd's own is O(number of layers).  Values stay on the
device until the end of the pass (one transfer, no per-layer sync).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Stat = Callable[[torch.Tensor], dict[str, torch.Tensor | float]]

# A unit is saturated where its activation's derivative is below 1% of the
# derivative's maximum: tanh |x| > 2.99, sigmoid |x| > 5.99, softsign |x| > 9.
SATURATION_THRESHOLD = 0.01


def _finite_part(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    finite = torch.isfinite(x)
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), finite


def forward_moments(y: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """Mean and norm (second moment = norm^2 / n, formed later in float64) over
    the finite entries, and the non-finite share.

    Fast path: a mean and a vector norm, both vectorized (``torch.var_mean``
    is ~100x slower on CPU) and finite exactly when every entry is.  Only
    otherwise are the entries masked, in float64 -- the rare case.
    """
    mean = y.mean()
    norm = torch.linalg.vector_norm(y)
    if bool(torch.isfinite(norm + mean)):
        return {"forward_mean": mean, "forward_norm": norm, "forward_n": float(max(y.numel(), 1)),
                "nonfinite_fraction": 0.0}
    yf, finite = _finite_part(y.double())
    n = finite.sum().clamp_min(1)
    return {"forward_mean": yf.sum() / n, "forward_norm": torch.linalg.vector_norm(yf), "forward_n": n,
            "nonfinite_fraction": 1.0 - finite.double().mean()}


def grad_moments(g: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """Norm of a gradient over its finite entries (mean square = norm^2 / n),
    and the non-finite share."""
    norm = torch.linalg.vector_norm(g)
    if bool(torch.isfinite(norm)):
        return {"grad_norm": norm, "grad_n": float(max(g.numel(), 1)), "grad_nonfinite_fraction": 0.0}
    gf, finite = _finite_part(g.double())
    return {"grad_norm": torch.linalg.vector_norm(gf), "grad_n": finite.sum().clamp_min(1),
            "grad_nonfinite_fraction": 1.0 - finite.double().mean()}


# Shares (saturation) are estimated on at most this many evenly strided
# entries: standard error <= 0.5 / sqrt(16384) = 0.4%, and the cost of a
# share stops growing with the layer's size.
SHARE_SAMPLE = 16384


def _subsample(y: torch.Tensor) -> torch.Tensor:
    flat = y.reshape(-1)
    step = -(-flat.numel() // SHARE_SAMPLE)
    return flat[::step] if step > 1 else flat


# A bounded activation's relative derivative phi'(x) / max phi' falls below the
# threshold exactly where its output is far enough from the centre c:
# |y - c| > t.  Written on the output so that one comparison decides it.
_SATURATED_BEYOND: dict[str, tuple[float, float]] = {
    "tanh": (0.0, math.sqrt(1.0 - SATURATION_THRESHOLD)),  # 1 - y^2 < thr
    "sigmoid": (0.5, 0.5 * math.sqrt(1.0 - SATURATION_THRESHOLD)),  # 4 y (1 - y) < thr
    "softsign": (0.0, 1.0 - math.sqrt(SATURATION_THRESHOLD)),  # (1 - |y|)^2 < thr
    "hardtanh": (0.0, 1.0 - 1e-7),  # derivative 0 where the output is clipped to +-1
}


def saturation(kind: str) -> Stat | None:
    """Share of units whose activation derivative is below the threshold."""
    if kind not in _SATURATED_BEYOND:
        return None
    c, t = _SATURATED_BEYOND[kind]

    def stat(y: torch.Tensor) -> dict[str, torch.Tensor]:
        z = _subsample(y)
        z = z if c == 0.0 else z - c
        return {"saturation": torch.count_nonzero(z.abs() > t) / max(z.numel(), 1)}

    return stat


def dead_units(y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Share of units (output coordinates other than the batch dimension) that
    are exactly zero for every example of the batch."""
    if y.dim() < 2:
        return {"dead_fraction": (y == 0).float().mean()}
    alive = (y != 0).any(dim=0)
    return {"dead_fraction": 1.0 - alive.float().mean()}
