"""The relative update of every step, ``||w_t - w_{t-1}|| / ||w_{t-1}||`` over
the trained parameters, read at each ``Monitor.step`` without copying the
weights.

Each parameter contributes a fixed sample of at most ``PER_TENSOR = 4096``
of its entries: ``CHUNKS = 64`` runs of 64 contiguous entries spread evenly
over the flattened tensor (one strided view; reading it touches 16 KiB of a
tensor, not the tensor), the whole tensor when it is smaller.  For a weight
matrix a run is part of a row: the sample spans 64 output units.  The
sample of the previous step is kept and the norms of the difference and of
the previous sample are taken with each tensor's entries weighted by
``sqrt(numel / sampled)``, so that each tensor counts by its size in
``||dw||^2`` and ``||w||^2``.  The positions are fixed, not drawn: an
update that touches few rows (an embedding under SGD with sparse
gradients) reads 0 most steps and a large change when a sampled row is hit.
A parameter whose layout has no single view (overlapping or gapped strides)
is left out; a ``channels_last`` or transposed one is read in storage order.
Measured against the exact ratio, the worst of 20-25 steps for each of 8
seeds (SGD with momentum / Adam): an MLP 3.2% / 4.7%, an embedding model
3.3% / 4.5%, a CNN of 64-channel 3 x 3 convolutions 5.9% / 1.5%
(``tests/test_relative_update.py`` holds one seed of the MLP's).  Other
layouts were tried: 256 runs of 16 entries, with or without a spacing
that moves the runs' offsets inside a row, read the MLP and the embedding
model better (2.0-3.1%) but the CNN worse (6.5% / 4.9%; 25.6% unspaced,
where every run sat at the same input channels) at 0.35 ms more a step on
the 100 x 512 MLP; this layout's spacing, ``(n - RUN) / (CHUNKS - 1)``,
already moves a 512-wide matrix's runs by 64 columns a run.

What the step costs: two concatenations of the views into a buffer kept
between steps (two buffers in turn: this step's sample and the previous
one), the weighting in place, one subtraction into a third buffer and two
norms (BLAS dots on the CPU), and two scalars in the monitor's one transfer
per step (no host sync of its own); no tensor is allocated.
Both are norms, so under ``torch.distributed`` they combine over the ranks'
shards (FSDP) or over identical replicas (DDP, where the ratio is
unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

PER_TENSOR = 4096
CHUNKS = 64


RUN = PER_TENSOR // CHUNKS


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s entries as a 1-D view in storage order (a ``channels_last``
    weight or a transposed parameter is permuted into it first); None where
    no view reads them all (overlapping or gapped strides)."""
    if not t.is_contiguous():
        strides = t.stride()
        order = sorted(range(t.dim()), key=lambda i: (-strides[i], -t.shape[i]))
        t = t.permute(order)
        if not t.is_contiguous():
            return None
    return t.view(-1)


def _view(t: torch.Tensor) -> torch.Tensor | None:
    """The sampled entries of ``t`` as one view of ``RUN`` columns: ``CHUNKS``
    evenly spaced runs of ``RUN`` contiguous entries, or all of ``t`` when it
    is smaller (1-D when its size is not a multiple of ``RUN``).  A view, so
    that it reads the tensor's current values at every step; None where the
    tensor's layout has none (it is left out of both norms)."""
    flat = _flat(t)
    if flat is None:
        return None
    n = flat.numel()
    if n <= PER_TENSOR:
        return flat.view(-1, RUN) if n % RUN == 0 else flat
    return flat.as_strided((CHUNKS, RUN), ((n - RUN) // (CHUNKS - 1), 1), flat.storage_offset())


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard under FSDP2)."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


class _Group:
    """One device's sampled views, each sampled entry's weight, and two
    buffers the samples are read into in turn (this step's and the previous
    step's: no tensor is allocated per step)."""

    __slots__ = ("wide", "narrow", "split", "weights", "bufs", "diff")

    def __init__(self, wide: list[torch.Tensor], narrow: list[torch.Tensor], weights: torch.Tensor) -> None:
        self.wide, self.narrow = wide, narrow
        self.split = sum(v.numel() for v in wide)
        self.weights = weights
        self.bufs = [torch.empty_like(weights) for _ in range(2)]
        self.diff = torch.empty_like(weights)

    def read(self) -> torch.Tensor:
        """This step's weighted sample, in the buffer the step before last used."""
        self.bufs.reverse()
        buf = self.bufs[0]
        if self.wide:  # one concatenation of the views of RUN columns, one of the others, into place
            torch.cat(self.wide, out=buf[:self.split].view(-1, RUN))
        if self.narrow:
            torch.cat(self.narrow, out=buf[self.split:])
        return buf.mul_(self.weights)

    @property
    def prev(self) -> torch.Tensor:
        return self.bufs[1]


def _norm(t: torch.Tensor) -> torch.Tensor:
    """||t|| of a 1-D float32 buffer: a BLAS dot on the CPU (single-threaded,
    where the reduction wakes the thread pool), else ``vector_norm``."""
    return torch.dot(t, t).sqrt_() if t.is_cpu else torch.linalg.vector_norm(t)


class RelativeUpdate:
    """The sampled entries of the trained parameters, step after step."""

    def __init__(self) -> None:
        self._key: list[tuple[int, int]] = []  # (id, data_ptr) of each tensor: the views below are of these
        self._groups: dict[torch.device, _Group] = {}

    def _rebuild(self, tensors: Sequence[torch.Tensor]) -> None:
        """The views of each tensor's sample (those of ``RUN`` columns concatenated
        in one call, the rest after them) and each sampled entry's weight
        ``sqrt(numel / sampled)``, in the same order; the previous sample read."""
        views: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        weights: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for t in tensors:
            v = _view(t)
            if v is None:
                continue
            i = 0 if v.dim() == 2 else 1
            views.setdefault(t.device, ([], []))[i].append(v)
            weights.setdefault(t.device, ([], []))[i].append(  # float32 whatever the default dtype: the buffers' too
                torch.full((v.numel(),), math.sqrt(t.numel() / v.numel()), dtype=torch.float32))
        self._groups = {d: _Group(*views[d], torch.cat(w[0] + w[1]).to(d)) for d, w in weights.items()}
        for g in self._groups.values():
            g.read()

    def scalars(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor | float]:
        """``[||dw||, ||w||]`` estimated since the previous call (the weights'
        change over one optimizer step when called once a step);
        ``[0.0, 0.0]`` on the first call, whenever the parameters changed
        (another set, or a tensor's storage replaced) and without any: always
        two values, so that every rank sends as many to the all-reduce."""
        tensors, key = [], []
        for p in params:
            if p.is_floating_point():
                t = _local(p.detach())
                if t.numel() > 0:  # an empty shard (FSDP2, first dim < ranks): nothing here
                    tensors.append(t)
                    key.append((id(p), t.data_ptr()))
        if not tensors:
            self._key, self._groups = key, {}
            return [0.0, 0.0]
        if key != self._key:
            self._key = key
            self._rebuild(tensors)
            return [0.0, 0.0]
        if not self._groups:
            return [0.0, 0.0]
        diff: list[torch.Tensor] = []
        size: list[torch.Tensor] = []
        for g in self._groups.values():
            now = g.read()
            diff.append(_norm(torch.sub(now, g.prev, out=g.diff)))
            size.append(_norm(g.prev))
        if len(diff) == 1:
            return [diff[0], size[0]]
        first = diff[0].device
        return [torch.linalg.vector_norm(torch.stack([x.to(first) for x in diff])),
                torch.linalg.vector_norm(torch.stack([x.to(first) for x in size]))]

    @staticmethod
    def ratio(diff: float, size: float) -> float | None:
        """``diff / size``; None without a previous sample or when not finite."""
        if not size > 0 or not math.isfinite(diff) or not math.isfinite(size):
            return None
        return diff / size
