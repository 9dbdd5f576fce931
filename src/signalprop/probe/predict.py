"""Theory beside measurement, for stacks that mean-field theory covers:
Linear/Conv/ConvTranspose layers (any stride, dilation and groups), each
optionally followed by one elementwise activation, with nothing between them
that no row recorded (a reshape that only views the tensor is fine).  Fans
come from :mod:`signalprop.layers`, the one source init uses too."""

from __future__ import annotations

import math
import weakref
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..layers import CONV_TRANSPOSE, CONVS, fans
from ..records import InputStats
from ..theory import propagate
from .distributed import _dtensor_types
from .recorder import Hook, Row, user_global_hooks
from .stats import acc, dottable

_WEIGHT = (nn.Linear,) + CONVS
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _as_torch(m: nn.Module | None) -> bool:
    """Whether ``m`` computes what its torch class does, as the theory
    assumes: the class's ``forward`` is torch's own (a subclass's could
    apply a weight multiplier, as equalized learning rates do), nor
    replaced on the instance (``m.forward = ...``, as accelerate's hooks
    do), and no hook of the user's sits on it (a forward hook returning
    ``out * 5``, a backward hook scaling its gradient), signalprop's own
    recording hooks aside."""
    if m is None or "forward" in m.__dict__:  # (a forward set on the instance: not its class's)
        return False
    # (the hook dicts are read only when not empty: the pass's own hooks are global ones on most models)
    if (m._forward_hooks or m._forward_pre_hooks) and \
            any(not isinstance(h, Hook) for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())):
        return False
    if m._backward_hooks or m._backward_pre_hooks:  # (one scaling its gradient: the column's backward)
        return False
    return _torch_forward(type(m))


# by class: (its forward when asked, the answer); weak, so a class made at run time is not kept
_TORCH_FORWARD: weakref.WeakKeyDictionary[type, tuple[Any, bool]] = weakref.WeakKeyDictionary()


def _torch_forward(cls: type) -> bool:
    """Whether ``cls.forward`` is that of the torch class it derives from
    (read once per class, again if its forward is replaced)."""
    fwd = getattr(cls, "forward", None)
    known = _TORCH_FORWARD.get(cls)
    if known is not None and known[0] is fwd:
        return known[1]
    base = next((c for c in cls.__mro__ if (c.__module__ or "").startswith("torch.nn.modules.")), None)
    out = base is not None and fwd is getattr(base, "forward", None)
    _TORCH_FORWARD[cls] = (fwd, out)
    return out


def _identity(r: Row) -> bool:
    """A row that passes its input on unchanged: Identity, (Un)Flatten, dropout in eval mode."""
    m = r.module
    return (isinstance(m, (nn.Identity, nn.Flatten, nn.Unflatten)) or (isinstance(m, _DROPOUT) and not m.training)) \
        and _as_torch(m)


def _chain(rows: list[Row], input_ptr: int) -> tuple[list[tuple[Row, Row | None]], int] | None:
    """[(weight row, activation row or None)], or None if rows are not such a
    chain: every row must read what the row before it wrote (the input for
    the first), so an operation no row recorded -- pooling written as
    ``x.mean((2, 3))``, a residual sum, a scaling -- ends the theory rather
    than leaving it to predict through what it cannot see.  Also returned:
    how many of the pairs come before the last row that reads only part of
    what the row before it wrote (a view that starts at its address: a token
    pick ``h[:, 0]``, ``chunk(2)[0]``, a batch slice) -- their entries'
    moments carry on through it, but the gradient reaches only the part
    read, so no gradient is predicted before it."""
    out: list[tuple[Row, Row | None]] = []
    prev, before = input_ptr, None  # the address the next row must read, and the row that wrote it
    cut = 0

    def reads(r: Row, ptr: int, w: Row | None, pair: int) -> bool:
        # r reads what w wrote at ptr: the same address; a view of part of it moves the cut past ``pair``
        nonlocal cut
        if not r.src or r.src != ptr:
            return False
        if w is not None and r.in_shape is not None and r.in_shape != w.shape \
                and math.prod(r.in_shape) != math.prod(w.shape):
            cut = pair + 1
        return True

    i = 0
    while i < len(rows):
        r = rows[i]
        if not reads(r, prev, before, len(out) - 1):
            return None
        if _identity(r):
            prev, before = r.dst, r
            i += 1
            continue
        if not isinstance(r.module, _WEIGHT) or not _as_torch(r.module):
            return None
        # the activation after it, past rows that pass the signal on unchanged (an Identity placeholder,
        # dropout in eval mode)
        j, at, w = i + 1, r.dst, r
        while j < len(rows) and _identity(rows[j]) and reads(rows[j], at, w, len(out)):
            at, w = rows[j].dst, rows[j]
            j += 1
        nxt = rows[j] if j < len(rows) else None
        if nxt is not None and nxt.act is not None and reads(nxt, at, w, len(out)) and \
                (nxt.module is None or _as_torch(nxt.module)):
            out.append((r, nxt))
            prev, before = nxt.dst, nxt
            i = j + 1
        else:
            out.append((r, None))
            prev, before = r.dst, r
            i += 1
    return (out, cut) if out else None


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter (FSDP2's ``DTensor``) gathered whole; others as they are
    (told by type: a ``hasattr`` miss raised and caught an AttributeError per weight)."""
    types = _dtensor_types()
    return t.full_tensor() if types is not None and isinstance(t, types[0]) else t  # type: ignore[attr-defined]


# weights stacked at most this many entries at a time (4 MB in float32; 64 MB chunks measured no faster): a
# bounded transient copy that turns thousands of small per-layer reductions
# into a few batched ones
_STACK_ENTRIES = 1 << 20
_SMALL = 1 << 14  # weights up to this many entries are stacked; larger ones cost more to copy than to launch


def _terms(w2: torch.Tensor, s: torch.Tensor, B: torch.Tensor | None, n: int) -> torch.Tensor:
    """(layers, 4) rows [sigma_w2, sigma_b2, BS, S2] from each layer's sigma_w2
    (``w2``), row sums ``s`` (layers, n) and biases ``B`` (layers, n) or None."""
    s2 = s.square().mean(dim=1)
    if B is None:
        zero = torch.zeros_like(w2)
        return torch.stack([w2, zero, zero, s2], dim=1).double()
    B = B.to(s.dtype)
    return torch.stack([w2, B.square().mean(dim=1), (B * s).sum(dim=1) / n, s2], dim=1).double()


def _terms_large(ws: list[torch.Tensor], bs: list[torch.Tensor | None],
                 norms: list[tuple[torch.Tensor, bool] | None]) -> torch.Tensor:
    """:func:`_terms` of large (rows, fan_in) weights of one shape, dtype and
    device, each read in place (no stacked copy): the row sums of each (a
    few KB, stacked at the end: writing them into rows of one buffer made a
    view per layer), ||W||^2 from ``norms`` where known; then the terms of
    all of them together."""
    W0 = ws[0]
    a = acc(W0)
    n = W0.shape[0]
    sums: list[torch.Tensor] = []
    sq: list[torch.Tensor] = []
    ones: torch.Tensor | None = None
    for W, norm in zip(ws, norms):
        dot = dottable(W)  # BLAS on the calling thread: a matrix-vector product and a dot (see stats.dottable)
        if dot:
            ones = torch.ones(W.shape[1], dtype=W.dtype) if ones is None else ones
            sums.append(torch.mv(W, ones))
        else:
            sums.append(torch.sum(W, dim=1, dtype=a))
        if norm is not None:  # (||W||^2, True) or (||W||, False)
            sq.append(norm[0].to(a) if norm[1] else norm[0].to(a).square())
        elif dot:
            sq.append(torch.dot(W.view(-1), W.view(-1)))
        else:
            sq.append(torch.linalg.vector_norm(W, dtype=a).square())
    B = torch.stack(bs) if bs[0] is not None else None  # type: ignore[arg-type]
    return _terms(torch.stack(sq) / n, torch.stack(sums), B, n)


@torch.no_grad()
def _weight_terms(modules: list[nn.Module],
                  norms: dict[int, tuple[torch.Tensor, bool]] | None = None) -> list[list[float]]:
    """Per layer [sigma_w2, sigma_b2, BS, S2]: sigma_w2 = fan_in * mean(W^2)
    (the sum of squares of W over its number of rows), sigma_b2 = mean(b^2),
    and the mean coupling of :func:`signalprop.theory.propagate` from the row
    sums s_i of W (BS = mean b_i s_i, S2 = mean s_i^2).  Layers of one weight
    shape, dtype and device are reduced together (in float32 for half
    precision, without a float32 copy): small weights stacked, large ones
    read in place; a few reductions for the whole chain rather than seven
    per layer; one transfer at the end.  ``norms``: ``(||W||^2, True)`` or
    ``(||W||, False)`` already computed (check's parameter norms), by ``id``
    of the weight, so large weights are not read once more for it."""
    known = norms or {}
    groups: dict[tuple[Any, ...], list[int]] = {}
    ws: list[torch.Tensor] = []
    bs: list[torch.Tensor | None] = []
    out: list[list[float]] = [[]] * len(modules)
    for i, m in enumerate(modules):  # read under no_grad: no detach() needed
        if isinstance(m, CONV_TRANSPOSE):  # its output units are not rows of its weight: see _transposed_terms
            out[i] = _transposed_terms(m)
            ws.append(torch.empty(0))
            bs.append(None)
            continue
        W = _whole(cast(torch.Tensor, m.weight))
        if W.dim() != 2:
            W = W.reshape(W.shape[0], -1)
        b = getattr(m, "bias", None)
        b = _whole(b) if b is not None else None
        ws.append(W)
        bs.append(b)
        groups.setdefault((tuple(W.shape), W.dtype, W.device, b is not None), []).append(i)
    parts: list[torch.Tensor] = []
    order: list[list[int]] = []
    for (shape, _, _, has_bias), idx in groups.items():
        if shape[0] * shape[1] > _SMALL:  # large weights: read in place, no copy
            parts.append(_terms_large([ws[i] for i in idx], [bs[i] for i in idx],
                                      [known.get(id(modules[i].weight)) for i in idx]))
            order.append(idx)
            continue
        step = max(1, _STACK_ENTRIES // max(shape[0] * shape[1], 1))
        # one buffer that every chunk reuses (a fresh one per chunk was fresh memory to fault in)
        buf = torch.empty(min(step, len(idx)), *shape, dtype=ws[idx[0]].dtype, device=ws[idx[0]].device)
        for k in range(0, len(idx), step):
            chunk = idx[k:k + step]
            W = buf if len(chunk) == buf.shape[0] else buf[:len(chunk)]
            torch.stack([ws[i] for i in chunk], out=W)  # (layers, rows, fan_in)
            a = acc(W)
            n = shape[0]
            w2 = torch.linalg.vector_norm(W, dim=(1, 2), dtype=a).square() / n
            B = torch.stack([bs[i] for i in chunk]) if has_bias else None  # type: ignore[misc]
            parts.append(_terms(w2, W.sum(dim=2, dtype=a), B, n))
            order.append(chunk)
    by_device: dict[torch.device, list[int]] = {}
    for j, part in enumerate(parts):
        by_device.setdefault(part.device, []).append(j)
    for js in by_device.values():  # one transfer per device
        vals = torch.cat([parts[j] for j in js]).cpu().tolist()
        for i, r in zip((i for j in js for i in order[j]), vals):
            out[i] = r
    return out


def _transposed_terms(m: nn.Module) -> list[float]:
    """[sigma_w2, sigma_b2, BS, S2] of a ``ConvTransposeNd``: an output entry
    of channel o sums, over the input channels of its group, the taps whose
    dilated position has its phase modulo the stride -- a different set for
    each phase, so the terms are averaged over channels and phases: sigma_w2
    the mean sum of squared weights per output entry, S2 and BS from the
    per-(channel, phase) sums of weights (a stride of 1: one phase, every tap)."""
    W = _whole(cast(torch.Tensor, m.weight)).detach().double()  # (in, out/groups, *k)
    g = cast(int, m.groups)
    cin, opg, k = W.shape[0], W.shape[1], tuple(W.shape[2:])
    stride, dil = cast(tuple[int, ...], m.stride), cast(tuple[int, ...], m.dilation)
    # per kernel tap, its phase index (row-major over the dimensions)
    phase = torch.zeros(k, dtype=torch.long)
    for d, (kd, sd, dd) in enumerate(zip(k, stride, dil)):
        shape = [1] * len(k)
        shape[d] = kd
        phase = phase * sd + ((torch.arange(kd) * dd) % sd).view(shape)
    P = math.prod(stride)
    onehot = torch.nn.functional.one_hot(phase.reshape(-1), P).double()  # (taps, phases)
    Wg = W.reshape(g, cin // g, opg, -1)  # (groups, in per group, out per group, taps)
    sums = (Wg.sum(dim=1).reshape(g * opg, -1) @ onehot)  # (out, phases)
    sq = (Wg.square().sum(dim=1).reshape(g * opg, -1) @ onehot)
    b = getattr(m, "bias", None)
    if b is None:
        return [float(sq.mean()), 0.0, 0.0, float(sums.square().mean())]
    b = _whole(b).detach().double()[:, None]
    return [float(sq.mean()), float(b.square().mean()), float((b * sums).mean()), float(sums.square().mean())]


def predictions(rows: list[Row], inp: InputStats | None, cot_ms: float,
                weight_norms: dict[int, tuple[torch.Tensor, bool]] | None = None, input_ptr: int = 0
                ) -> dict[int, tuple[float, float | None]] | None:
    """Per row index, ``(predicted_second_moment, predicted_grad_rms)`` of
    each weight and activation row, from each layer's measured weights
    (sigma_w2, sigma_b2 and the coupling of the input's mean through the row
    sums, so a bias that cancels sigmoid's mean is predicted as such), the
    gradients scaled to ``cot_ms``, the measured mean square of the gradient
    at the last row (no gradient predicted where it is 0); None when the model is not a plain chain of Linear/Conv
    layers and elementwise activations -- normalisation, attention, residual
    branches and pooling are outside what the theory predicts, and no number
    is shown there, nor where an operation no row recorded sits between two
    rows (``input_ptr``: the address of the input tensor the first row must
    read).  The backward factor of a layer is sigma_w2 * fan_out / fan_in with
    the fans of :func:`signalprop.layers.fans` (a stride s makes an input
    entry feed 1/s of the outputs a stride of 1 would)."""
    found = _chain(rows, input_ptr)
    if found is None or inp is None or user_global_hooks():  # (hooks on every module: see _as_torch)
        return None
    chain, cut = found
    mods = [cast(nn.Module, w.module) for w, _ in chain]
    fan = [fans(m) for m in mods]
    with torch.no_grad():
        terms = _weight_terms(mods, weight_norms)
    # a convolution's borders: its forward terms scaled by the share of its windows inside the input, its
    # backward fan by how many outputs a border input feeds (see _coverage)
    cover = [_coverage(w) for w, _ in chain]
    if any(f <= 0 for f, _ in cover):
        return None
    sw2, sb2 = [t[0] * f for t, (f, _) in zip(terms, cover)], [t[1] for t in terms]
    if not all(math.isfinite(x) for x in (inp.second_moment, inp.mean, *(x for t in terms for x in t))):
        return None  # an input or a weight past float range (the exact pass after a NaN/Inf): nothing to predict
    try:
        # widths only enter through n_out / n_in, the backward fan ratio: one unit of input, the rest relative;
        # finite but huge weights (the exact pass just before a NaN) overflow the recursion: no prediction then
        with np.errstate(all="ignore"):
            p = propagate([1] * (len(chain) + 1), [_exact(r) for r in chain], sw2, sb2, q0=inp.second_moment,
                          mean_coupling=[(t[2] * f, t[3] * f) for t, (f, _) in zip(terms, cover)], m0=inp.mean,
                          fan_ratio=[fo / fi * b / f for (fi, fo), (f, b) in zip(fan, cover)])
    except ValueError:
        return None
    if not all(np.isfinite(np.asarray(v, dtype=float)).all() for v in (p.q, p.post, p.grad_pre, p.grad_post)):
        return None
    out: dict[int, tuple[float, float | None]] = {}
    # no gradient predicted without a measured one at the last row to scale to (a loss whose gradient there is
    # exactly 0, an output the backward does not start from): None, not 0
    known = cot_ms > 0
    for l_idx, (w, a) in enumerate(chain):
        grad = known and l_idx >= cut  # (before a row that reads part of its input: none, see _chain)
        out[w.index] = (float(p.q[l_idx]), None if not grad else math.sqrt(p.grad_pre[l_idx] * cot_ms)
                        if a is not None else math.sqrt(p.grad_post[l_idx] * cot_ms))
        if a is not None:
            out[a.index] = (float(p.post[l_idx]), math.sqrt(p.grad_post[l_idx] * cot_ms) if grad else None)
    return out


def _coverage(r: Row) -> tuple[float, float]:
    """``(forward, backward)`` factors of a convolution's borders, 1 each for
    any other row.  With zero padding an output at the border sums fewer
    than its kernel's taps (forward: the mean share of its window that lies
    inside the input), and without padding an input at the border feeds fewer
    outputs than ``kernel / stride`` (backward: the mean number it feeds over
    that): per spatial dimension, from the count of (output, tap) pairs that
    land inside the input, and their product over the dimensions.  A
    transposed convolution is the same wiring read the other way: input ``i``
    feeds output ``i * stride - padding + tap * dilation``, its padding crops
    the outputs, and an output at the border sums fewer than the
    ``kernel / stride`` taps of the interior (a DCGAN generator's first layer
    on a 1 x 1 input: one of 16 in 2D) while an input whose taps are cropped
    feeds fewer than ``kernel`` outputs.  Exact for inputs whose second moment
    is the same at every position; 1 where the input's shape is unknown."""
    m = r.module
    if not isinstance(m, CONVS) or r.in_shape is None:
        return 1.0, 1.0
    k, s, dil = cast(tuple[int, ...], m.kernel_size), cast(tuple[int, ...], m.stride), \
        cast(tuple[int, ...], m.dilation)
    d = len(k)
    n_in, n_out = tuple(r.in_shape[-d:]), tuple(r.shape[-d:])
    if len(n_in) != d or len(n_out) != d:
        return 1.0, 1.0
    pad: tuple[int, ...]
    if m.padding == "same":
        pad = tuple(di * (ki - 1) // 2 for ki, di in zip(k, dil))
    elif m.padding == "valid":
        pad = (0,) * d
    else:
        pad = cast(tuple[int, ...], m.padding)
    fwd = bwd = 1.0
    transposed = isinstance(m, CONV_TRANSPOSE)
    for ni, no, ki, si, pi, di in zip(n_in, n_out, k, s, pad, dil):
        if transposed:  # (input, tap) pairs whose output lies inside the output
            pos = torch.arange(ni)[:, None] * si - pi + torch.arange(ki)[None, :] * di
            pairs = float(((pos >= 0) & (pos < no)).sum())
            fwd *= pairs / (no * ki / si)
            bwd *= (pairs / ni) / ki
            continue
        if m.padding_mode == "zeros":
            pos = torch.arange(no)[:, None] * si - pi + torch.arange(ki)[None, :] * di
            pairs = float(((pos >= 0) & (pos < ni)).sum())
        else:  # reflect, replicate, circular: every tap reads a value of the input
            pairs = float(no * ki)
        fwd *= pairs / (no * ki)
        bwd *= (pairs / ni) / (ki / si)
    return fwd, bwd


def _exact(pair: tuple[Row, Row | None]) -> Any:
    """The exact activation (with parameters such as LeakyReLU's slope) for theory."""
    _, a = pair
    if a is None:
        return "linear"
    return a.act
