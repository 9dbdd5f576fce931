"""Adaptive gradient clipping (Brock, De, Smith & Simonyan 2021, "High-Performance
Large-Scale Image Recognition Without Normalization", section 4.1).

Each *unit* -- a row of a Linear weight, a filter of a convolution (everything
but the leading output dimension), a whole bias or gain vector -- has its
gradient clipped when its norm exceeds ``clipping`` times the unit's weight
norm (floored at ``eps``, so that zero-initialised weights can move):

    g_i <- g_i * clipping * max(||w_i||, eps) / ||g_i||   where ||g_i|| > clipping * max(||w_i||, eps)

The paper's formula applied tensor by tensor is :func:`agc_reference_`; the
fused :func:`agc_` gives the same result with a few kernels per group of
equally shaped tensors instead of several per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["agc_", "agc_reference_", "unitwise_norm"]

_MIN_GRAD_NORM = 1e-6  # the paper's guard against dividing by a vanishing gradient norm
_STACK_LIMIT = 1 << 26  # elements per stacked group (bounds the transient copy)


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm of each unit: over the whole tensor for scalars and vectors,
    else over every dimension but the first (output rows and filters), kept
    as a broadcastable ``(out, 1, ...)`` tensor."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


def _check(clipping: float, eps: float) -> None:
    if not clipping > 0:
        raise ValueError(f"clipping must be > 0, got {clipping}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _with_grads(parameters: Iterable[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    ps = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    for p in ps:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"agc_ takes tensors (model.parameters()), got {type(p).__name__}")
    return [p for p in ps if p.grad is not None]


@torch.no_grad()
def agc_reference_(parameters: Iterable[torch.Tensor] | torch.Tensor, clipping: float = 0.01,
                   eps: float = 1e-3) -> None:
    """The paper's formula, one parameter at a time (the oracle for :func:`agc_`)."""
    _check(clipping, eps)
    for p in _with_grads(parameters):
        g = p.grad
        assert g is not None  # _with_grads keeps only parameters with a gradient
        max_norm = unitwise_norm(p).clamp_min(eps) * clipping
        g_norm = unitwise_norm(g)
        clipped = g * (max_norm / g_norm.clamp_min(_MIN_GRAD_NORM))
        g.copy_(torch.where(g_norm > max_norm, clipped, g))


def _scales(w_norm: torch.Tensor, g_norm: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    max_norm = w_norm.clamp_min(eps) * clipping
    one = torch.ones((), dtype=g_norm.dtype, device=g_norm.device)
    return torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(_MIN_GRAD_NORM), one)


@torch.no_grad()
def agc_(parameters: Iterable[torch.Tensor] | torch.Tensor, clipping: float = 0.01, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping, in place on each parameter's ``.grad``.

    Unit-wise as in the paper (see the module docstring); parameters without a
    gradient are skipped.  Fused: vectors and scalars share one
    ``torch._foreach_norm`` per device and dtype; higher-dimensional tensors
    of one shape are stacked (in chunks of at most 2^26 elements) and reduced
    by one kernel; the scaling is one ``torch._foreach_mul_``.  Equal to
    :func:`agc_reference_` up to rounding of the norms.  The paper clips
    every layer but the classifier's final one: pass the parameters to clip,
    e.g. ``agc_(p for n, p in model.named_parameters() if not n.startswith("fc."))``.
    """
    _check(clipping, eps)
    ps = _with_grads(parameters)
    groups: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    for p in ps:
        key = (p.device, p.dtype, p.grad.dtype, tuple(p.shape) if p.dim() > 1 else None)  # type: ignore[union-attr]
        groups.setdefault(key, []).append(p)
    grads: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    for (_, _, _, shape), members in groups.items():
        gs = [p.grad for p in members]
        if shape is None:  # scalars and vectors: whole-tensor norms, one fused kernel each for w and g
            s = _scales(torch.stack(torch._foreach_norm(members)), torch.stack(torch._foreach_norm(gs)),  # type: ignore[arg-type]
                        clipping, eps)
            grads += gs  # type: ignore[arg-type]
            scales += list(s.unbind(0))
            continue
        per = max(1, _STACK_LIMIT // max(members[0].numel(), 1))
        dims = tuple(range(2, len(shape) + 1))
        for i in range(0, len(members), per):
            chunk = members[i:i + per]
            cg = gs[i:i + per]
            w_norm = torch.linalg.vector_norm(torch.stack(chunk), dim=dims, keepdim=True)
            g_norm = torch.linalg.vector_norm(torch.stack(cg), dim=dims, keepdim=True)  # type: ignore[arg-type]
            grads += cg  # type: ignore[arg-type]
            scales += list(_scales(w_norm, g_norm, clipping, eps).unbind(0))
    if grads:
        torch._foreach_mul_(grads, scales)
