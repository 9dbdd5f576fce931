"""The rest of :mod:`torch.nn.init`, with torch's signatures and meaning.

With these, ``import signalprop.init as init`` runs code written for
``torch.nn.init`` unchanged: the same functions, the same keyword names
(``tensor=`` included), the same distributions, errors and warnings, and
``generator=`` everywhere.  Values are drawn here (not delegated), so the
extensions of the package (half precision drawn in float32, argument
checks with clear messages) apply to them too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from scipy import special

from ._checks import check_tensor


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def uniform_(tensor: torch.Tensor, a: float = 0.0, b: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill with U(a, b) (as :func:`torch.nn.init.uniform_`)."""
    a, b = _finite("a", a), _finite("b", b)
    if a > b:
        raise ValueError(f"uniform_ needs a <= b, got a={a}, b={b}")
    if not check_tensor(tensor, "uniform_"):
        return tensor
    with torch.no_grad():
        return tensor.uniform_(a, b, generator=generator)


def normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill with N(mean, std^2) (as :func:`torch.nn.init.normal_`)."""
    mean, std = _finite("mean", mean), _finite("std", std)
    if std < 0:
        raise ValueError(f"normal_ needs std >= 0, got {std}")
    if not check_tensor(tensor, "normal_"):
        return tensor
    with torch.no_grad():
        return tensor.normal_(mean, std, generator=generator)


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0,
                  generator: torch.Generator | None = None, *, bound: float | None = None) -> torch.Tensor:
    """Fill with N(mean, std^2) truncated to [a, b] -- torch's meaning:
    ``std`` is that of the normal *before* truncation and ``a``, ``b`` are
    absolute bounds (for the result's standard deviation and bounds in units
    of it, see :func:`signalprop.init.scaled_trunc_normal_`).

    Inverse-CDF sampling in float64 (exact in the far tails, e.g. [2, 3] for
    a unit normal), rounded once into the tensor's dtype and clamped to
    [a, b] there.

    ``bound=`` (keyword only) is the earlier signalprop form
    ``trunc_normal_(t, std=, bound=)``: it still means what it meant (the
    result's std, bounds in units of it), with a FutureWarning pointing to
    :func:`~signalprop.init.scaled_trunc_normal_`.
    """
    if bound is not None:
        import warnings

        from .schemes import scaled_trunc_normal_

        warnings.warn("trunc_normal_(t, std=, bound=) is signalprop's earlier variance-corrected form; it now lives "
                      "in scaled_trunc_normal_ (trunc_normal_ itself has torch's meaning: mean, std, a, b)",
                      FutureWarning, stacklevel=2)
        return scaled_trunc_normal_(tensor, std, bound, generator)
    mean, std, a, b = (_finite(n, v) for n, v in (("mean", mean), ("std", std), ("a", a), ("b", b)))
    if not std > 0:
        raise ValueError(f"trunc_normal_ needs std > 0, got {std}")
    if not a < b:
        raise ValueError(f"trunc_normal_ needs a < b, got a={a}, b={b}")
    if not check_tensor(tensor, "trunc_normal_"):
        return tensor
    # work on the side of the mean where the interval's CDF values are far from 1 (precision)
    lo, hi = (a - mean) / std, (b - mean) / std
    flip = lo > 0
    if flip:
        lo, hi = -hi, -lo
    plo, phi = float(special.ndtr(lo)), float(special.ndtr(hi))
    if not phi > plo:
        raise ValueError(f"trunc_normal_: [a, b] = [{a}, {b}] lies {min(abs(lo), abs(hi)):.3g} standard deviations "
                         "from the mean, where the normal has no representable mass")
    with torch.no_grad():
        u = torch.empty(tensor.shape, dtype=torch.float64, device=tensor.device)
        u.uniform_(plo, phi, generator=generator)
        z = u.mul_(2.0).sub_(1.0).erfinv_().mul_(math.sqrt(2.0))  # Phi^-1(u)
        if flip:
            z.neg_()
        tensor.copy_(z.mul_(std).add_(mean).clamp_(a, b))
        return tensor.clamp_(a, b)  # after rounding into a lower precision


def constant_(tensor: torch.Tensor, val: float) -> torch.Tensor:
    """Fill with ``val`` (as :func:`torch.nn.init.constant_`)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"constant_() takes a torch.Tensor, got {type(tensor).__name__}")
    with torch.no_grad():
        return tensor.fill_(val)


def ones_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill with 1 (as :func:`torch.nn.init.ones_`)."""
    return constant_(tensor, 1.0)


def zeros_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill with 0 (as :func:`torch.nn.init.zeros_`)."""
    return constant_(tensor, 0.0)


def eye_(tensor: torch.Tensor) -> torch.Tensor:
    """The identity matrix, for a 2-D tensor (as :func:`torch.nn.init.eye_`):
    a Linear layer that passes its input through (the first min(in, out) units)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        raise ValueError(f"eye_ needs a 2-dimensional tensor, got "
                         f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    with torch.no_grad():
        tensor.zero_()
        tensor.fill_diagonal_(1.0)
    return tensor


def dirac_(tensor: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The Dirac delta, for a Conv1d/2d/3d weight (as :func:`torch.nn.init.dirac_`):
    the convolution passes its input channels through (per group, the first
    min(out/groups, in) channels), the kernel's centre tap 1, all else 0."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (3, 4, 5):
        raise ValueError("dirac_ needs a 3, 4 or 5-dimensional tensor (a Conv1d/2d/3d weight), got "
                         f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if tensor.shape[0] % groups:
        raise ValueError(f"dirac_: dimension 0 ({tensor.shape[0]}) is not divisible by groups={groups}")
    out_per_group = tensor.shape[0] // groups
    n = min(out_per_group, tensor.shape[1])
    centre = tuple(k // 2 for k in tensor.shape[2:])
    with torch.no_grad():
        tensor.zero_()
        for g in range(groups):
            for d in range(n):
                tensor[(g * out_per_group + d, d) + centre] = 1
    return tensor


def sparse_(tensor: torch.Tensor, sparsity: float, std: float = 0.01,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Martens (2010): N(0, std^2) with ``ceil(sparsity * rows)`` zeros in
    every column, at random rows (as :func:`torch.nn.init.sparse_`)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        raise ValueError("sparse_ needs a 2-dimensional tensor, got "
                         f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    sparsity = _finite("sparsity", sparsity)
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    normal_(tensor, 0.0, std, generator)
    rows, cols = tensor.shape
    zeros = int(math.ceil(sparsity * rows))
    if zeros and tensor.numel():
        with torch.no_grad():
            keys = torch.rand(rows, cols, generator=generator, device=tensor.device)
            idx = keys.argsort(dim=0)[:zeros]  # a random set of rows per column
            tensor.scatter_(0, idx, 0.0)
    return tensor


def _deprecated(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    new = fn.__name__

    def old(*args: Any, **kwargs: Any) -> torch.Tensor:
        warnings.warn(f"signalprop.init.{new[:-1]} is deprecated (as in torch.nn.init); use {new}",
                      FutureWarning, stacklevel=2)
        return fn(*args, **kwargs)

    old.__name__ = old.__qualname__ = new[:-1]
    old.__doc__ = f"Deprecated alias of :func:`{new}` (kept because :mod:`torch.nn.init` keeps it)."
    return old


__all__ = ["constant_", "dirac_", "eye_", "normal_", "ones_", "sparse_", "trunc_normal_", "uniform_", "zeros_"]
