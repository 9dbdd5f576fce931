"""The relative update of every step, ``||w_t - w_{t-1}|| / ||w_{t-1}||`` over
the trained parameters, read at each ``Monitor.step`` without copying the
weights, and each tensor's own update from the same samples.

Each parameter contributes a fixed sample of at most ``PER_TENSOR = 4096``
of its entries: ``CHUNKS = 64`` runs of 64 contiguous entries spread over
the flattened tensor (one strided view; reading it touches 16 KiB of a
tensor, not the tensor), the whole tensor when it is smaller.  For a weight
matrix a run is part of a row; the spacing of the runs is chosen so that
they start at columns spread over a row (:func:`_spacing`: spacing them by
the tensor's length over 63 put every run at the same columns wherever that
was a multiple of the row).  A ``channels_last`` or transposed parameter is
read in storage order; one whose layout has no single view (a slice of a
larger buffer) by index (``torch.take``).  The sample of the previous step
is kept and the norms of the difference and of the previous sample are
taken with each tensor's entries weighted by ``sqrt(numel / sampled)`` (in
place, as they are read), so that each tensor counts by its size in
``||dw||^2`` and ``||w||^2``; a tensor read whole weighs 1, so its
difference is exact (weighting after the subtraction instead cost two more
passes over the buffers, ~2 ms a step on the 100 x 512 MLP, for a
difference at most 2^-24 of the weights closer).  The samples are read in float32 (float64 for
float64 parameters; a complex one as its real and imaginary parts),
whatever the default dtype.  The positions are fixed, not drawn: an update
that touches few rows (an embedding under SGD with sparse gradients) reads
0 most steps and a large change when a sampled row is hit.  Measured
against the exact ratio (an earlier layout, the worst of 20-25 steps for
each of 8 seeds, SGD with momentum / Adam): an MLP 3.2% / 4.7%, an
embedding model 3.3% / 4.5%, a CNN of 64-channel 3 x 3 convolutions 5.9% /
1.5%; ``tests/test_relative_update.py`` holds one seed of the MLP's, within
5% on every step.

What the step costs: two concatenations of the views into a buffer kept
between steps (two buffers in turn: this step's sample and the previous
one), the weighting in place, one subtraction into a third buffer and
two sums of squares (BLAS dots on the CPU), and two scalars in the
monitor's one transfer per step (no host sync of its own); no tensor is
allocated.  Both are norms, so under ``torch.distributed`` they combine
over the ranks' shards (FSDP) or over identical replicas (DDP, where the
ratio is unchanged).

Each tensor's own ``||dw||`` and ``||w||`` (:meth:`RelativeUpdate.per_tensor`,
the per-module update after each sample, :mod:`.update`) come from the same
two samples: each tensor's sampled sum of squares times ``numel / sampled``
(exact for a tensor read whole).  A parameter once trained stays sampled
while the model holds it (a layer frozen after its step, a GAN's halves
trained in turn, keep the update they took); the whole model's ratio is
over the parameters trained at both of its reads.  When the sampled
parameters change (a layer trained for the first time, a tensor replaced)
the samples are laid out anew and the tensors sampled before keep their
previous sample, so their update over that step is still read.  A sampled
tensor of which 1 to ``MIN_CHANGED - 1`` runs moved gets no value (a few
rows moved: an embedding's); one of which none moved reads 0.  Against the exact per-module update over
4 seeds of an MLP, a CNN, an embedding model and a transformer layer under
SGD with momentum, Adam and AdamW: medians 0.5-3.7%, the worst 15% (a layer
behind ReLUs under SGD, whose dead units leave whole rows unchanged);
``tests/test_relative_update.py`` holds one seed of the MLP's and the CNN's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..probe.distributed import any_dtensor, local
from ..probe.stats import Part

PER_TENSOR = 4096
CHUNKS = 64
RUN = PER_TENSOR // CHUNKS
# A sampled tensor of which 1 to MIN_CHANGED - 1 of its CHUNKS runs moved gets no estimate: an update that
# moves a few rows (an embedding of 20,000 rows of which a batch touches 160, under SGD or SparseAdam) moves
# one run of 64 in some steps, and its estimate read up to twice the truth; a layer behind ReLUs keeps 4 or
# more runs moving until about 94% of its units are dead (at 90%, 10% off the exact update).  None moved
# reads 0: exact for a layer the optimizer does not hold or a rate of 0 (the update-too-small alert's
# cases), below the truth for an embedding of which the batch touched none of the 64 sampled rows.
MIN_CHANGED = 4
# the runs' spacing is at least this share of the largest that fits (the runs reach that far down the tensor's rows)
REACH = 0.75


def _flat(t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``t``'s entries as a 1-D view in storage order (a ``channels_last``
    weight or a transposed parameter is permuted into it first) and the
    length of a row in that order (the entries under one index of the
    leading dimension); None where no view reads them all (overlapping or
    gapped strides)."""
    if not t.is_contiguous():
        strides = t.stride()
        order = sorted(range(t.dim()), key=lambda i: (-strides[i], -t.shape[i]))
        t = t.permute(order)
        if not t.is_contiguous():
            return None
    return t.view(-1), _row(t)


def _row(t: torch.Tensor) -> int:
    """The entries under one index of ``t``'s leading dimension (all of a 1-D tensor)."""
    n = t.numel()
    return n // t.shape[0] if t.dim() > 1 and t.shape[0] > 0 else n


@functools.lru_cache(maxsize=1024)
def _spacing(n: int, row: int) -> int:
    """The distance between the starts of consecutive runs in a tensor of
    ``n`` entries whose rows are ``row`` long.  The largest that fits,
    ``(n - RUN) / (CHUNKS - 1)``, puts every run at the same columns wherever
    it is a multiple of the row (a Linear(100, 64): all 64 runs on inputs
    0-63, 36 of the 100 never read, the update read 50% low under SGD with
    inputs on different scales); so the spacing is chosen between ``REACH``
    of that and that (at least ``RUN``: no entry read twice) to cover the
    row's columns evenly: the shortest stretch of columns no run reads, then
    the fewest runs on the least-read column, then the most on the
    most-read, then the longest reach (a row longer than the sample: the
    runs' starts spread over it, the widest gap between them least).  At
    most 64 spacings are weighed, on arrays of at most 64 x 4096 entries."""
    base = (n - RUN) // (CHUNKS - 1)
    if row >= n or row <= RUN:
        return base
    low = max(RUN, math.ceil(REACH * base))
    steps = np.unique(np.linspace(low, base, num=min(64, base - low + 1)).round().astype(np.int64))
    starts = (steps[:, None] * np.arange(CHUNKS)[None, :]) % row
    if row > PER_TENSOR:  # the runs cannot cover a row this long: the starts spread over it, the widest gap least
        ordered = np.sort(starts, axis=1)
        widest = np.maximum(np.diff(ordered, axis=1).max(axis=1), ordered[:, 0] + row - ordered[:, -1])
        return int(steps[min(range(len(steps)), key=lambda i: (widest[i], -steps[i]))])
    cols = (starts[:, :, None] + np.arange(RUN)[None, None, :]).reshape(len(steps), -1) % row
    hits = np.stack([np.bincount(c, minlength=row) for c in cols])
    gaps = [_longest_zero_stretch(h) for h in hits]
    best = min(range(len(steps)), key=lambda i: (gaps[i], -hits[i].min(), hits[i].max(), -steps[i]))
    return int(steps[best])


def _longest_zero_stretch(h: np.ndarray) -> int:
    """The longest circular stretch of zeros in ``h``."""
    if h.all():
        return 0
    if not h.any():
        return len(h)
    z = np.concatenate([h, h]) == 0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], z.astype(np.int8), [0]])))
    return int(min(len(h), (edges[1::2] - edges[::2]).max()))


def _view(t: torch.Tensor) -> torch.Tensor | None:
    """The sampled entries of ``t`` as one view of ``RUN`` columns: ``CHUNKS``
    runs of ``RUN`` contiguous entries spread over the flattened tensor (see
    :func:`_spacing`), or all of ``t`` when it is smaller (1-D when its size
    is not a multiple of ``RUN``).  A view, so that it reads the tensor's
    current values at every step; None where the tensor's layout has none
    (:func:`_taken` reads it then)."""
    found = _flat(t)
    if found is None:
        return None
    flat, row = found
    n = flat.numel()
    if n <= PER_TENSOR:
        return flat.view(-1, RUN) if n % RUN == 0 else flat
    return flat.as_strided((CHUNKS, RUN), (_spacing(n, row), 1), flat.storage_offset())


def _taken(t: torch.Tensor) -> torch.Tensor:
    """The logical (row-major) indices of the entries :func:`_view` would
    sample, for a tensor whose layout has no single view (a slice of a larger
    buffer): read with ``torch.take`` at every step."""
    n = t.numel()
    if n <= PER_TENSOR:
        return torch.arange(n, device=t.device)
    starts = torch.arange(CHUNKS, device=t.device) * _spacing(n, _row(t))
    return (starts[:, None] + torch.arange(RUN, device=t.device)).reshape(-1)


class _Group:
    """One device's (and precision's) samples, read into one buffer in turn
    with the previous step's (no tensor is allocated per step): views of
    ``RUN`` columns (``wide``, one concatenation), other views (``narrow``,
    another) and tensors read by index (``taken``), in that order; the
    difference of the two samples; the weight of each sampled entry,
    ``sqrt(numel / sampled)`` of its tensor (applied as it is read, so that
    sums of squares count each tensor by its size); which of the views of
    ``RUN`` columns are whole tensors; and each tensor's place in the
    buffer."""

    __slots__ = ("wide", "narrow", "taken", "split", "weights", "mask", "kept", "whole", "rows", "lengths", "spans",
                 "bufs", "diff", "tmp")

    def __init__(self, wide: list[torch.Tensor], narrow: list[torch.Tensor],
                 taken: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor, whole: list[bool],
                 lengths: list[int]) -> None:
        self.wide, self.narrow, self.taken = wide, narrow, taken
        self.split = sum(v.numel() for v in wide)
        self.weights = weights
        # which tensors count in this step's two norms (as 1.0 / 0.0 per entry; None: all of them)
        self.mask: torch.Tensor | None = None
        self.kept: list[bool] = [True] * len(lengths)
        dev = weights.device
        self.whole = torch.tensor(whole[:len(wide)], dtype=torch.bool, device=dev)
        # sample sizes: in rows of RUN for the wide views (their entries are summed a row at a time first)
        self.rows = torch.tensor([n // RUN for n in lengths[:len(wide)]], dtype=torch.long, device=dev)
        self.lengths = torch.tensor(lengths[len(wide):], dtype=torch.long, device=dev)
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        self.spans = list(zip(starts[:-1], starts[1:]))
        self.bufs = [torch.empty_like(weights) for _ in range(2)]
        self.diff = torch.empty_like(weights)
        self.tmp = torch.empty_like(weights)

    def set_mask(self, kept: list[bool]) -> None:
        """Which tensors count in the two norms (those trained at both reads)."""
        if kept != self.kept:
            self.kept = kept
            if all(kept):
                self.mask = None
            else:
                self.mask = torch.ones_like(self.weights)
                for keep, (a, b) in zip(kept, self.spans):
                    if not keep:
                        self.mask[a:b] = 0

    def norms2(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The squared norms of this step's difference and of the previous
        sample, over the tensors :meth:`set_mask` kept."""
        if self.mask is None:
            return _sq(self.diff), _sq(self.prev)
        return _sq(torch.mul(self.diff, self.mask, out=self.tmp)), _sq(torch.mul(self.prev, self.mask, out=self.tmp))

    def read(self) -> torch.Tensor:
        """This step's weighted sample, in the buffer the step before last used."""
        self.bufs.reverse()
        buf = self.bufs[0]
        if self.wide:  # one concatenation of the views of RUN columns, one of the others, into place
            torch.cat(self.wide, out=buf[:self.split].view(-1, RUN))
        at = self.split
        if self.narrow:
            end = at + sum(v.numel() for v in self.narrow)
            torch.cat(self.narrow, out=buf[at:end])
            at = end
        for t, idx in self.taken:
            buf[at:at + idx.numel()] = torch.take(t, idx)
            at += idx.numel()
        return buf.mul_(self.weights)

    @property
    def prev(self) -> torch.Tensor:
        return self.bufs[1]

    def sums(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each tensor's sum of squares of ``t`` (a buffer in this group's
        layout, weighted: each tensor's estimated sum of squares), in
        float64; and the sums of the runs of the views of ``RUN`` columns
        (None without any), for :meth:`moved`."""
        sq = t * t
        parts = []
        rows = None
        if self.wide:
            rows = sq[:self.split].view(-1, RUN).sum(1)
            parts.append(torch.segment_reduce(rows, "sum", lengths=self.rows))
        if self.lengths.numel():
            parts.append(torch.segment_reduce(sq[self.split:], "sum", lengths=self.lengths))
        return torch.cat(parts).double(), rows

    def moved(self, rows: torch.Tensor | None) -> torch.Tensor:
        """How many of each tensor's runs hold a nonzero value, from the run
        sums :meth:`sums` gave for the difference (a tensor read whole, or
        not a view of ``RUN`` columns, counts as ``CHUNKS``)."""
        runs = []
        if rows is not None:
            moved = torch.segment_reduce((rows > 0).float(), "sum", lengths=self.rows)
            runs.append(moved.masked_fill_(self.whole, float(CHUNKS)))  # read whole: exact
        if self.lengths.numel():
            runs.append(torch.full((self.lengths.numel(),), float(CHUNKS), device=self.weights.device))
        return torch.cat(runs)


def _sq(t: torch.Tensor) -> torch.Tensor:
    """The sum of squares of a 1-D buffer: a BLAS dot on the CPU
    (single-threaded, where the reduction wakes the thread pool), else
    ``vector_norm`` squared."""
    return torch.dot(t, t) if t.is_cpu else torch.linalg.vector_norm(t).square()


_Key = tuple[torch.device, torch.dtype]


def _signature(params: Sequence[nn.Parameter]) -> list[tuple[Any, ...]] | None:
    """What :meth:`RelativeUpdate.scalars` reads of each parameter to sample it:
    its ``requires_grad``, dtype, conjugate and negative bits, address, shape
    and strides; None where a parameter has no address (a frozen sparse matrix,
    an mkldnn or nested tensor: a fresh scan each call, which leaves those out
    unless trained)."""
    try:
        return [(id(p), p.requires_grad, p.dtype, p.is_conj(), p.is_neg(), p.data_ptr(), p.shape, p.stride())
                for p in params]
    except (RuntimeError, NotImplementedError, ValueError):
        return None


class RelativeUpdate:
    """The sampled entries of the trained parameters, step after step."""

    def __init__(self) -> None:
        # (id, data_ptr, shape, strides) of each tensor: the samples below are of these
        self._key: list[tuple[int, int, torch.Size, tuple[int, ...]]] = []
        self._groups: dict[_Key, _Group] = {}
        # each parameter's group and place in it (by id)
        self._where: dict[int, tuple[_Key, int]] = {}
        # the parameters (by id) whose two samples span the step the last scalars() call measured
        self._spanned: set[int] = set()
        self._ids: dict[_Key, list[int]] = {}  # each group's parameters (by id), in its order
        self._trained: set[int] = set()  # the parameters (by id) trained at some call while the model held them
        self._was_trained: set[int] = set()  # those that required a gradient at the last call
        # each parameter's signature at the last call (see _signature), and what its scan found
        self._sig: list[tuple[Any, ...]] | None = None
        self._scan: tuple[list[nn.Parameter], list[torch.Tensor], list[Any], set[int]] = ([], [], [], set())
        self._masked: set[int] | None = None  # the set the groups' masks were last set from

    def _rebuild(self, params: Sequence[nn.Parameter], tensors: Sequence[torch.Tensor]) -> None:
        """The samples of each tensor (views of ``RUN`` columns concatenated
        in one call, the other views in another, tensors without a view read
        by index), grouped by device and by the precision they are read in
        (float64 for float64 parameters, else float32, whatever the default
        dtype), each sampled entry's weight ``sqrt(numel / sampled)`` in the
        same order; the first sample read.  A tensor sampled before, with the
        same storage and size, keeps its previous sample: its difference over
        this step is read as before (a layer trained for the first time does
        not cost the others their update)."""
        old = {i: (self._groups[key], self._groups[key].spans[j]) for i, (key, j) in self._where.items()}
        old_ptr = {k[0]: k[1:] for k in self._key}
        ptr = {id(p): (t.data_ptr(), t.shape, t.stride()) for p, t in zip(params, tensors)}
        found: dict[_Key, tuple[list[Any], list[Any], list[Any]]] = {}
        for p, t in zip(params, tensors):
            key = (t.device, torch.float64 if t.dtype == torch.float64 else torch.float32)
            v = _view(t)
            lists = found.setdefault(key, ([], [], []))
            if v is None:
                lists[2].append((p, (t, _taken(t)), t.numel()))
            else:
                lists[0 if v.dim() == 2 else 1].append((p, v, t.numel()))
        self._groups, self._where, self._spanned, self._ids = {}, {}, set(), {}
        self._masked = None
        for key, (wide, narrow, taken) in found.items():
            ordered = wide + narrow + taken
            sizes = [v.numel() for _, v, _ in wide + narrow] + [idx.numel() for _, (_, idx), _ in taken]
            weights = torch.cat([torch.full((k,), math.sqrt(n / k), dtype=key[1])
                                 for k, (_, _, n) in zip(sizes, ordered)]).to(key[0])
            g = _Group([v for _, v, _ in wide], [v for _, v, _ in narrow], [v for _, v, _ in taken], weights,
                       [k == n for k, (_, _, n) in zip(sizes, ordered)], sizes)
            now = g.read()
            for i, (q, _, _) in enumerate(ordered):
                self._where[id(q)] = (key, i)
                was = old.get(id(q))
                if was is not None and old_ptr.get(id(q)) == ptr[id(q)] and was[1][1] - was[1][0] == sizes[i]:
                    a, b = g.spans[i]
                    before = was[0].bufs[0]
                    g.prev[a:b] = before[was[1][0]:was[1][1]].to(g.prev.device, g.prev.dtype)
                    torch.sub(now[a:b], g.prev[a:b], out=g.diff[a:b])
                    self._spanned.add(id(q))
            self._groups[key] = g
            self._ids[key] = [id(q) for q, _, _ in ordered]

    def scalars(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor | float]:
        """``[||dw||, ||w||]`` estimated since the previous call (the weights'
        change over one optimizer step when called once a step), over the
        parameters of ``params`` (the model's) that require a gradient now
        and did at the previous call; ``[0.0, 0.0]`` on the first call, where
        no parameter was trained at both, and without any: always two
        values, so that every rank sends as many to the all-reduce.  A
        parameter once trained stays sampled while the model holds it (a
        layer frozen between two steps, or a GAN's two halves trained in
        turn, keeps the update it took: :meth:`per_tensor`)."""
        # the parameters as they were at the previous call (none is a DTensor, whose address is its shard's):
        # then the scan below would find what it found then, and what follows is as it was
        sig = _signature(params) if not any_dtensor(params) else None
        if sig is not None and sig == self._sig:
            ps, tensors, key, now_trained = self._scan
            both = self._was_trained = now_trained
        else:
            present = {id(p) for p in params}
            self._trained = {i for i in self._trained if i in present} | {id(p) for p in params if p.requires_grad}
            ps, tensors, key = [], [], []
            for p in params:
                if id(p) in self._trained and (p.is_floating_point() or p.is_complex()):
                    t = local(p.detach())
                    if t.is_complex():  # its real and imaginary parts: the same norms
                        t = torch.view_as_real(t)
                    if t.numel() > 0:  # an empty shard (FSDP2, first dim < ranks): nothing here
                        ps.append(p)
                        tensors.append(t)
                        key.append((id(p), t.data_ptr(), t.shape, t.stride()))  # p.data = p.data[:n]: same address
            now_trained = {id(p) for p in ps if p.requires_grad}
            both, self._was_trained = now_trained & self._was_trained, now_trained
            self._sig, self._scan = sig, (ps, tensors, key, now_trained)
        if not tensors:
            self._key, self._groups, self._where, self._spanned = key, {}, {}, set()
            return [0.0, 0.0]
        if key != self._key:
            self._rebuild(ps, tensors)
            self._key = key
            return [0.0, 0.0]
        diff: list[torch.Tensor] = []
        size: list[torch.Tensor] = []
        for k, g in self._groups.items():
            if both is not self._masked:
                g.set_mask([i in both for i in self._ids[k]])
            now = g.read()
            torch.sub(now, g.prev, out=g.diff)
            d2, w2 = g.norms2()
            diff.append(d2)
            size.append(w2)  # the previous sample's
        self._masked = both
        if len(self._spanned) != len(self._where):  # (a subset of it)
            self._spanned = set(self._where)
        if not both:
            return [0.0, 0.0]
        if len(diff) == 1:
            return [diff[0].sqrt(), size[0].sqrt()]
        first = diff[0].device
        return [torch.stack([x.to(first, torch.float64) for x in diff]).sum().sqrt(),
                torch.stack([x.to(first, torch.float64) for x in size]).sum().sqrt()]

    def per_tensor(self, params: Sequence[nn.Parameter]) -> list[tuple[Part | float, Part | float, float, Part | float]]:
        """``(||dw||, ||w||, read, changed)`` of each of ``params`` over the
        optimizer step the last :meth:`scalars` call measured: the norms in
        float64 on the parameter's device, as entries of one vector per group
        (read with the step's transfer), estimated from its sampled entries
        (exact for a tensor read whole), 0 for a parameter this rank holds no
        entry of; ``read`` 1.0 where this rank's two samples span that step
        (or it holds no entry), else 0.0 (its parameters changed: no value);
        ``changed`` how many of its ``CHUNKS`` runs moved (``CHUNKS`` for a
        tensor read whole: see :data:`MIN_CHANGED`).  As many values on
        every rank.  Read before the next :meth:`scalars`."""
        out: list[tuple[Part | float, Part | float, float, Part | float]] = []
        done: dict[_Key, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for p in params:
            where = self._where.get(id(p))
            if where is None:  # an empty shard here (1: nothing to add), or a parameter not sampled
                out.append((0.0, 0.0, 0.0 if local(p.detach()).numel() > 0 else 1.0, float(CHUNKS)))
                continue
            if id(p) not in self._spanned:
                out.append((0.0, 0.0, 0.0, float(CHUNKS)))
                continue
            key, i = where
            if key not in done:
                g = self._groups[key]
                d2, rows = g.sums(g.diff)
                done[key] = (d2.sqrt_(), g.sums(g.prev)[0].sqrt_(), g.moved(rows))
            d, w, moved = done[key]
            out.append((Part(d, i), Part(w, i), 1.0, Part(moved, i)))
        return out

    @staticmethod
    def ratio(diff: float, size: float) -> float | None:
        """``diff / size``; None without a previous sample or when not finite."""
        if not size > 0 or not math.isfinite(diff) or not math.isfinite(size):
            return None
        return diff / size
