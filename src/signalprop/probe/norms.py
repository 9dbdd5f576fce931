"""Parameter and gradient norms of the modules a pass recorded, still on their
devices until the pass is gathered."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..layers import own_parameters
from .distributed import REPLICA_NORM, _dtensor_types, local, norm_kind
from .recorder import Row, compiled
from .stats import Part, dottable


def module_params(rows: list[Row]) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    seen: set[int] = set()
    out = []
    for r in rows:
        m = r.module
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        # a compiled module's row stands for all of its inside (recorder.compiled)
        ps = list(cast(nn.Module, m._orig_mod).parameters()) if compiled(m) else own_parameters(m)
        if ps:
            out.append((m, ps))
    return out


def grad_values(g: torch.Tensor) -> torch.Tensor:
    """A gradient as a strided tensor of the same norm: a sparse one's stored
    values (``nn.Embedding(sparse=True)``; coalesced first, duplicate indices
    summed, so their norm is the gradient's), which the norm kernels take where
    the sparse tensor itself has no norm kernel; a dense one as it is."""
    if g.layout == torch.sparse_coo:
        return g.coalesce().values()
    if g.layout != torch.strided:  # compressed sparse layouts (CSR, CSC, BSR, BSC): no duplicate entries
        return g.values()
    return g


_DOT_NORM_MIN = 1 << 16  # smaller tensors: one _foreach_norm for all beats two dispatched ops each
# On the CPU tensors of at most _STACK_NORM_MAX entries are stacked for their norms, into one buffer per shape
# and dtype that every chunk reuses: 4,000 64 x 64 weights and gradients 26 -> 8 ms (_foreach_norm loops over
# the tensors on the CPU, ~2-6 us each); from ~16,384 entries on the copy costs more than it saves
_STACK_NORM_MAX = 1 << 13
_STACK_NORM_ENTRIES = 1 << 20  # entries per stacked chunk (4 MB in float32)


def norms(tensors: list[torch.Tensor], squares: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor | Part]:
    """Euclidean norms of many tensors, still on their device.  On a GPU one
    fused kernel per device and dtype (``torch._foreach_norm``, the op
    ``clip_grad_norm_`` uses).  On the CPU, where ``_foreach_norm`` loops
    over the tensors (2-4 us each), large contiguous float32/float64 tensors
    by a dot product each (their square roots taken together, one vector
    read as :class:`~.stats.Part` entries), and the smallest (biases, norm
    scales) of one shape and dtype stacked in bounded chunks and reduced
    together (one norm per chunk, read as parts too: 2,000 64-entry biases
    4.5 -> 0.7 ms).  ``squares``: filled with those dot products, the sums
    of squares, by index into ``tensors``."""
    out: list[torch.Tensor | Part | None] = [None] * len(tensors)
    fused: dict[tuple[Any, Any], list[int]] = {}
    stacks: dict[tuple[Any, Any], list[int]] = {}
    dots: list[int] = []
    sums: list[torch.Tensor] = []
    if _dtensor_types() is not None:
        tensors = [local(t) for t in tensors]  # a DTensor's own shard (FSDP2): combined across ranks later
    if not all(t.layout == torch.strided for t in tensors):  # a sparse gradient: its values
        tensors = [grad_values(t) for t in tensors]
    for i, t in enumerate(tensors):
        n = t.numel()
        if not t.is_cpu or _STACK_NORM_MAX < n < _DOT_NORM_MIN:
            fused.setdefault((t.device, t.dtype), []).append(i)
        elif n <= _STACK_NORM_MAX and t.dtype.is_floating_point:
            stacks.setdefault((t.dtype, t.shape), []).append(i)
        elif dottable(t):  # a BLAS dot: ~3x faster than _foreach_norm on 512 x 512
            v = t.view(-1)
            dots.append(i)
            sums.append(torch.dot(v, v))
        else:
            fused.setdefault((t.device, t.dtype), []).append(i)
    if dots:
        if squares is not None:
            squares.update(zip(dots, sums))
        for i, root in zip(dots, _roots(sums)):
            out[i] = root
    for idx in fused.values():
        for i, norm in zip(idx, torch._foreach_norm([tensors[i] for i in idx])):
            out[i] = norm
    for (dtype, shape), idx in stacks.items():
        numel = math.prod(shape)
        step = max(1, _STACK_NORM_ENTRIES // max(numel, 1))
        a = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        # (a fresh buffer per chunk was fresh memory to fault in: 3x slower than the stack itself; filled
        # without grad mode, which refuses out= for parameters that require grad)
        buf = torch.empty(min(step, len(idx)), *shape, dtype=dtype)
        for k in range(0, len(idx), step):
            chunk = idx[k:k + step]
            B = buf if len(chunk) == buf.shape[0] else buf[:len(chunk)]
            with torch.no_grad():
                torch.stack([tensors[i] for i in chunk], out=B)
            vec = torch.linalg.vector_norm(B.view(len(chunk), numel), dim=1, dtype=a)
            for j, i in enumerate(chunk):
                out[i] = Part(vec, j)
    return out  # type: ignore[return-value]


def _roots(sums: list[torch.Tensor]) -> list[Part]:
    """The square roots of sums of squares, taken together (one op per dtype)
    and read as parts of those vectors."""
    out: list[Part | None] = [None] * len(sums)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for j, s in enumerate(sums):
        by_dtype.setdefault(s.dtype, []).append(j)
    for js in by_dtype.values():
        roots = torch.stack([sums[j] for j in js]).sqrt_()
        for k, j in enumerate(js):
            out[j] = Part(roots, k)
    return out  # type: ignore[return-value]


@dataclass
class ParamNorms:
    """Per module: parameter and gradient norms, still on the device."""

    modules: list[tuple[nn.Module, int, list[int]]]  # module, numel, indices into the scalars
    scalars: list[torch.Tensor | Part]  # [||g_0||, ||w_0||, ||g_1||, ...]
    kinds: list[str]  # how each combines across ranks (sharded or replicated)
    # of each whole (unsharded) weight by id, still on the device: ||w||^2 (True) or ||w|| (False); the
    # theory column reads them from here rather than reading every weight again
    weight_norms: dict[int, tuple[torch.Tensor, bool]] = field(default_factory=dict)

    @staticmethod
    def of(rows: list[Row], grads: dict[nn.Parameter, torch.Tensor | None],
           known: dict[int, torch.Tensor | Part] | None = None) -> ParamNorms:
        """``known``: norms already computed, by ``id`` of the tensor (the
        monitor's per-step gradient norms), so no tensor is read twice."""
        mods: list[tuple[nn.Module, int, list[int]]] = []
        tensors: list[torch.Tensor] = []
        # by id: a tensor's own __hash__ is a Python method, called twice a parameter by the lookups below
        by_id = {id(p): g for p, g in grads.items() if g is not None}
        for m, ps in module_params(rows):
            have = [(p, g) for p in ps if (g := by_id.get(id(p))) is not None]
            if not have:
                continue
            idx = []
            for p, g in have:
                idx.append(len(tensors))
                tensors += [g, p]
            mods.append((m, sum(p.numel() for p, _ in have), idx))
        known = known or {}
        todo = [i for i, t in enumerate(tensors) if id(t) not in known]
        out: list[torch.Tensor | Part | None] = [known.get(id(t)) for t in tensors]
        squares: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for i, n in zip(todo, norms([tensors[i] for i in todo], squares) if todo else []):
                out[i] = n
        squared = {todo[j]: sq for j, sq in squares.items()}
        # (no tensor is a DTensor before torch.distributed.tensor is imported: all replicas then)
        kinds = [norm_kind(t) for t in tensors] if _dtensor_types() is not None else [REPLICA_NORM] * len(tensors)
        whole: dict[int, tuple[torch.Tensor, bool]] = {}
        for _, _, idx in mods:
            for i in idx:
                w, norm = i + 1, out[i + 1]
                if kinds[w] != REPLICA_NORM:
                    continue
                if w in squared:
                    whole[id(tensors[w])] = (squared[w], True)
                elif isinstance(norm, torch.Tensor):  # small ones (Parts) the theory stacks itself
                    whole[id(tensors[w])] = (norm, False)
        return ParamNorms(mods, out, kinds, whole)  # type: ignore[arg-type]

    def values(self, vals: list[float]) -> dict[nn.Module, tuple[float, float]]:
        """RMS of each module's own parameter gradients and ||grad|| / ||weight||."""
        out = {}
        for m, n, idx in self.modules:
            g2 = sum(vals[i] ** 2 for i in idx)
            w2 = sum(vals[i + 1] ** 2 for i in idx)
            out[m] = (math.sqrt(g2 / n), math.sqrt(g2 / w2) if w2 > 0 else math.inf)
        return out

