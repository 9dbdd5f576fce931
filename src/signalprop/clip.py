"""Adaptive gradient clipping (Brock, De, Smith & Simonyan 2021, "High-Performance
Large-Scale Image Recognition Without Normalization", section 4.1).

Each *unit* -- a row of a Linear weight, a filter of a convolution (everything
but the leading output dimension), a whole bias or gain vector -- has its
gradient clipped when its norm exceeds ``clipping`` times the unit's weight
norm (floored at ``eps``, so that zero-initialised weights can move):

    g_i <- g_i * clipping * max(||w_i||, eps) / ||g_i||   where ||g_i|| > clipping * max(||w_i||, eps)

The paper's formula applied tensor by tensor is :func:`agc_reference_`; the
fused :func:`agc_` gives the same result with two norm reductions per tensor
and a few ``torch._foreach`` kernels for all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch

__all__ = ["agc_", "agc_reference_", "unitwise_norm"]

_MIN_GRAD_NORM = 1e-6  # the paper's guard against dividing by a vanishing gradient norm


def unitwise_norm(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """Norm of each unit: over the whole tensor for scalars and vectors,
    else over every dimension but the first (output rows and filters), kept
    as a broadcastable ``(out, 1, ...)`` tensor (``keepdim=False``: ``(out,)``)."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=keepdim)


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


def _sparse_agc_(p: torch.Tensor, clipping: float, eps: float) -> None:
    """:func:`agc_` for a sparse COO gradient (``nn.Embedding(sparse=True)``):
    coalesced (a row met twice in the batch is one unit), each unit that has
    entries clipped against its own weight's norm; units without entries
    have a zero gradient, which clipping leaves alone.  ``p.grad`` becomes
    the coalesced tensor.  A gradient whose units span several index rows
    (more than one sparse dimension, or a vector parameter) is clipped as
    the dense formula does and stored sparse again."""
    g = cast(torch.Tensor, p.grad).coalesce()
    if g.sparse_dim() != 1 or p.dim() < 2:
        d = g.to_dense()
        d.mul_(_scales(unitwise_norm(p), unitwise_norm(d), clipping, eps))
        p.grad = d.to_sparse(g.sparse_dim())
        return
    rows = g.indices()[0]
    vals = g.values()
    w_norm = unitwise_norm(p.detach().index_select(0, rows), keepdim=False)
    g_norm = unitwise_norm(vals, keepdim=False)
    vals.mul_(_scales(w_norm, g_norm, clipping, eps).view((-1,) + (1,) * (vals.dim() - 1)))
    p.grad = g


def _unit_norms(ts: list[torch.Tensor], order: list[int], stacked: list[list[int]]) -> torch.Tensor:
    """The unit norms of ``ts`` as one vector: each matrix's rows (``order``),
    then each group of equal-shaped vectors (``stacked``), stacked and reduced
    by one norm over their last dimension on the CPU, by one
    ``torch._foreach_norm`` elsewhere."""
    parts = [unitwise_norm(ts[i], keepdim=False) for i in order]
    for idx in stacked:
        vs = [ts[i] for i in idx]
        if vs[0].is_cpu:  # _foreach_norm loops over the tensors there: two ops for the group
            parts.append(torch.linalg.vector_norm(torch.stack(vs).view(len(vs), -1), dim=1))
        else:
            parts.append(torch.stack(torch._foreach_norm(vs)))
    return torch.cat(parts)


@torch.no_grad()
def agc_(parameters: Iterable[torch.Tensor] | torch.Tensor, clipping: float = 0.01, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping, in place on each parameter's ``.grad``.

    Unit-wise as in the paper (see the module docstring); parameters without a
    gradient are skipped.  Fused: one unit-norm reduction per weight and per
    gradient, read in place (no stacked copy), vectors' norms a few reductions
    for all of them; every unit's scale is then formed at once on the
    concatenated norms (five vector ops per device and dtype, not five per
    tensor) and applied with one ``torch._foreach_mul_``.  The scale is
    min(max_norm / max(||g_i||, 1e-6), 1), which equals the paper's
    ``where(||g_i|| > max_norm, max_norm / max(||g_i||, 1e-6), 1)`` whenever
    max_norm >= 1e-6 (always, at ``clipping * eps >= 1e-6``; below that the
    paper's form is used tensor by tensor): bit for bit equal to
    :func:`agc_reference_`.  The paper clips every layer but the
    classifier's final one: pass the parameters to clip, e.g.
    ``agc_(p for n, p in model.named_parameters() if not n.startswith("fc."))``.
    """
    _check(clipping, eps)
    ps = []
    for p in _with_grads(parameters):
        if p.grad is not None and p.grad.is_sparse:
            _sparse_agc_(p, clipping, eps)
        else:
            ps.append(p)
    if not ps:
        return
    gs: list[torch.Tensor] = [p.grad for p in ps]  # type: ignore[misc]
    if clipping * eps < _MIN_GRAD_NORM:
        torch._foreach_mul_(gs, [_scales(unitwise_norm(p), unitwise_norm(g), clipping, eps) for p, g in zip(ps, gs)])
        return
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (p, g) in enumerate(zip(ps, gs)):
        groups.setdefault((p.device, p.dtype, g.dtype), []).append(i)
    for idx in groups.values():
        order = [i for i in idx if ps[i].dim() > 1]
        shapes: dict[tuple[int, ...], list[int]] = {}
        for i in idx:
            if ps[i].dim() <= 1:
                shapes.setdefault(tuple(ps[i].shape), []).append(i)
        stacked = list(shapes.values())
        max_norm = _unit_norms(ps, order, stacked).clamp_min_(eps).mul_(clipping)
        scale = max_norm.div_(_unit_norms(gs, order, stacked).clamp_min_(_MIN_GRAD_NORM)).clamp_max_(1.0)
        rows = [ps[i].shape[0] for i in order]
        m = sum(rows)
        scales = [s if ps[i].dim() == 2 else s.view((-1,) + (1,) * (ps[i].dim() - 1))
                  for i, s in zip(order, scale[:m].view(-1, 1).split(rows))]
        vectors = [i for group in stacked for i in group]
        scales += [s if ps[i].dim() == 1 else s.view(()) for i, s in zip(vectors, scale[m:].split(1))]
        torch._foreach_mul_([gs[i] for i in order + vectors], scales)
