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
``||dw||^2`` and ``||w||^2``; the weighting is applied after the
subtraction (two float32 values an optimizer step apart differ exactly).
The samples are read in float32 (float64 for float64 parameters), whatever
the default dtype.  The positions are fixed, not drawn: an
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
one), one subtraction into a third buffer, the weighting into a fourth and
two sums of squares (BLAS dots on the CPU), and two scalars in the
monitor's one transfer per step (no host sync of its own); no tensor is
allocated.  Both are norms, so under ``torch.distributed`` they combine
over the ranks' shards (FSDP) or over identical replicas (DDP, where the
ratio is unchanged).

Each tensor's own ``||dw||`` and ``||w||`` (:meth:`RelativeUpdate.per_tensor`,
the per-module update after each sample, :mod:`.update`) come from the same
two samples: each tensor's sampled sum of squares times ``numel / sampled``
(exact for a tensor read whole).  Against the exact per-module update over
4 seeds of an MLP, a CNN, an embedding model and a transformer layer under
SGD with momentum, Adam and AdamW: medians 0-4%, the worst 16% (layers
behind ReLUs, whose dead units leave whole rows or input channels
unchanged); ``tests/test_relative_update.py`` holds one seed of the MLP's
and the CNN's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from ..probe.stats import Part

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
    """One device's (and precision's) sampled views, two buffers the samples
    are read into in turn (this step's and the previous step's: no tensor is
    allocated per step), the difference of the two, and what weights each
    sampled entry: ``sqrt(numel / sampled)`` of its tensor per entry (for the
    whole model's two norms), ``numel / sampled`` per tensor (for each
    tensor's) and the tensors' sample sizes in the buffer's order."""

    __slots__ = ("wide", "narrow", "split", "weights", "scale", "rows", "lengths", "bufs", "diff", "tmp", "size")

    def __init__(self, wide: list[torch.Tensor], narrow: list[torch.Tensor], weights: torch.Tensor,
                 scale: torch.Tensor, lengths: list[int]) -> None:
        self.wide, self.narrow = wide, narrow
        self.split = sum(v.numel() for v in wide)
        self.weights, self.scale = weights, scale
        dev = weights.device
        # sample sizes: in rows of RUN for the wide views (their entries are summed a row at a time first)
        self.rows = torch.tensor([n // RUN for n in lengths[:len(wide)]], dtype=torch.long, device=dev)
        self.lengths = torch.tensor(lengths[len(wide):], dtype=torch.long, device=dev)
        self.bufs = [torch.empty_like(weights) for _ in range(2)]
        self.diff = torch.empty_like(weights)
        self.tmp = torch.empty_like(weights)
        self.size: torch.Tensor | None = None  # ||w||^2 estimated from the last read

    def read(self) -> torch.Tensor:
        """This step's sample (the values as they are, weighted only in the
        norms), in the buffer the step before last used, and its weighted
        sum of squares kept in ``size``."""
        self.bufs.reverse()
        buf = self.bufs[0]
        if self.wide:  # one concatenation of the views of RUN columns, one of the others, into place
            torch.cat(self.wide, out=buf[:self.split].view(-1, RUN))
        if self.narrow:
            torch.cat(self.narrow, out=buf[self.split:])
        self.size = _sq(torch.mul(buf, self.weights, out=self.tmp))
        return buf

    @property
    def prev(self) -> torch.Tensor:
        return self.bufs[1]

    def per_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Each tensor's estimated sum of squares of ``t`` (a buffer in this
        group's layout), in float64: its sampled entries' sum of squares
        times numel / sampled."""
        sq = t * t
        parts = []
        if self.wide:
            rows = sq[:self.split].view(-1, RUN).sum(1)
            parts.append(torch.segment_reduce(rows, "sum", lengths=self.rows))
        if self.narrow:
            parts.append(torch.segment_reduce(sq[self.split:], "sum", lengths=self.lengths))
        return torch.cat(parts).double() * self.scale


def _sq(t: torch.Tensor) -> torch.Tensor:
    """The sum of squares of a 1-D buffer: a BLAS dot on the CPU
    (single-threaded, where the reduction wakes the thread pool), else
    ``vector_norm`` squared."""
    return torch.dot(t, t) if t.is_cpu else torch.linalg.vector_norm(t).square()


class RelativeUpdate:
    """The sampled entries of the trained parameters, step after step."""

    def __init__(self) -> None:
        self._key: list[tuple[int, int]] = []  # (id, data_ptr) of each tensor: the views below are of these
        self._groups: dict[tuple[torch.device, torch.dtype], _Group] = {}
        # each parameter's group and place in it (by id); the parameters left out (no single view) have none
        self._where: dict[int, tuple[tuple[torch.device, torch.dtype], int]] = {}
        self._fresh = False  # the last scalars() call read a difference (not a first or rebuilt sample)

    def _rebuild(self, params: Sequence[nn.Parameter], tensors: Sequence[torch.Tensor]) -> None:
        """The views of each tensor's sample (those of ``RUN`` columns concatenated
        in one call, the rest after them), grouped by device and by the
        precision they are read in (float64 for float64 parameters, else
        float32, whatever the default dtype), each sampled entry's weight
        ``sqrt(numel / sampled)`` in the same order; the first sample read."""
        found: dict[tuple[torch.device, torch.dtype], tuple[list[Any], list[Any]]] = {}
        for p, t in zip(params, tensors):
            v = _view(t)
            if v is None:
                continue
            key = (t.device, torch.float64 if t.dtype == torch.float64 else torch.float32)
            found.setdefault(key, ([], []))[0 if v.dim() == 2 else 1].append((p, v, t.numel()))
        self._groups, self._where = {}, {}
        for key, (wide, narrow) in found.items():
            ordered = wide + narrow
            weights = torch.cat([torch.full((v.numel(),), math.sqrt(n / v.numel()), dtype=key[1])
                                 for _, v, n in ordered]).to(key[0])
            scale = torch.tensor([n / v.numel() for _, v, n in ordered], dtype=torch.float64, device=key[0])
            g = _Group([v for _, v, _ in wide], [v for _, v, _ in narrow], weights, scale,
                       [v.numel() for _, v, _ in ordered])
            g.read()
            self._groups[key] = g
            for i, (p, _, _) in enumerate(ordered):
                self._where[id(p)] = (key, i)

    def scalars(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor | float]:
        """``[||dw||, ||w||]`` estimated since the previous call (the weights'
        change over one optimizer step when called once a step);
        ``[0.0, 0.0]`` on the first call, whenever the parameters changed
        (another set, or a tensor's storage replaced) and without any: always
        two values, so that every rank sends as many to the all-reduce."""
        self._fresh = False
        ps, tensors, key = [], [], []
        for p in params:
            if p.is_floating_point() or p.is_complex():
                t = _local(p.detach())
                if t.is_complex():  # its real and imaginary parts: the same norms
                    t = torch.view_as_real(t)
                if t.numel() > 0:  # an empty shard (FSDP2, first dim < ranks): nothing here
                    ps.append(p)
                    tensors.append(t)
                    key.append((id(p), t.data_ptr()))
        if not tensors:
            self._key, self._groups, self._where = key, {}, {}
            return [0.0, 0.0]
        if key != self._key:
            self._key = key
            self._rebuild(ps, tensors)
            return [0.0, 0.0]
        if not self._groups:
            return [0.0, 0.0]
        diff: list[torch.Tensor] = []
        size: list[torch.Tensor] = []
        for g in self._groups.values():
            size.append(cast(torch.Tensor, g.size))  # the previous sample's
            now = g.read()
            torch.sub(now, g.prev, out=g.diff)  # exact where the two are within 2x of each other (Sterbenz)
            diff.append(_sq(torch.mul(g.diff, g.weights, out=g.tmp)))
        self._fresh = True
        if len(diff) == 1:
            return [diff[0].sqrt(), size[0].sqrt()]
        first = diff[0].device
        return [torch.stack([x.to(first, torch.float64) for x in diff]).sum().sqrt(),
                torch.stack([x.to(first, torch.float64) for x in size]).sum().sqrt()]

    def per_tensor(self, params: Sequence[nn.Parameter]) -> tuple[list[tuple[Part | float, Part | float]], bool]:
        """``(||dw||, ||w||)`` of each of ``params`` over the optimizer step the
        last :meth:`scalars` call measured (float64 on the parameter's device,
        as entries of one vector per group, read with the step's transfer;
        estimated from its sampled entries, exact for a tensor read whole; 0
        for a parameter this rank holds no entry of), and whether any is
        missing (that call measured no step, or a parameter has no sample):
        a pair for every parameter either way, so that every rank sends as
        many values.  Read before the next :meth:`scalars`."""
        zero: list[tuple[Part | float, Part | float]] = [(0.0, 0.0)] * len(params)
        if not self._fresh:
            return zero, True
        out = list(zero)
        roots: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        for j, p in enumerate(params):
            where = self._where.get(id(p))
            if where is None:
                if _local(p.detach()).numel() > 0:
                    return zero, True  # not sampled (a layout with no single view)
                continue  # an empty shard: nothing here
            key, i = where
            if key not in roots:
                g = self._groups[key]
                roots[key] = (g.per_tensor(g.diff).sqrt_(), g.per_tensor(g.prev).sqrt_())
            d, w = roots[key]
            out[j] = (Part(d, i), Part(w, i))
        return out, False

    @staticmethod
    def ratio(diff: float, size: float) -> float | None:
        """``diff / size``; None without a previous sample or when not finite."""
        if not size > 0 or not math.isfinite(diff) or not math.isfinite(size):
            return None
        return diff / size
