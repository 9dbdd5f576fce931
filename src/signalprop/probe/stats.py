"""Per-tensor statistics, reduced on the fly (a new statistic is one entry here).

Each function takes a float32 view of a module's output (or of the gradient
with respect to it) and returns 0-d tensors; nothing larger is kept, so
memory beyond autograd's own is O(number of layers).  Values stay on the
device until the end of the pass (one transfer, no per-layer sync).
"""

from __future__ import annotations

from typing import Callable

import torch

Stat = Callable[[torch.Tensor], dict[str, torch.Tensor]]

# A unit is saturated where its activation's derivative is below 1% of the
# derivative's maximum: tanh |x| > 2.99, sigmoid |x| > 5.99, softsign |x| > 9.
SATURATION_THRESHOLD = 0.01


def _finite_part(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    finite = torch.isfinite(x)
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), finite


def forward_moments(y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, variance and second moment over the finite entries; non-finite share."""
    yf, finite = _finite_part(y)
    n = finite.sum().clamp_min(1)
    mean = yf.sum() / n
    m2 = (yf * yf).sum() / n
    return {"forward_mean": mean, "forward_second_moment": m2, "forward_var": (m2 - mean * mean).clamp_min(0),
            "nonfinite_fraction": 1.0 - finite.float().mean()}


def grad_moments(g: torch.Tensor) -> dict[str, torch.Tensor]:
    gf, finite = _finite_part(g)
    n = finite.sum().clamp_min(1)
    return {"grad_ms": (gf * gf).sum() / n, "grad_nonfinite_fraction": 1.0 - finite.float().mean()}


# Derivative of a bounded activation written in terms of its output y, divided
# by the derivative's maximum.
_RELATIVE_DERIV: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": lambda y: 1.0 - y * y,
    "sigmoid": lambda y: 4.0 * y * (1.0 - y),
    "softsign": lambda y: (1.0 - y.abs()) ** 2,
    "hardtanh": lambda y: (y.abs() < 1.0).float(),
}


def saturation(kind: str) -> Stat | None:
    """Share of units whose activation derivative is below the threshold."""
    d = _RELATIVE_DERIV.get(kind)
    if d is None:
        return None
    return lambda y: {"saturation": (d(y) < SATURATION_THRESHOLD).float().mean()}


def dead_units(y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Share of units (output coordinates other than the batch dimension) that
    are exactly zero for every example of the batch."""
    if y.dim() < 2:
        return {"dead_fraction": (y == 0).float().mean()}
    alive = (y != 0).any(dim=0)
    return {"dead_fraction": 1.0 - alive.float().mean()}
