"""Argument checks and the in-place drawing helpers shared by the initializers."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(value: Any, allowed: Iterable[str], what: str) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


def check_tensor(t: Any, fn: str) -> bool:
    """Validate ``t``; returns False (after warning) for zero-element tensors."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}() takes a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}() needs a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.numel() == 0:
        warnings.warn(f"{fn}(): Initializing zero-element tensors is a no-op (shape {tuple(t.shape)})",
                      UserWarning, stacklevel=3)
        return False
    return True


def check_2d(t: Any, fn: str) -> None:
    """torch's rule for fan-based initializers: fans need a tensor of >= 2 dims."""
    if isinstance(t, torch.Tensor) and t.dim() < 2:
        raise ValueError(f"{fn}(): Fan in and fan out can not be computed for tensor with fewer than 2 dimensions "
                         f"(shape {tuple(t.shape)}); pass fans=(fan_in, fan_out) to variance_scaling_ for a bias")


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Draw half-precision values in float32 and round once into the tensor."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
