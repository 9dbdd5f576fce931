"""The rest of :mod:`torch.nn.init`, with torch's signatures and meaning.

With these, ``import signalprop.init as init`` runs code written for
``torch.nn.init`` unchanged: the same functions, the same keyword names
(``tensor=`` included), the same distributions, errors and warnings, and
``generator=`` everywhere, and the same values for the same seed.  Values
are drawn here (not delegated), with torch's sequence of draws, so that
argument checks with clear messages apply to them too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

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

    Drawn as :func:`torch.nn.init.trunc_normal_` draws (torch 2.13), so the
    values equal torch's for the same seed or generator, in every dtype:
    when [a, b] holds more than 30% of the normal's mass, N(mean, std^2) in
    the tensor's dtype with the values outside [a, b] redrawn (the bounds
    rounded to that dtype first); otherwise rejection sampling from U(a, b)
    with acceptance exp(-((x - mean)^2 - (m - mean)^2) / (2 std^2)), m the
    point of [a, b] nearest the mean.  Both are exact in distribution, far
    tails included (signalprop's earlier float64 inverse-CDF path is gone:
    it drew different numbers and bought no accuracy over this); only slow
    far out, where U(a, b) rarely lands near a (acceptance ~ std^2 / (|a -
    mean| (b - a)) for a >> mean).  As in torch, a mean more than 2 std
    outside [a, b] warns.

    ``bound=`` (keyword only) is the earlier signalprop form
    ``trunc_normal_(t, std=, bound=)``: it still means what it meant (the
    result's std, bounds in units of it), with a FutureWarning pointing to
    :func:`~signalprop.init.scaled_trunc_normal_`.
    """
    if bound is not None:
        from .schemes import scaled_trunc_normal_

        warnings.warn("trunc_normal_(t, std=, bound=) is signalprop's earlier variance-corrected form; it now lives "
                      "in scaled_trunc_normal_ (trunc_normal_ itself has torch's meaning: mean, std, a, b)",
                      FutureWarning, stacklevel=2)
        return scaled_trunc_normal_(tensor, std, bound, generator)
    mean, std, a, b = (_finite(n, v) for n, v in (("mean", mean), ("std", std), ("a", a), ("b", b)))
    if not std > 0:
        raise ValueError(f"trunc_normal_ needs std > 0, got {std}")
    if not a <= b:
        raise ValueError(f"trunc_normal_ needs a <= b, got a={a}, b={b}")
    if not check_tensor(tensor, "trunc_normal_") or tensor.is_meta:
        return tensor
    if mean < a - 2 * std or mean > b + 2 * std:
        warnings.warn("mean is more than 2 std from [a, b] in nn.init.trunc_normal_. "
                      "The distribution of values may be incorrect.", stacklevel=2)
    with torch.no_grad():
        # torch's branch test, with torch's arithmetic (math.erf), so that both take the same branch
        mass = (math.erf((b - mean) / std / math.sqrt(2.0)) - math.erf((a - mean) / std / math.sqrt(2.0))) / 2.0
        if mass > 0.3:
            _redraw_outside(tensor, mean, std, a, b, generator)
        else:
            _uniform_rejection(tensor, mean, std, a, b, generator)
    return tensor


def _redraw_outside(t: torch.Tensor, mean: float, std: float, a: float, b: float,
                    generator: torch.Generator | None) -> None:
    """torch 2.13's draw for wide intervals: the whole tensor redrawn from
    N(mean, std^2) (one full draw per round) where it is still outside [a, b]."""
    lo = t.new_tensor(a, device="cpu").item()  # the bounds as the dtype has them
    hi = t.new_tensor(b, device="cpu").item()
    result = t.normal_(mean, std, generator=generator)
    while True:
        outside = (result < lo) | (result > hi)
        if not outside.any():
            break
        result = torch.where(outside, torch.empty_like(result).normal_(mean, std, generator=generator), result)
    if result is not t:
        t.copy_(result)


def _uniform_rejection(t: torch.Tensor, mean: float, std: float, a: float, b: float,
                       generator: torch.Generator | None) -> None:
    """torch 2.13's draw for narrow or far intervals: U(a, b) proposals, each
    kept with probability pdf(x) / pdf(m), m the point of [a, b] nearest the
    mean; each round redraws a full tensor of proposals and of uniforms."""
    log_peak = -0.5 * ((max(a, min(mean, b)) - mean) / std) ** 2
    candidates, accept = torch.empty_like(t), torch.empty_like(t)
    t.uniform_(a, b, generator=generator)
    candidates.copy_(t).sub_(mean).div_(std).pow_(2).mul_(-0.5).sub_(log_peak)
    pending = accept.uniform_(generator=generator).log_().gt(candidates)
    if not pending.any():
        return
    result = t
    while True:
        candidates.uniform_(a, b, generator=generator)
        result = torch.where(pending, candidates, result)
        candidates.sub_(mean).div_(std).pow_(2).mul_(-0.5).sub_(log_peak)
        pending = torch.where(pending, accept.uniform_(generator=generator).log_().gt(candidates), pending)
        if not pending.any():
            break
    t.copy_(result)


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
    every column, at random rows (as :func:`torch.nn.init.sparse_`).

    Drawn as torch 2.13 draws: the normal values in the tensor's dtype, then
    per column a ``randperm(rows)`` whose first entries are the zeros, so
    without ``generator`` the values equal torch's for the same seed.  With
    ``generator`` the permutations come from it too (on its device); torch
    2.13 draws them from the global generator even then, so there the
    normal values equal torch's and the zeros' places do not -- a result
    that depends on hidden global state is what ``generator=`` is there to
    avoid.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        raise ValueError("sparse_ needs a 2-dimensional tensor, got "
                         f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    sparsity = _finite("sparsity", sparsity)
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if tensor.is_meta:
        return tensor
    normal_(tensor, 0.0, std, generator)
    rows, cols = tensor.shape
    zeros = math.ceil(sparsity * rows)
    device = generator.device if generator is not None else torch.device("cpu")
    with torch.no_grad():
        for col in range(cols):
            tensor[torch.randperm(rows, generator=generator, device=device)[:zeros], col] = 0
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
