"""Per-tensor statistics, reduced on the fly: the kernels of the statistics
declared in :mod:`signalprop.statistics` (a new statistic is its declaration
there and its kernel; the first ones' kernels below are hand-tuned).

Each function takes a module's output (or the gradient with respect to it),
in its own dtype, and returns 0-d tensors on its device: accumulation is in
float32 through ``dtype=`` (no float32 copy of a bf16 tensor), nothing is
read back to the host during the pass (no synchronisation), and nothing
larger than a scalar is kept, so memory beyond autograd's own is
O(number of rows).  Small outputs are instead copied into a shared buffer of
bounded size (:class:`Batches`, at most 1 MB on the CPU and 8 MB on a GPU per
shape, dtype and activation) and reduced together when it fills, the results
one vector per batch and statistic (:data:`Batched`).  :mod:`.check` gathers the
scalars and vectors into one buffer per device at the end.

Non-finite values need no check of their own here: a NaN or Inf anywhere
makes the sum or the norm non-finite, which the end of the pass reads; only
then is the pass repeated with :func:`exact_moments`, which masks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..statistics import BACKWARD_KERNELS, FORWARD_KERNELS, Statistic

_LOW = (torch.float16, torch.bfloat16)
_DOT = (torch.float32, torch.float64)
# a complex tensor's sums and norms need a complex dtype= (a real one drops the imaginary part, or is refused)
_COMPLEX_ACC = {torch.complex32: torch.complex64, torch.complex64: torch.complex64,
                torch.complex128: torch.complex128}


def acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half precision, the tensor's own above,
    complex64 or complex128 for a complex tensor (decided in Python: no
    dispatched op)."""
    if t.is_floating_point():
        return torch.float32 if t.dtype in _LOW else t.dtype
    return _COMPLEX_ACC.get(t.dtype, torch.float32)


def exact_acc(t: torch.Tensor) -> torch.dtype:
    """The exact pass's dtype (:func:`exact_moments`): float64, complex128 for a complex tensor."""
    return torch.complex128 if t.is_complex() else torch.float64


def dottable(t: torch.Tensor) -> bool:
    """A contiguous float32/float64 tensor on the CPU, whose sum of squares is
    one BLAS dot product (2-2.5x faster there than ``vector_norm``'s
    reduction on 10^4-10^5 entries; same float32 accumulation, same overflow
    to inf that sends the pass to :func:`exact_moments`)."""
    return t.is_cpu and t.dtype in _DOT and t.dim() > 0 and t.is_contiguous()


# rows of at least this many entries are summed by ``sum`` (multithreaded, one read): at 2^20 float32
# entries it measured 0.06 ms against 0.18 ms for the dot with ones, which also reads the ones
_SUM_DOT_MAX = 1 << 20


def forward_kernels_into(d: dict[str, Any], y: torch.Tensor, bounded: bool, dim: int | None = None,
                         kernels: list[Statistic] | None = None) -> None:
    """The declared forward statistics with kernels of their own (max |y|,
    ...), those that say a bounded activation's range answers them skipped
    there (two ops a row saved: the per-row op budget of tests/test_check_cost.py).
    ``kernels``: the pass's list (:func:`signalprop.statistics.kernels`;
    default those measured on every pass)."""
    for st in FORWARD_KERNELS if kernels is None else kernels:
        if not (bounded and st.unbounded_only):
            st.measure_into(d, y, dim)


def backward_kernels_into(d: dict[str, Any], g: torch.Tensor, dim: int | None = None,
                          kernels: list[Statistic] | None = None) -> None:
    """The declared gradient statistics with kernels of their own (max
    |gradient|, ...); ``kernels`` as in :func:`forward_kernels_into`."""
    for st in BACKWARD_KERNELS if kernels is None else kernels:
        st.measure_into(d, g, dim)


def forward_moments_into(d: dict[str, torch.Tensor | float], y: torch.Tensor,
                         scratch: Scratch, bounded: bool = False,
                         kernels: list[Statistic] | None = None) -> torch.Tensor | None:
    """Sum and Euclidean norm of a row's output (mean = sum / n, second
    moment = norm^2 / n, formed in float64 at the end, where squares cannot
    overflow), written into ``d``: two fused reductions, accumulating in
    float32 for half precision.  On the CPU the sum and the sum of squares
    (``forward_sq``, instead of the norm) are two dot products, with a reused
    vector of ones and with the tensor itself: BLAS dots run on the calling
    thread, where ``sum`` woke the intra-op thread pool and measured 40 us on
    a 256 x 512 row inside a pass against 10 us for a dot.  From
    :data:`_SUM_DOT_MAX` entries on the sum is ``sum`` again, which reads the
    row once where the dot reads it and a vector of ones as long (GPT-2's
    logits at batch 8 x 512: 823 MB more memory, and 0.83 s for both dots).
    Returns the 1-D view of ``y`` the dots read (None off that path), for
    :func:`saturation_into` to read too rather than make its own.  A complex
    output's sum is kept as its modulus (the raw values are real): its mean is
    ``|E[y]|``, its second moment ``E[|y|^2]`` and their difference the complex
    variance ``E[|y - E[y]|^2]``."""
    n = y.numel()
    d["forward_n"] = float(max(n, 1))
    forward_kernels_into(d, y, bounded, None, kernels)
    if dottable(y):
        v = y.view(-1)
        d["forward_sum"] = torch.dot(v, scratch.ones(v)) if n < _SUM_DOT_MAX else v.sum()
        d["forward_sq"] = torch.dot(v, v)
        return v
    a = acc(y)
    s = y.sum(dtype=a)
    d["forward_sum"] = s.abs() if s.is_complex() else s
    d["forward_norm"] = torch.linalg.vector_norm(y, dtype=a)
    return None


# Gradients are reduced inside the autograd engine's pass, where a BLAS dot on
# fewer entries than this measured 2-4x slower than vector_norm (per row: 16,384
# entries 10 vs 2.3 us, 24,576 16 vs 8 us, 8,192 9 vs 5 us); from 32,768 entries
# on the dot was as fast or faster (131,072: 35 vs 100 us).
_GRAD_DOT_MIN = 1 << 15


def grad_moments_into(d: dict[str, torch.Tensor | float], g: torch.Tensor,
                      kernels: list[Statistic] | None = None) -> None:
    """Norm of a gradient (mean square = norm^2 / n), written into ``d``: one
    reduction (on the CPU, from :data:`_GRAD_DOT_MIN` entries on, the sum of
    squares ``grad_sq``, a dot product, as above)."""
    n = g.numel()
    d["grad_n"] = float(max(n, 1))
    backward_kernels_into(d, g, None, kernels)
    if n >= _GRAD_DOT_MIN and dottable(g):
        v = g.view(-1)
        d["grad_sq"] = torch.dot(v, v)
    else:
        d["grad_norm"] = torch.linalg.vector_norm(g, dtype=acc(g))


def exact_moments(t: torch.Tensor, prefix: str, bounded: bool = False,
                  kernels: list[Statistic] | None = None) -> dict[str, torch.Tensor | float]:
    """Sum and norm over the finite entries only, in float64, and the
    non-finite share: the slow path, run only when a pass met NaN/Inf (or a
    float32 overflow of the fast norm); a complex tensor in complex128, its
    sum kept as its modulus (see :func:`forward_moments_into`)."""
    x = t.detach().to(exact_acc(t))
    finite = torch.isfinite(x)
    xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    out: dict[str, torch.Tensor | float] = {f"{prefix}_norm": torch.linalg.vector_norm(xf),
                                            f"{prefix}_n": finite.sum().clamp_min(1).double(),
                                            f"{prefix}_nonfinite": 1.0 - finite.double().mean()}
    if prefix == "forward":
        out["forward_sum"] = xf.sum().abs() if xf.is_complex() else xf.sum()
    if prefix == "forward":
        forward_kernels_into(out, xf, bounded, None, kernels)
    else:
        backward_kernels_into(out, xf, None, kernels)
    return out


def saturated_count(y: torch.Tensor, band: tuple[float, float], dim: int | None = None) -> torch.Tensor:
    """Number of outputs in the saturated band ``|y - c| > t`` (see
    :func:`signalprop.activations.saturation_band`), over every entry or
    along ``dim``: exact (one comparison chain and one sum; no subsample that
    could alias with the tensor's layout)."""
    c, t = band
    z = (y if c == 0.0 else y - c).abs()
    if y.is_cuda:  # a comparison and a sum: the fewest kernels
        return (z > t).sum(dim=dim, dtype=torch.float32)
    # on CPU a float->bool comparison costs 2-3x these in-place steps (1 where |y - c| > t, else 0)
    return z.sub_(t).relu_().sign_().sum(dim=dim, dtype=torch.float32)


def saturation(y: torch.Tensor, band: tuple[float, float]) -> dict[str, torch.Tensor | float]:
    """:func:`saturated_count` over every entry, and the number of entries."""
    return {"saturated_count": saturated_count(y, band), "saturated_n": float(max(y.numel(), 1))}


def _signs_apply(y: torch.Tensor) -> bool:
    """Whether :func:`band_signs` counts ``y``'s saturated entries (on the CPU)."""
    return not y.is_cuda and y.dtype in _DOT + _LOW


def band_signs(y: torch.Tensor, band: tuple[float, float], z: torch.Tensor) -> torch.Tensor:
    """``z`` (a buffer shaped like ``y``) set to +-1 where ``|y - c| > t`` and
    0 elsewhere: ``hardshrink`` keeps exactly the entries with ``|y - c| > t``
    (strictly, as the comparison does) and zeroes the rest, so the sum of
    squares of their signs is the count: three passes over the tensor and no
    allocation, where the comparison chain took five passes and a new tensor."""
    c, t = band
    if c != 0.0:
        torch.sub(y, c, out=z)
    return torch.hardshrink(z if c != 0.0 else y, t, out=z).sign_()


def _sign_count(z: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The number of nonzero entries of :func:`band_signs`' +-1/0 output (over
    every entry or along ``dim``) as its sum of squares, read off a norm: the
    norm's sqrt and the square round (2,002 came back as 2001.9999), and
    ``round_()`` restores the integer (exact below 2^21 entries)."""
    return torch.linalg.vector_norm(z, dim=dim, dtype=acc(z)).square_().round_()


class Scratch:
    """One reusable buffer per dtype and device for the elementwise step of a
    statistic: a fresh full-size tensor per row made the allocator map and
    fault in new pages on every call (hardshrink measured 155 us per
    256 x 512 row inside a pass vs 10 us on a reused buffer).  It grows to
    the largest row measured, once."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        # the buffer's first n entries as a 1-D view, by (dtype, device, n): made once per row size
        # rather than sliced per row (dropped when a buffer grows)
        self._flat: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}
        self._ones: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}  # one per row size

    def ones(self, v: torch.Tensor) -> torch.Tensor:
        """A vector of ones as long as ``v``, in its dtype and on its device
        (kept per length: a net has few distinct row sizes; only rows below
        :data:`_SUM_DOT_MAX` entries ask for one)."""
        n = v.numel()
        key = (v.dtype, v.device, n)
        b = self._ones.get(key)
        if b is None:
            b = self._ones[key] = torch.ones(n, dtype=v.dtype, device=v.device)
        return b

    def _buffer(self, y: torch.Tensor) -> torch.Tensor:
        key = (y.dtype, y.device)
        b = self._bufs.get(key)
        if b is None or b.numel() < y.numel():
            b = self._bufs[key] = torch.empty(y.numel(), dtype=y.dtype, device=y.device)
            self._flat = {k: v for k, v in self._flat.items() if k[:2] != key}
        return b

    def like(self, y: torch.Tensor) -> torch.Tensor:
        """The buffer's first entries, shaped like ``y``."""
        return self._buffer(y)[:y.numel()].view(y.shape)

    def flat(self, v: torch.Tensor) -> torch.Tensor:
        """The buffer's first entries as a 1-D tensor as long as ``v``."""
        b = self._buffer(v)
        key = (v.dtype, v.device, v.numel())
        f = self._flat.get(key)
        if f is None:
            f = self._flat[key] = b[:v.numel()]
        return f


def saturation_into(d: dict[str, torch.Tensor | float], y: torch.Tensor, band: tuple[float, float],
                    scratch: Scratch, flat: torch.Tensor | None = None) -> None:
    """:func:`saturation` written into ``d``.  On the CPU by :func:`band_signs`
    into a reused buffer, the count the sum of their squares.  ``flat``: the
    1-D view of ``y`` that :func:`forward_moments_into` returned, read in
    its place (with a 1-D buffer, no view is made for the dot)."""
    if not _signs_apply(y):
        d.update(saturation(y, band))
        return
    d["saturated_n"] = float(max(y.numel(), 1))
    if flat is not None:
        z = band_signs(flat, band, scratch.flat(flat))
        d["saturated_count"] = torch.dot(z, z)
        return
    z = band_signs(y, band, scratch.like(y))
    if dottable(z):
        v = z.view(-1)
        d["saturated_count"] = torch.dot(v, v)
    else:
        d["saturated_count"] = _sign_count(z)


# A unit that fires on a share p of the inputs looks dead on k examples and
# positions with probability (1 - p)^k: 2^-k for a symmetric unit, but in real
# nets many units fire rarely (ReLU after a convolution of non-negative inputs,
# BatchNorm at its default running statistics in eval mode).  From k = 32 on,
# a unit firing on 10% of inputs looks dead with probability 3.4% (0.9^32), far
# from the 50% share that makes a row "dead"; below that the data cannot tell.
MIN_SAMPLES_PER_UNIT = 32


def _alive_flags(y: torch.Tensor, others: tuple[int, ...], nonnegative: bool) -> torch.Tensor:
    """Per unit (reduced over the dimensions ``others``), whether any of its
    entries is not 0: a NaN counts as alive."""
    if not others:
        return y != 0
    if nonnegative:  # ReLU: a unit is alive where its largest output is not 0
        return torch.amax(y, dim=others) != 0
    return (torch.amax(y, dim=others) != 0) | (torch.amin(y, dim=others) != 0)


def dead_units(y: torch.Tensor, feature_dim: int, vector: bool = False,
               nonnegative: bool = False) -> dict[str, torch.Tensor | float] | None:
    """Number of units (entries along ``feature_dim``: the last dimension for
    Linear outputs, dimension 1 for convolutions) that are exactly zero for
    every example *and* position, and how many samples each unit had (the
    verdict judges the share only from :data:`MIN_SAMPLES_PER_UNIT` on).
    ``vector``: the per-unit alive flags instead of their count (under
    ``torch.distributed`` a unit is dead only if it is dead on every rank).
    Read off per-unit maxima (and minima unless the activation is
    ``nonnegative``): reductions only, no full-size comparison tensor
    (``amax`` measured 10-50x faster than ``any(y != 0)`` on the CPU)."""
    if y.dim() == 0 or y.numel() == 0:
        return None
    fd = feature_dim % y.dim()
    units = y.shape[fd]
    alive = _alive_flags(y, tuple(d for d in range(y.dim()) if d != fd), nonnegative)
    if vector:
        return {"alive": alive, "units": float(units), "dead_samples": float(y.numel() // units)}
    return {"alive_count": alive.sum(dtype=torch.float32), "units": float(units),
            "dead_samples": float(y.numel() // units)}


# Small rows are measured in batches: each output is copied into a shared
# buffer (one op, one kernel) and the buffer's rows are reduced together when
# it fills, where measuring each on its own took two to five ops.  On the CPU
# each of those ops costs more to dispatch than to run on a 64-wide layer's
# 16,384 outputs, and the buffer is kept small enough to stay in cache between
# the copies and the reductions (4 MB buffers measured slower than 1 MB ones on
# a 2000 x 64 MLP: each reduction read them back from memory).  On a GPU
# every op is a kernel launch, so larger rows gain too.  Larger outputs are
# cheaper to reduce in place than to copy.  (row entries, buffer bytes):
BATCH_LIMITS = {"cpu": (1 << 15, 1 << 20), "cuda": (1 << 18, 1 << 23)}


class Part:
    """Entry ``i`` of a statistic computed for several tensors at once: a
    vector (one value per tensor) or, for per-unit flags, a matrix (one row
    per row of the pass); read when the pass is gathered (see
    :func:`signalprop.probe.gather.gather`)."""

    __slots__ = ("vec", "i")

    def __init__(self, vec: torch.Tensor, i: int) -> None:
        self.vec = vec
        self.i = i

    def tensor(self) -> torch.Tensor:
        return self.vec[self.i]


# A measured batch: the rows' statistic dicts, and per statistic the vector
# (or, for per-unit flags, the matrix) whose j-th entry is the j-th row's.
# Kept whole rather than written into each dict as a Part: the gathering
# assigns a vector's values to its rows in one loop (see
# :class:`signalprop.probe.gather.Pending`).
Batched = tuple[list[dict[str, Any]], dict[str, torch.Tensor]]


def as_parts(done: list[Batched]) -> None:
    """Each batched row's statistics written into its dict as :class:`Part`
    entries: the per-value form in which a reduction across ranks takes them."""
    for dicts, vecs in done:
        for key, vec in vecs.items():
            for j, d in enumerate(dicts):
                d[key] = Part(vec, j)


def _buffer_rows(t: torch.Tensor) -> int:
    """How many entries like ``t`` one batch buffer holds (:data:`BATCH_LIMITS`' bytes, at least 2)."""
    return max(2, BATCH_LIMITS[t.device.type][1] // max(t.numel() * t.element_size(), 1))


class _Slots:
    """A buffer whose rows take one entry each, with views of the rows in the
    entry's shape.  It starts at 16 rows and doubles after each flush up to
    ``cap``: a buffer of ``cap`` rows with every view made up front cost
    0.7 ms a bucket to allocate and 0.6 ms to view, most of check's fixed cost
    on a small model, while long models still fill few large buffers."""

    FIRST = 16

    def __init__(self, like: torch.Tensor, cap: int) -> None:
        self.shape = tuple(like.shape)
        self.n = like.numel()
        self.dtype, self.device = like.dtype, like.device
        self.max = cap
        self._alloc(min(cap, self.FIRST))

    def _alloc(self, rows: int) -> None:
        self.cap = rows
        self.buf = torch.empty(rows, self.n, dtype=self.dtype, device=self.device)
        self.views = self.buf.view(rows, *self.shape).unbind(0)

    def grow(self) -> None:
        """After a flush: the next buffer twice as long, up to ``max``."""
        if self.cap < self.max:
            self._alloc(min(self.max, 2 * self.cap))


class _Bucket:
    """Outputs of one shape, dtype, device and activation traits, copied into
    a buffer until it fills, then measured together."""

    def __init__(self, y: torch.Tensor, band: tuple[float, float] | None, rectifier: bool, nonnegative: bool,
                 feature_dim: int, unit_vectors: bool, done: list[Batched],
                 kernels: list[Statistic] | None = None) -> None:
        self.kernels = kernels
        self.shape = tuple(y.shape)
        self.n = y.numel()
        self.slots = _Slots(y, _buffer_rows(y))  # views made once, not per row
        self.dicts: list[dict[str, Any]] = []
        self.band = band
        self.rectifier = rectifier
        self.nonnegative = nonnegative
        self.feature_dim = feature_dim
        self.unit_vectors = unit_vectors
        self.done = done
        self.z: torch.Tensor | None = None

    def add(self, d: dict[str, Any], y: torch.Tensor) -> None:
        self.slots.views[len(self.dicts)].copy_(y)
        self.dicts.append(d)
        if len(self.dicts) == self.slots.cap:
            self.flush()
            self.slots.grow()

    def flush(self) -> None:
        k = len(self.dicts)
        if not k:
            return
        buf = self.slots.buf
        B = buf if k == self.slots.cap else buf[:k]
        a = acc(B)
        vecs = {"forward_sum": B.sum(dim=1, dtype=a), "forward_norm": torch.linalg.vector_norm(B, dim=1, dtype=a)}
        forward_kernels_into(vecs, B, self.band is not None, 1, self.kernels)
        n = float(self.n)  # > 0: Batches.fits takes no empty output
        const: dict[str, float] = {"forward_n": n}  # what every row of the batch shares, written in one update
        if self.band is not None:
            vecs["saturated_count"] = self._saturated(B)
            const["saturated_n"] = n
        if self.rectifier:
            vecs["alive" if self.unit_vectors else "alive_count"] = self._alive(B)
            units = self.shape[self.feature_dim % len(self.shape)]
            const["units"] = float(units)
            const["dead_samples"] = float(self.n // units)
        for d in self.dicts:
            d.update(const)
        self.done.append((self.dicts, vecs))
        self.dicts = []

    def _saturated(self, B: torch.Tensor) -> torch.Tensor:
        """Per row, how many entries lie in the saturated band (see :func:`saturation_into`)."""
        band = self.band
        assert band is not None
        if not _signs_apply(B):
            return saturated_count(B, band, dim=1)
        if self.z is None or self.z.shape[0] < B.shape[0]:
            self.z = torch.empty_like(self.slots.buf)
        z = band_signs(B, band, self.z if B.shape[0] == self.z.shape[0] else self.z[:B.shape[0]])
        return _sign_count(z, dim=1)  # count_nonzero(dim=) measured 10x slower

    def _alive(self, B: torch.Tensor) -> torch.Tensor:
        """Per row, the units that are not zero for every example and position
        (see :func:`dead_units`): their count, or their flags."""
        Y = B.view(B.shape[0], *self.shape)
        fd = self.feature_dim % len(self.shape) + 1
        alive = _alive_flags(Y, tuple(i for i in range(1, Y.dim()) if i != fd), self.nonnegative)
        return alive if self.unit_vectors else alive.sum(dim=1, dtype=torch.float32)


class Batches:
    """The buckets of one pass (see :data:`BATCH_LIMITS`)."""

    def __init__(self, unit_vectors: bool = False, kernels: list[Statistic] | None = None) -> None:
        self.unit_vectors = unit_vectors
        self.kernels = kernels
        self._buckets: dict[tuple[Any, ...], _Bucket] = {}
        self.done: list[Batched] = []  # one entry per measured batch, in the order they filled

    @staticmethod
    def fits(y: torch.Tensor) -> bool:
        """Whether ``y`` is measured in a batch: a small real floating-point
        output on a device with limits."""
        # is_cpu / is_cuda: flags read without building a torch.device per row
        lim = BATCH_LIMITS["cpu"] if y.is_cpu else BATCH_LIMITS["cuda"] if y.is_cuda else None
        return lim is not None and 0 < y.numel() <= lim[0] and y.dim() > 0 and y.is_floating_point()

    def add(self, d: dict[str, Any], y: torch.Tensor, band: tuple[float, float] | None, rectifier: bool,
            nonnegative: bool, feature_dim: int) -> None:
        # get_device(): -1 on the CPU, else the CUDA index (fits() admits no other device)
        key = (y.shape, y.dtype, y.get_device(), band, rectifier, nonnegative, feature_dim if rectifier else 0)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(y, band, rectifier, nonnegative, feature_dim, self.unit_vectors,
                                                 self.done, self.kernels)
        b.add(d, y)

    def flush(self) -> None:
        for b in self._buckets.values():
            b.flush()


class GradBatches:
    """Small gradients (see :meth:`Batches.fits`), copied during the backward
    into one buffer per shape, dtype and device and reduced together at the
    end: the norm, the largest and smallest entry per row (one copy per row
    instead of three reductions; on a 2,000 x 64 MLP the backward's per-row
    ops dominate the check's own cost).  Results go to ``done``, the
    forward batches' list, in the same form."""

    def __init__(self, done: list[Batched], kernels: list[Statistic] | None = None) -> None:
        self.done = done
        self.kernels = kernels
        self._buckets: dict[tuple[Any, ...], tuple[_Slots, list[dict[str, Any]]]] = {}
        self._stacks: dict[tuple[Any, ...], torch.Tensor] = {}  # add_many's buffers, by shape, dtype and device

    def add(self, d: dict[str, Any], g: torch.Tensor) -> None:
        key = (g.shape, g.dtype, g.get_device())
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = (_Slots(g, _buffer_rows(g)), [])
        slots, dicts = b
        slots.views[len(dicts)].copy_(g)
        d["grad_n"] = float(max(g.numel(), 1))  # at once: a row's bwd shows the gradient has arrived
        dicts.append(d)
        if len(dicts) == slots.cap:
            self._flush(slots, dicts)
            slots.grow()

    def add_many(self, dicts: list[dict[str, Any]], grads: Sequence[torch.Tensor | None]) -> None:
        """Gradients that the backward returned together (see
        :meth:`~.recorder.Recorder.captured`): grouped by shape, dtype and
        device and stacked, up to a buffer's rows at a time, by one op each
        instead of a copy per row, into one buffer per shape, dtype and
        device that every chunk reuses (a new buffer per chunk was fresh
        memory to map and fault in: torch.stack ran 2-3x slower inside a
        pass than on its own)."""
        groups: dict[tuple[Any, ...], tuple[list[dict[str, Any]], list[torch.Tensor]]] = {}
        for d, g in zip(dicts, grads):
            if g is None:
                continue
            key = (g.shape, g.dtype, g.get_device())
            grp = groups.get(key)
            if grp is None:
                grp = groups[key] = ([], [])
            grp[0].append(d)
            grp[1].append(g)
            d["grad_n"] = float(max(g.numel(), 1))
        for key, (ds, gs) in groups.items():
            cap = _buffer_rows(gs[0])
            buf = self._stacks.get(key)
            if buf is None or buf.shape[0] < min(cap, len(gs)):
                buf = self._stacks[key] = torch.empty(min(cap, len(gs)), *gs[0].shape, dtype=gs[0].dtype,
                                                      device=gs[0].device)
            for i in range(0, len(gs), cap):
                part = gs[i:i + cap]
                B = buf if len(part) == buf.shape[0] else buf[:len(part)]
                torch.stack(part, out=B)
                self._measure(B.view(len(part), -1), ds[i:i + cap])

    def _flush(self, slots: _Slots, dicts: list[dict[str, Any]]) -> None:
        k = len(dicts)
        if not k:
            return
        self._measure(slots.buf if k == slots.cap else slots.buf[:k], list(dicts))
        dicts.clear()

    def _measure(self, B: torch.Tensor, dicts: list[dict[str, Any]]) -> None:
        """One row of ``B`` a gradient, the row of ``dicts`` at its index."""
        vecs: dict[str, Any] = {"grad_norm": torch.linalg.vector_norm(B, dim=1, dtype=acc(B))}
        backward_kernels_into(vecs, B, 1, self.kernels)
        self.done.append((dicts, vecs))

    def flush(self) -> None:
        for slots, dicts in self._buckets.values():
            self._flush(slots, dicts)
