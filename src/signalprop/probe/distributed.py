"""Statistics reduced over a ``torch.distributed`` process group.

Under data parallelism (DDP, FSDP2) every rank sees its own slice of the
batch.  The training objective is the *mean* of the ranks' losses (both
average the parameter gradients), so one process on the concatenated batch
would see:

* forward sums, sums of squares and counts: the ranks' sums added;
* activation gradients: each rank's own divided by the world size (the
  gradient of the mean of the losses), so their squared norms add and are
  divided by ``world**2``;
* parameter gradients and weights: already identical on every rank (DDP,
  or a replicated placement) -- averaged, which changes nothing -- or sharded
  (FSDP2's ``DTensor`` shards), whose squared norms add;
* the loss: the ranks' mean;
* a unit is dead only when it is zero on every rank (per-unit "alive" flags
  added; a unit is alive where the sum is positive);
* maxima (the largest |value|): the largest on any rank (each rank writes its
  value into its own slot of a block of ``world`` entries, zeros elsewhere, so
  the one sum all-reduce hands every rank all of them).

:class:`Reduction` does all of that with **one** ``all_reduce`` of one
float64 buffer per call, whatever the depth.  Every rank must measure the
same modules in the same order (as DDP and FSDP already require).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

# How each scalar combines across ranks (see the module docstring): declared with the statistics
from ..statistics import (
    ANY,
    GRAD_MAX,
    GRAD_MIN,
    GRAD_NORM,
    GRAD_SQ,
    MAX,
    MEAN,
    MIN,
    NORM,
    RAW_REDUCTION,
    REPLICA_NORM,
    SHARD_NORM,
    SUM,
)
from .stats import Part

_SQUARED = (NORM, GRAD_NORM, REPLICA_NORM, SHARD_NORM)
_BLOCK = (MAX, GRAD_MAX, MIN, GRAD_MIN)  # each rank's value in its own slot of a block of world
# at most this many values are packed one by one (Reduction._pack_few)
FEW = 16


def _flag(t: torch.Tensor) -> torch.Tensor:
    return (t != 0).to(t.dtype)


_DTENSOR: list[tuple[type, type]] = []


def _dtensor_types() -> tuple[type, type] | None:
    """(DTensor, Shard), looked up once they exist: ``local`` and
    ``norm_kind`` run per tensor on every monitored step.  None while
    ``torch.distributed.tensor`` has not been imported (then no tensor can be
    a DTensor; importing it costs ~0.3 s, which a plain model never needs)."""
    if not _DTENSOR:
        mod = sys.modules.get("torch.distributed.tensor")
        if mod is None or not hasattr(mod, "DTensor"):  # not imported, or still being imported
            return None
        from torch.distributed.tensor import DTensor, Shard

        _DTENSOR.append((DTensor, Shard))
    return _DTENSOR[0]


def any_dtensor(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``."""
    types = _dtensor_types()
    return types is not None and any(isinstance(t, types[0]) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local part of a tensor (a ``DTensor``'s shard), else the tensor."""
    types = _dtensor_types()
    return t.to_local() if types is not None and isinstance(t, types[0]) else t  # type: ignore[attr-defined]


def norm_kind(t: torch.Tensor) -> str:
    """How the norm of this parameter (or gradient) combines across ranks:
    sharded ``DTensor`` pieces add, anything else is a replica."""
    types = _dtensor_types()
    if types is not None and isinstance(t, types[0]) and \
            any(isinstance(p, types[1]) for p in t.placements):  # type: ignore[attr-defined]
        return SHARD_NORM
    return REPLICA_NORM


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is a sharded ``DTensor`` (FSDP2, tensor parallel)."""
    return any(norm_kind(p) == SHARD_NORM for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wrapper holds (its names are
    the model's own, without ``module.``); anything else as it is."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        return model
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_ddp(model: nn.Module) -> bool:
    return unwrap(model) is not model


def resolve_group(group: Any) -> Any:
    """``group`` as given (reduced over even when it has one rank); None
    means the default (world) group when a process group is initialised
    with more than one rank, otherwise no reduction."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        if group is not None:
            raise ValueError("group= was given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        return None
    if group is not None:
        return group
    return torch.distributed.group.WORLD if torch.distributed.get_world_size() > 1 else None


class Reduction:
    """Combine per-rank scalars over ``group`` in one all-reduce per call."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = torch.distributed.get_world_size(group)
        self.rank = torch.distributed.get_rank(group)
        backend = str(torch.distributed.get_backend(group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def gather(self, values: Sequence[torch.Tensor | Part | float], kinds: Sequence[str]) -> list[float]:
        """Each value combined across ranks according to its kind, as floats.

        The values are laid into one float64 buffer with one indexed copy per
        source -- a batch vector's entries (:class:`~.stats.Part`) together,
        0-d tensors stacked by device and dtype, the floats as one tensor --
        rather than a conversion per value (a sampled step of a 100-row model
        holds ~1,000 of them: ~10 ms one at a time on the CPU); then, by kind,
        squared, turned into flags, or spread into a block of ``world``
        slots."""
        if len(values) != len(kinds):
            raise ValueError(f"{len(values)} values but {len(kinds)} kinds")
        packed = self._pack_few(values, kinds)
        buf, counts = packed if packed is not None else self._pack(values, kinds)
        torch.distributed.all_reduce(buf, group=self.group)
        return self._unpack(buf.cpu().tolist(), kinds, counts)

    def _pack_few(self, values: Sequence[torch.Tensor | Part | float],
                  kinds: Sequence[str]) -> tuple[torch.Tensor, list[int]] | None:
        """:meth:`_pack`'s buffer for a few single values (a step that is not
        sampled: the loss, the output's gradient norm, the relative update),
        built value by value: the index arithmetic that pays off for a sampled
        step's ~1,000 values costs ~0.2 ms on its own.  The floats are filled
        on the device (no transfer); None where it does not apply (a Part, a
        tensor of several entries, more than FEW values)."""
        if len(values) > FEW:
            return None
        dev, f64 = self.device, torch.float64
        pieces = []
        for v, k in zip(values, kinds):
            if isinstance(v, torch.Tensor):
                t = local(v).detach()
                if t.numel() != 1 or t.device != dev:  # (another device's: copied with its kind, in _pack)
                    return None
                t = t.reshape(1).to(dev, f64)
                if k in _SQUARED:
                    t = t * t
                elif k == ANY:
                    t = _flag(t)
            elif isinstance(v, (int, float)):
                f = float(v)
                f = f * f if k in _SQUARED else float(f != 0) if k == ANY else f
                t = torch.full((1,), f, dtype=f64, device=dev)
            else:
                return None
            if k in _BLOCK:  # this rank's slot of a block of world, zeros elsewhere
                t = torch.nn.functional.pad(t, (self.rank, self.world - self.rank - 1))
            pieces.append(t)
        counts = [self.world if k in _BLOCK else 1 for k in kinds]
        return (torch.cat(pieces) if pieces else torch.zeros(0, dtype=f64, device=dev)), counts

    def _pack(self, values: Sequence[torch.Tensor | Part | float],
              kinds: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """The values, by kind (squared, flags, each maximum spread into a
        block of ``world`` slots), in one float64 buffer on the reduction's
        device; and how many entries of it each value has."""
        sizes: list[int] = []
        floats: tuple[list[int], list[float]] = ([], [])
        singles: dict[tuple[Any, Any], tuple[list[int], list[torch.Tensor]]] = {}
        parts: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
        others: list[tuple[int, torch.Tensor]] = []
        at = 0
        for v in values:
            if type(v) is Part and v.vec.dim() == 1:
                e = parts.get(id(v.vec))
                if e is None:
                    e = parts[id(v.vec)] = (local(v.vec).detach(), [], [])
                e[1].append(at)
                e[2].append(v.i)
                n = 1
            elif isinstance(v, (torch.Tensor, Part)):
                t = local(v.tensor() if isinstance(v, Part) else v).detach()
                n = t.numel()
                if n == 1:
                    same = singles.setdefault((t.device, t.dtype), ([], []))
                    same[0].append(at)
                    same[1].append(t.reshape(()))
                elif n:
                    others.append((at, t.reshape(-1)))
            else:
                floats[0].append(at)
                floats[1].append(float(v))
                n = 1
            sizes.append(n)
            at += n
        dev, f64 = self.device, torch.float64
        # by kind, over the entries at once: squares, flags, and each maximum's block of world slots (this
        # rank's filled, zeros elsewhere); every index computed on the host and sent in one transfer (on a GPU,
        # one wait rather than one per index tensor)
        # (membership read in Python: np.isin on an object array sorts it, ~40 us a call even for 5 values)
        block = np.fromiter((k in _BLOCK for k in kinds), dtype=bool, count=len(kinds))
        squares = np.fromiter((k in _SQUARED for k in kinds), dtype=bool, count=len(kinds))
        flagged = np.fromiter((k == ANY for k in kinds), dtype=bool, count=len(kinds))
        n_in = np.array(sizes, dtype=np.int64)
        n_out = np.where(block, self.world * n_in, n_in)
        owner = np.repeat(np.arange(len(kinds)), n_in)  # the value each entry of x belongs to
        start_in, start_out = np.cumsum(n_in) - n_in, np.cumsum(n_out) - n_out
        total = int(n_out.sum())
        dest = start_out[owner] + np.arange(at) - start_in[owner] + np.where(block, self.rank * n_in, 0)[owner]
        # the floats as one tensor, the 0-d tensors stacked per device and dtype: each a block of values
        stacked = [(where, torch.stack(ts)) for where, ts in singles.values()]
        if floats[0]:
            stacked.append((floats[0], torch.tensor(floats[1], dtype=f64)))
        here = [(vec, where, idx) for vec, where, idx in parts.values() if vec.device == dev]
        away = [(vec, where, idx) for vec, where, idx in parts.values() if vec.device != dev]
        lists = [np.asarray(v, dtype=np.int64) for v in (
            *(where for where, _ in stacked), *(where for _, where, _ in here + away),
            *(idx for _, _, idx in here), np.flatnonzero(squares[owner]), np.flatnonzero(flagged[owner]), dest)]
        index = iter(torch.from_numpy(np.concatenate(lists)).to(dev).split([len(v) for v in lists]))
        x = torch.zeros(at, dtype=f64, device=dev)
        for _, values_ in stacked:
            x[next(index)] = values_.to(dev, f64)
        into = [next(index) for _ in parts]
        picked = [vec[i] for (vec, _, _), i in zip(here, [next(index) for _ in here])]
        picked += [vec[torch.tensor(idx, dtype=torch.long, device=vec.device)] for vec, _, idx in away]
        for where, entries in zip(into, picked):  # the parts on the reduction's device first, then the others
            x[where] = entries.to(dev, f64)
        for a_, t in others:
            x[a_:a_ + t.numel()] = t.to(dev, f64)
        squared, flags, dest_ = next(index), next(index), next(index)
        if squared.numel():
            x[squared] = x[squared].square()
        if flags.numel():
            x[flags] = _flag(x[flags])
        if total == at:
            return x, n_out.tolist()
        buf = torch.zeros(total, dtype=f64, device=dev)
        buf[dest_] = x
        return buf, n_out.tolist()

    def _unpack(self, flat: list[float], kinds: Sequence[str], counts: list[int]) -> list[float]:
        """Each value's combined value, from its ``counts`` entries in the reduced buffer."""
        out: list[float] = []
        i = 0
        w = float(self.world)
        for k, n in zip(kinds, counts):
            seg = flat[i:i + n]
            i += n
            s = seg[0] if seg else 0.0
            if k in (NORM, SHARD_NORM):
                out.append(math.sqrt(s) if s >= 0 else math.nan)
            elif k == GRAD_NORM:
                out.append(math.sqrt(s) / w if s >= 0 else math.nan)
            elif k == REPLICA_NORM:
                out.append(math.sqrt(s / w) if s >= 0 else math.nan)
            elif k == GRAD_SQ:
                out.append(s / (w * w))
            elif k == MEAN:
                out.append(s / w)
            elif k == ANY:
                out.append(float(sum(1 for x in seg if x > 0)))
            elif k == SUM:
                out.append(s)
            elif k == MAX:
                out.append(_extreme(max, seg))
            elif k == MIN:
                out.append(_extreme(min, seg))
            elif k == GRAD_MIN:
                out.append(_extreme(min, seg) / w)
            elif k == GRAD_MAX:
                out.append(_extreme(max, seg) / w)
            else:
                raise ValueError(f"unknown reduction kind {k!r}")
        return out

    def average_grads(self, tensors: list[torch.Tensor]) -> None:
        """Average plain (unsharded) gradients over the group in place, in one
        flattened all-reduce: what DDP's backward does, for a model checked
        without a DDP wrapper."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat, group=self.group)
        flat.div_(self.world)
        i = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[i:i + n].view_as(t))
            i += n


# Row statistics' raw values (probe.stats) and how each combines: read off their declarations
def _extreme(pick: Any, seg: list[float]) -> float:
    """``pick`` (max or min) of the ranks' values, NaN where one is NaN (as
    torch.amax over the concatenated batch gives): Python's max and min drop
    a NaN that follows a number; 0.0 without values."""
    if not seg:
        return 0.0
    return math.nan if any(x != x for x in seg) else float(pick(seg))


ROW_KINDS = RAW_REDUCTION
