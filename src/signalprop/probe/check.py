"""``signalprop.check``: one forward and one backward pass, diagnosed layer by layer."""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..records import InputStats, LayerStats, Report, Summary, evolve
from .diagnose import diagnose
from .distributed import (
    GRAD_NORM,
    MEAN,
    NORM,
    REPLICA_NORM,
    ROW_KINDS,
    SUM,
    Reduction,
    is_ddp,
    is_sharded,
    local,
    norm_kind,
    resolve_group,
    unwrap,
)
from .predict import predictions
from .recorder import Recorder, Row, first_float_tensor
from .state import preserved
from .stats import Batched, Part, acc, as_parts, dottable


class ModelError(ValueError):
    """The model failed on the given inputs; the message names the module."""


COTANGENT_SEED = 0  # the random unit-variance cotangent is the same on every call on a device


@dataclass(frozen=True)
class CallArgs:
    """Positional and keyword arguments of one model call, as captured by a
    forward pre-hook (the monitor replays a call with them)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, CallArgs):
        return model(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _tensors_of(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, CallArgs):
        return _tensors_of(inputs.args) + _tensors_of(inputs.kwargs)
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return [v for v in values if isinstance(v, torch.Tensor)]


def _batch_size(inputs: Any) -> int | None:
    t = next(iter(_tensors_of(inputs)), None)
    return None if t is None or t.dim() == 0 else int(t.shape[0])


def _without_cache(model: nn.Module, inputs: Any) -> Any:
    """A diagnostic pass never needs a key/value cache, and a cache updated in
    place (HF RWKV's state in eval mode, say) breaks the backward pass: models
    whose forward takes ``use_cache`` get ``use_cache=False`` unless the
    caller set it."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return inputs
    if "use_cache" not in params:
        return inputs
    if isinstance(inputs, dict):
        return inputs if "use_cache" in inputs else {**inputs, "use_cache": False}
    names = list(params)
    if isinstance(inputs, torch.Tensor) and names:
        return {names[0]: inputs, "use_cache": False}
    return inputs


def _prepare_inputs(inputs: Any) -> tuple[Any, list[torch.Tensor]]:
    """Floating input tensors become leaves that require grad, so the gradient
    reaches (and is measured at) the input; integer ones (token ids) stay."""
    leaves: list[torch.Tensor] = []

    def conv(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            leaf = v.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf
        return v

    if isinstance(inputs, CallArgs):
        return CallArgs(tuple(conv(v) for v in inputs.args), {k: conv(v) for k, v in inputs.kwargs.items()}), leaves
    if isinstance(inputs, dict):
        return {k: conv(v) for k, v in inputs.items()}, leaves
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(conv(v) for v in inputs), leaves
    return conv(inputs), leaves


def _shapes(inputs: Any) -> str:
    if isinstance(inputs, CallArgs):
        return ", ".join(x for x in (_shapes(inputs.args), _shapes(inputs.kwargs)) if x)
    if isinstance(inputs, torch.Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, dict):
        return ", ".join(f"{k}={_shapes(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(_shapes(v) for v in inputs)
    return type(inputs).__name__


# A CPU cotangent above this many entries is drawn in blocks of it, each from its own generator
# (seeded COTANGENT_SEED + block index) on a thread of its own: a generator draws on one thread, and
# GPT-2's logits at batch 8 x 512 (206M entries) took 2.8 s to draw inside check, 12% of the step
_COT_BLOCK = 1 << 22


def _cotangent(t: torch.Tensor) -> torch.Tensor:
    """Unit-variance Gaussian noise drawn on the output's own device and in its
    dtype (no host draw and copy), from generators seeded the same way on
    every call: one on a GPU; on the CPU, outputs of more than
    :data:`_COT_BLOCK` entries in blocks drawn in parallel (the first block
    the same values a single draw gives; the values do not depend on the
    number of threads)."""
    n = t.numel()
    if not t.is_cpu or n <= _COT_BLOCK:
        g = torch.Generator(device=t.device).manual_seed(COTANGENT_SEED)
        return torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype)
    out = torch.empty(n, dtype=t.dtype)

    def draw(start: int) -> None:
        g = torch.Generator().manual_seed(COTANGENT_SEED + start // _COT_BLOCK)
        torch.randn(min(_COT_BLOCK, n - start), generator=g, dtype=t.dtype, out=out[start:start + _COT_BLOCK])

    starts = range(0, n, _COT_BLOCK)
    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:  # torch releases the GIL while it draws
            list(pool.map(draw, starts))
    else:
        for s0 in starts:
            draw(s0)
    return out.view(t.shape)


class _Pending:
    """Values still on a device (0-d tensors, :class:`~.stats.Part` entries,
    whole vectors of a measured batch), each with the place its Python float
    goes (a dict and a key, or a list and an index), grouped as they are
    added -- by vector, and 0-d tensors by device and dtype -- so that
    :meth:`resolve` reads them all with one concatenation and one transfer
    per device: the only host synchronisation of the pass."""

    __slots__ = ("singles", "vectors", "whole")

    def __init__(self) -> None:
        self.singles: dict[tuple[Any, Any], tuple[list[Any], list[Any], list[torch.Tensor]]] = {}
        self.vectors: dict[int, tuple[torch.Tensor, list[Any], list[Any], list[int]]] = {}
        self.whole: list[tuple[torch.Tensor, list[dict[str, Any]], str]] = []

    def add(self, into: Any, key: Any, v: Any) -> None:
        """``into[key] = float(v)`` once resolved (at once for a plain number)."""
        tp = type(v)
        if tp is Part and v.vec.dim() == 1:
            e = self.vectors.get(id(v.vec))
            if e is None:
                e = self.vectors[id(v.vec)] = (v.vec, [], [], [])
            e[1].append(into)
            e[2].append(key)
            e[3].append(v.i)
        elif tp is Part or isinstance(v, torch.Tensor):
            t = v.tensor() if tp is Part else v
            e2 = self.singles.get((t.device, t.dtype))
            if e2 is None:
                e2 = self.singles[(t.device, t.dtype)] = ([], [], [])
            e2[0].append(into)
            e2[1].append(key)
            e2[2].append(t)
        else:
            into[key] = float(v)

    def add_vector(self, vec: torch.Tensor, into: list[dict[str, Any]], key: str) -> None:
        """``into[j][key] = float(vec[j])`` for every j, once resolved (a
        measured batch's statistic: one entry per row)."""
        self.whole.append((vec, into, key))

    def resolve(self) -> None:
        Piece = tuple[torch.Tensor, Any, Any, Any]  # tensor, destinations, keys, positions / None / True
        by_device: dict[Any, list[Piece]] = {}
        for (dev, _), (intos, keys, ts) in self.singles.items():
            by_device.setdefault(dev, []).append((torch.stack(ts), intos, keys, None))
        for vec, intos, keys, pos in self.vectors.values():
            by_device.setdefault(vec.device, []).append((vec, intos, keys, pos))
        for vec, dicts, key in self.whole:
            by_device.setdefault(vec.device, []).append((vec, dicts, key, True))
        for pieces in by_device.values():
            # concatenated first (cat promotes the floating dtypes exactly: bf16/fp16 -> fp32 -> fp64), then one
            # conversion to float64, rather than one per piece (hundreds of batch vectors on a deep net)
            flat = torch.cat([t if t.is_floating_point() else t.double() for t, _, _, _ in pieces]) \
                .double().cpu().tolist()
            at = 0
            for t, intos, keys, where in pieces:
                n = t.numel()
                if where is True:  # a whole batch vector: entry j is the j-th dict's
                    for d, v in zip(intos, flat[at:at + n]):
                        d[keys] = v
                elif where is not None:  # entries of a batch vector, by their position in it
                    for into, key, j in zip(intos, keys, where):
                        into[key] = flat[at + j]
                else:
                    for into, key, v in zip(intos, keys, flat[at:at + len(intos)]):
                        into[key] = v
                at += n
        self.singles.clear()
        self.vectors.clear()
        self.whole.clear()


def _gather(scalars: list[Any], kinds: list[str] | None = None, red: Reduction | None = None) -> list[float]:
    """0-d tensors, floats and :class:`~.stats.Part` entries of batch vectors
    as Python floats (see :class:`_Pending`).  With ``red``, combined across
    the process group instead, each by its kind (one all-reduce)."""
    if red is not None:
        assert kinds is not None
        return red.gather([v.tensor() if isinstance(v, Part) else v for v in scalars], kinds)
    out: list[Any] = [0.0] * len(scalars)
    pending = _Pending()
    for i, v in enumerate(scalars):
        if type(v) is float:
            out[i] = v
        else:
            pending.add(out, i, v)
    pending.resolve()
    return out


def _finalise(rows: list[Row], extra: list[torch.Tensor | Part | float], red: Reduction | None = None,
              extra_kinds: list[str] | None = None,
              batched: list[Batched] | None = None) -> tuple[list[dict[str, Any]], list[float]]:
    """Every row's statistics as floats, and the ``extra`` scalars, gathered
    together; derived moments formed in float64, where squares cannot overflow.
    ``batched``: the recorder's measured batches (:meth:`Recorder.batched`),
    whose values go into their rows' dicts.  With ``red``, every statistic is
    combined across the process group (one all-reduce; ``extra_kinds`` says
    how each extra scalar combines).  Without ``red`` the rows' own dicts are
    left holding the floats."""
    ex = [e if not isinstance(e, torch.Tensor) or e.dim() == 0 else e.reshape(()) for e in extra]
    if red is None:  # each value written straight into its row's dict once read
        pending = _Pending()
        for dicts, vecs in batched or ():
            for key, vec in vecs.items():
                pending.add_vector(vec, dicts, key)
        for r in rows:
            for d in (r.fwd, r.bwd):
                for k, v in d.items():
                    if type(v) is not float:
                        pending.add(d, k, v)
        exv: list[Any] = [0.0] * len(ex)
        for i, e in enumerate(ex):
            pending.add(exv, i, e)
        pending.resolve()
        out = [{**r.fwd, **r.bwd} for r in rows]
    else:
        as_parts(batched or [])
        out = []
        where: list[tuple[dict[str, Any], str]] = []
        scalars: list[torch.Tensor | Part | float] = []
        kinds: list[str] = []
        for r in rows:
            o = {**r.fwd, **r.bwd}
            out.append(o)
            for k, v in o.items():
                if k in ROW_KINDS or isinstance(v, (torch.Tensor, Part)):
                    where.append((o, k))
                    scalars.append(v)
                    kinds.append(ROW_KINDS.get(k, SUM))
        vals = _gather(scalars + ex, kinds + list(extra_kinds or []), red)
        for (o, k), v in zip(where, vals):
            o[k] = v
        exv = vals[len(scalars):]
    for d in out:
        if "alive" in d:
            d["alive_count"] = d.pop("alive")
        if "forward_n" in d:
            n = d.pop("forward_n")
            d["forward_mean"] = d.pop("forward_sum") / n
            d["forward_second_moment"] = (d.pop("forward_sq") if "forward_sq" in d else d.pop("forward_norm") ** 2) / n
            d["forward_var"] = max(d["forward_second_moment"] - d["forward_mean"] ** 2, 0.0)
            d["nonfinite_fraction"] = d.pop("forward_nonfinite", 0.0)
        if "grad_n" in d:
            d["grad_ms"] = (d.pop("grad_sq") if "grad_sq" in d else d.pop("grad_norm") ** 2) / d.pop("grad_n")
            d["grad_nonfinite_fraction"] = d.pop("grad_nonfinite", 0.0)
        if "saturated_count" in d:
            d["saturation"] = d.pop("saturated_count") / d.pop("saturated_n")
        if "alive_count" in d:
            d["dead_fraction"] = 1.0 - d.pop("alive_count") / d.pop("units")
    return out, exv


def _nonfinite(vals: list[dict[str, Any]], extra: list[float]) -> bool:
    """Whether any gathered value is NaN or infinite: read off their sum
    (one C loop per row), which is non-finite exactly then -- or when finite
    values sum past 1.8e308, where the exact pass's second look costs time,
    not correctness."""
    if not all(map(math.isfinite, extra)):
        return True
    total = 0.0
    for d in vals:  # every value is a float (see _finalise)
        total += sum(d.values())
    return not math.isfinite(total)


def _module_params(rows: list[Row]) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    seen: set[int] = set()
    out = []
    for r in rows:
        m = r.module
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        ps = [p for p in m._parameters.values() if p is not None]
        if ps:
            out.append((m, ps))
    return out


_DOT_NORM_MIN = 1 << 16  # smaller tensors: one _foreach_norm for all beats two dispatched ops each
# On the CPU tensors of at most _STACK_NORM_MAX entries are stacked for their norms: copying 1,024
# floats costs what _foreach_norm spends per tensor (~2 us); larger ones cost more to copy
_STACK_NORM_MAX = 1 << 10
_STACK_NORM_ENTRIES = 1 << 20  # entries per stacked chunk (4 MB in float32)


def _norms(tensors: list[torch.Tensor], squares: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor | Part]:
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
    tensors = [local(t) for t in tensors]  # a DTensor's own shard (FSDP2): combined across ranks later
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
        by_dtype: dict[torch.dtype, list[int]] = {}
        for j, s in enumerate(sums):
            by_dtype.setdefault(s.dtype, []).append(j)
        for js in by_dtype.values():
            roots = torch.stack([sums[j] for j in js]).sqrt_()
            for k, j in enumerate(js):
                out[dots[j]] = Part(roots, k)
    for idx in fused.values():
        for i, norm in zip(idx, torch._foreach_norm([tensors[i] for i in idx])):
            out[i] = norm
    for (dtype, shape), idx in stacks.items():
        numel = math.prod(shape)
        step = max(1, _STACK_NORM_ENTRIES // max(numel, 1))
        a = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        for k in range(0, len(idx), step):
            chunk = idx[k:k + step]
            vec = torch.linalg.vector_norm(torch.stack([tensors[i] for i in chunk]).reshape(len(chunk), numel),
                                           dim=1, dtype=a)
            for j, i in enumerate(chunk):
                out[i] = Part(vec, j)
    return out  # type: ignore[return-value]


@dataclass
class _ParamNorms:
    """Per module: parameter and gradient norms, still on the device."""

    modules: list[tuple[nn.Module, int, list[int]]]  # module, numel, indices into the scalars
    scalars: list[torch.Tensor | Part]  # [||g_0||, ||w_0||, ||g_1||, ...]
    kinds: list[str]  # how each combines across ranks (sharded or replicated)
    # of each whole (unsharded) weight by id, still on the device: ||w||^2 (True) or ||w|| (False); the
    # theory column reads them from here rather than reading every weight again
    weight_norms: dict[int, tuple[torch.Tensor, bool]] = field(default_factory=dict)

    @staticmethod
    def of(rows: list[Row], grads: dict[nn.Parameter, torch.Tensor | None],
           known: dict[int, torch.Tensor | Part] | None = None) -> _ParamNorms:
        """``known``: norms already computed, by ``id`` of the tensor (the
        monitor's per-step gradient norms), so no tensor is read twice."""
        mods: list[tuple[nn.Module, int, list[int]]] = []
        tensors: list[torch.Tensor] = []
        for m, ps in _module_params(rows):
            have = [p for p in ps if grads.get(p) is not None]
            if not have:
                continue
            idx = []
            for p in have:
                idx.append(len(tensors))
                tensors += [grads[p], p]  # type: ignore[list-item]
            mods.append((m, sum(p.numel() for p in have), idx))
        known = known or {}
        todo = [i for i, t in enumerate(tensors) if id(t) not in known]
        out: list[torch.Tensor | Part | None] = [known.get(id(t)) for t in tensors]
        squares: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for i, n in zip(todo, _norms([tensors[i] for i in todo], squares) if todo else []):
                out[i] = n
        squared = {todo[j]: sq for j, sq in squares.items()}
        kinds = [norm_kind(t) for t in tensors]
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
        return _ParamNorms(mods, out, kinds, whole)  # type: ignore[arg-type]

    def values(self, vals: list[float]) -> dict[nn.Module, tuple[float, float]]:
        """RMS of each module's own parameter gradients and ||grad|| / ||weight||."""
        out = {}
        for m, n, idx in self.modules:
            g2 = sum(vals[i] ** 2 for i in idx)
            w2 = sum(vals[i + 1] ** 2 for i in idx)
            out[m] = (math.sqrt(g2 / n), math.sqrt(g2 / w2) if w2 > 0 else math.inf)
        return out


_BLANK = LayerStats(index=0, name="", kind="", depth=0, shape=(), forward_mean=0.0, forward_var=0.0,
                    forward_second_moment=0.0, nonfinite_fraction=0.0, grad_rms=None)


def _layer_stats(rows: list[Row], vals: list[dict[str, Any]], pgrads: dict[nn.Module, tuple[float, float]],
                 out_rms: float, pred: dict[int, tuple[float, float]] | None = None) -> list[LayerStats]:
    """One record per row; ``pred``: the theory column by row index (see
    :func:`~.predict.predictions`)."""
    layers = []
    prev_m2: float | None = None
    prev_g2: float | None = None
    pred = pred or {}
    for r, v in zip(rows, vals):
        m2 = v["forward_second_moment"]
        g2 = v.get("grad_ms")
        pg = pgrads.get(r.module) if r.module is not None else None
        g = None if g2 is None else math.sqrt(g2)
        pr = pred.get(r.index)
        layers.append(evolve(  # a copy of a blank record: LayerStats' frozen __init__ costs 4 us a row
            _BLANK, index=r.index, name=r.name, kind=r.kind, depth=r.depth, shape=r.shape,
            forward_mean=v["forward_mean"], forward_var=v["forward_var"], forward_second_moment=m2,
            nonfinite_fraction=v["nonfinite_fraction"], grad_rms=g,
            grad_nonfinite_fraction=v.get("grad_nonfinite_fraction"),
            param_grad_rms=pg[0] if pg else None, grad_to_weight=pg[1] if pg else None,
            saturation=v.get("saturation"), dead_fraction=v.get("dead_fraction"),
            dead_samples=int(v["dead_samples"]) if "dead_samples" in v else None,
            forward_gain=m2 / prev_m2 if prev_m2 else None,
            # how much the gradient's mean square grows passing back through this row
            backward_gain=prev_g2 / g2 if (prev_g2 is not None and g2) else None,
            relative_grad_rms=None if g is None else (g / out_rms if out_rms > 0 else math.inf),
            activation=r.act.name if r.act is not None else None, role=r.role,
            predicted_second_moment=pr[0] if pr else None, predicted_grad_rms=pr[1] if pr else None,
        ))
        prev_m2 = m2 if m2 > 0 else None
        prev_g2 = g2
    return layers


def check_model(model: Any, fn: str) -> None:
    """What check and monitor can hook: a plain ``nn.Module`` (TorchScript and
    ``torch.compile`` wrappers run their forward outside module hooks)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(f"{fn}() needs the Python module: a TorchScript module ({type(model).__name__}, from "
                         "torch.jit.trace/script) runs its graph without module hooks, so no layer could be "
                         "measured; pass the model you traced")
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise ValueError(f"{fn}() needs the Python module: torch.compile's wrapper runs compiled code without "
                         f"module hooks; pass model._orig_mod (the {type(model._orig_mod).__name__} it wraps)")
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{fn}() cannot measure gradients under torch.inference_mode(): call it outside that block")


def check_limits(bounds: tuple[float, float], trend: float) -> None:
    """The verdict's limits, as check and monitor take them: 0 < low < high, trend > 1."""
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
        raise ValueError(f"bounds must be (low, high), got {bounds!r}")
    lo, hi = bounds
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    if not 1 < trend < math.inf:
        raise ValueError(f"trend must be > 1, got {trend}")


def check(model: nn.Module, inputs: Any, *, loss_fn: Callable[..., torch.Tensor] | None = None,
          targets: Any = None, bounds: tuple[float, float] = (1e-6, 1e3), trend: float = 100.0,
          spectrum: bool = False, group: Any = None) -> Report:
    """Diagnose ``model`` on ``inputs`` layer by layer.

    One forward and one backward pass.  Without ``loss_fn`` the backward pass
    starts from a fixed random cotangent of unit variance on the first
    floating-point tensor of the output (Dive into Deep Learning's
    ``y.backward(gradient=...)``), so gradients describe the network rather
    than a loss; with ``loss_fn`` it is ``loss_fn(output, targets)`` (or
    ``loss_fn(output)`` when ``targets`` is None).

    ``inputs``: a tensor, a tuple of positional arguments or a dict of keyword
    arguments.  ``bounds``: the healthy range of each row's gradient RMS
    *relative to the gradient RMS at the model's output* (Dive into Deep Learning's example
    [1e-6, 1e3]); relative, so that neither batch size, sequence length, a
    loss's mean reduction nor the dtype moves a verdict.  ``trend``: the
    largest tolerated factor by which rows of one role (the same module
    position in repeated blocks) may differ across depth.  ``spectrum``: also
    read the input-output Jacobian's singular values (of this process's
    batch).  ``group``: under ``torch.distributed`` (default: the world, when
    a process group with several ranks is initialised) every statistic is
    combined over the group's ranks in one all-reduce, so each rank gets the
    report one process would compute on the concatenated batch (with the
    global objective the mean of the ranks' losses, as DDP and FSDP2 define
    it); the backward pass then runs through the model's own gradient
    reduction (a ``DistributedDataParallel`` wrapper, FSDP2's sharded
    parameters), or averages the gradients itself for a plain replica.
    Every rank must call ``check`` together.

    Models whose ``forward`` takes ``use_cache`` run with ``use_cache=False``
    unless ``inputs`` sets it.  The model comes back exactly as it was
    (parameters, buffers, ``.grad``, ``requires_grad``, train/eval mode,
    global RNG state), also on errors; the pass runs in the model's current mode.
    """
    check_model(model, "check")
    check_limits(bounds, trend)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    named = list(model.named_modules())  # one traversal, shared by the parameters, preserved() and the recorder
    params = list(dict.fromkeys(p for _, m in named for p in m._parameters.values() if p is not None))
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters: nothing to diagnose")
    if _batch_size(inputs) == 0:
        raise ValueError(f"empty batch: inputs have shape {_shapes(inputs)}; pass at least one example")

    g = resolve_group(group)
    red = Reduction(g) if g is not None else None
    inner = unwrap(model)
    caller = model if red is not None and inner is not model else None
    call_inputs = _without_cache(inner, inputs)
    with preserved(model, [m for _, m in named]), _collector_paused():
        rng = _rng_states(params)
        known = (params, named) if inner is model else None  # the traversal above, not another
        report = _run(inner, call_inputs, loss_fn, targets, bounds, trend, False, red, caller, known)
        if report is None:  # a NaN/Inf somewhere: the same pass again, masking and locating it
            _set_rng_states(rng)
            report = _run(inner, call_inputs, loss_fn, targets, bounds, trend, True, red, caller, known)
        assert report is not None
        if spectrum:
            from .spectrum import jacobian_reading

            report = Report(report.verdict, report.layers, report.problems, report.summary,
                            jacobian_reading(inner, call_inputs))
    return report


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the pass, back as it was
    after: a pass allocates a few small objects per row, which triggered
    full collections over the whole heap (a fifth of a 2,000-layer check's
    time); what the pass leaves is freed by reference counting, and any
    cycle at the next collection."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _rng_states(params: list[nn.Parameter]) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"
                      and p.device.index is not None})
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


def _set_rng_states(states: tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]) -> None:
    torch.set_rng_state(states[0])
    for d, s in states[1]:
        torch.cuda.set_rng_state(s, d)


def _forward(model: nn.Module, x: Any, inputs: Any, rec: Recorder) -> Any:
    mode = rec.functional_mode()
    try:
        with torch.enable_grad(), (mode if mode is not None else contextlib.nullcontext()):
            return _call(model, x)
    except Exception as e:  # name the module where it failed, keep the original as cause
        where = rec.failed_in(e)
        where = "(model)" if where is None else where
        mod = dict(model.named_modules()).get(where)
        kind = type(mod).__name__ if mod is not None else "?"
        raise ModelError(
            f"forward failed in module '{where or '(root)'}' ({kind}) on inputs of shape "
            f"{_shapes(inputs)}: {type(e).__name__}: {e}"
        ) from e


def _run(model: nn.Module, inputs: Any, loss_fn: Any, targets: Any, bounds: tuple[float, float],
         trend: float, exact: bool, red: Reduction | None = None, caller: nn.Module | None = None,
         known: tuple[list[nn.Parameter], list[tuple[str, nn.Module]]] | None = None) -> Report | None:
    """One diagnosed pass; None when the fast pass met a non-finite value
    (the caller repeats it with ``exact=True``).  ``known``:
    ``(list(model.parameters()), list(model.named_modules()))`` when the
    caller has them already.  ``red``: combine every
    statistic across the process group; the backward pass then runs as
    training's does (``backward()``, so DDP and FSDP reduce the parameter
    gradients; the saved ``.grad`` comes back afterwards), through ``caller``
    (the DDP wrapper of ``model``) when given."""
    rec = Recorder(model, exact=exact, unit_vectors=red is not None, named=known[1] if known is not None else None)
    rec.attach()
    try:
        x, leaves = _prepare_inputs(inputs)
        out = _forward(caller if caller is not None else model, x, inputs, rec)
        y = first_float_tensor(out)
        if y is None:
            raise ValueError(f"{type(model).__name__} returned {type(out).__name__} with no floating-point "
                             "tensor: nothing to backpropagate")
        if loss_fn is not None:
            loss = loss_fn(out, targets) if targets is not None else loss_fn(out)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else \
                    f"{type(loss).__name__} {loss!r}"[:80]
                raise ValueError(f"loss_fn must return a scalar tensor that depends on the output (the loss to "
                                 f"backpropagate), got {what}; reduce it (e.g. .mean()) and keep it a tensor")
            root, cot = loss, None
            backprop = f"loss {getattr(loss_fn, '__name__', type(loss_fn).__name__)}"
        else:
            root, cot = y, _cotangent(y)
            backprop = "random unit-variance cotangent on the output"
        params = [p for p in (model.parameters() if known is None else known[0]) if p.requires_grad]
        wrt = params + leaves + ([y] if loss_fn is not None and y.requires_grad else [])
        if not (params or leaves):
            raise ValueError("nothing in the model requires grad (all parameters frozen and no floating input): "
                             "no gradient to measure; set requires_grad=True on the parameters to diagnose")
        if not root.requires_grad:
            raise ValueError(f"the {'loss' if loss_fn is not None else 'output'} does not depend on any parameter "
                             "or floating input (a constant output, or computed under torch.no_grad()/detach() "
                             "inside forward): no gradient flows back to measure")
        grads: tuple[torch.Tensor | None, ...]
        try:
            if red is None:
                grads = torch.autograd.grad(root, wrt, grad_outputs=cot, allow_unused=True)
            else:
                grads = _backward_synced(root, cot, params, leaves, y if loss_fn is not None else None,
                                         red, caller is not None and is_ddp(caller) or is_sharded(model))
        except RuntimeError as e:
            raise ModelError(f"backward failed on inputs of shape {_shapes(inputs)}: {e}") from e
    finally:
        rec.detach()
    n_p, n_l = len(params), len(leaves)
    pnorms = _ParamNorms.of(rec.rows, dict(zip(params, grads[:n_p])))
    input_grads = [g for g in grads[n_p:n_p + n_l] if g is not None]
    out_grad = cot if cot is not None else (grads[-1] if len(grads) > n_p + n_l else None)
    with torch.no_grad():
        extra: list[torch.Tensor | Part | float] = [*pnorms.scalars, *_input_scalars(leaves, input_grads, exact),
            torch.linalg.vector_norm(out_grad, dtype=acc(out_grad)) if out_grad is not None else 0.0,
            root.float().sum() if loss_fn is not None else 0.0,
            float(out_grad.numel()) if out_grad is not None else 0.0]
    kinds = pnorms.kinds + _INPUT_KINDS[:len(extra) - len(pnorms.scalars) - 3] + [GRAD_NORM, MEAN, SUM]
    vals, ex = _finalise(rec.rows, extra, red, kinds, rec.batched())
    if not exact and _nonfinite(vals, ex):
        return None
    k = len(pnorms.scalars)
    inp = _input_stats(leaves, input_grads, ex[k:-3])
    out_rms = ex[-3] / math.sqrt(max(ex[-1], 1.0)) if out_grad is not None else 0.0
    if loss_fn is not None:
        backprop += f" = {ex[-2]:.6g}"
    # the theory's gradients are scaled to the last row's: the square of its reported grad_rms (sqrt(g2) ** 2,
    # which rounds apart from g2), so the last row's prediction matches the record it sits in
    last_g2 = vals[-1].get("grad_ms") if vals else None
    pred = predictions(rec.rows, inp, math.sqrt(last_g2) ** 2 if last_g2 else 0.0, pnorms.weight_norms)
    pgrads = pnorms.values(ex[:k])
    layers = _layer_stats(rec.rows, vals, pgrads, out_rms, pred)
    if out_grad is None or out_rms == 0:  # the loss does not reach the first output tensor
        last = next((layer.grad_rms for layer in reversed(layers) if layer.grad_rms), None)
        out_rms = last or 1.0
        layers = _layer_stats(rec.rows, vals, pgrads, out_rms, pred)
    origin = _backward_origin(rec.rows, layers) if exact else None
    stale = _stale_batchnorm(rec.rows)
    verdict, problems, layers, judged = diagnose(layers, inp, bounds, trend, backward_origin=origin,
                                                 dead_unjudged_from=stale[0].index if stale else None)
    notes = judged.pop("notes")
    if stale:
        notes.append(f"{len(stale)} BatchNorm layer(s) in eval mode with running statistics never updated "
                     f"(first: {stale[0].name}) pass the signal unnormalised, as neither training nor a trained "
                     "model would: dead units after them are not judged; check in train mode (model.train()) "
                     "to see what training sees")
    summary = Summary(model=type(model).__name__, rows=len(layers), backprop=backprop, output_grad_rms=out_rms,
                      bounds=(float(bounds[0]), float(bounds[1])), trend_limit=float(trend),
                      training_mode=model.training, theory=pred is not None, input=inp,
                      notes=tuple(notes), inputs=_shapes(inputs), cotangent_seed=None if loss_fn is not None
                      else COTANGENT_SEED, **judged)
    return Report(verdict, tuple(layers), tuple(problems), summary)


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _stale_batchnorm(rows: list[Row]) -> list[Row]:
    """Rows of BatchNorm layers in eval mode whose running statistics were
    never updated (still mean 0, variance 1)."""
    return [r for r in rows if isinstance(r.module, _BATCHNORM)
            and not r.module.training and r.module.track_running_stats
            and r.module.num_batches_tracked is not None and int(r.module.num_batches_tracked) == 0]


def _backward_origin(rows: list[Row], layers: list[LayerStats]) -> int | None:
    """The row whose backward turned a finite incoming gradient into a
    non-finite outgoing one: a consumer of the output of the latest row (in
    execution order) whose gradient is non-finite, itself with a finite
    gradient -- or, when no recorded row read that output directly, the next
    row executed after it."""
    bad = [layer.index for layer in layers if (layer.grad_nonfinite_fraction or 0) > 0]
    if not bad or any(layer.nonfinite_fraction > 0 for layer in layers):
        return None
    r = rows[bad[-1]]
    produced = r.output() if r.output is not None else None
    finite = [s for s in rows[r.index + 1:] if not (layers[s.index].grad_nonfinite_fraction or 0) > 0]
    for s in finite:
        if produced is not None and any(ref() is produced for ref in s.inputs):
            return s.index
    return finite[0].index if finite else r.index


def _backward_synced(root: torch.Tensor, cot: torch.Tensor | None, params: list[nn.Parameter],
                     leaves: list[torch.Tensor], y: torch.Tensor | None, red: Reduction,
                     framework_reduces: bool) -> tuple[torch.Tensor | None, ...]:
    """The backward pass as distributed training runs it: ``backward()``
    into ``.grad`` (the caller's :func:`preserved` puts the saved gradients
    back), so DDP all-reduces and FSDP2 reduce-scatters the parameter
    gradients; a model replicated without a wrapper gets them averaged here."""
    for p in params:
        p.grad = None
    if y is not None and not y.is_leaf:
        y.retain_grad()
    torch.autograd.backward(root, grad_tensors=cot)
    pg = [p.grad for p in params]
    if not framework_reduces:
        red.average_grads([g for g in pg if g is not None])
    return (*pg, *[x.grad for x in leaves], *([y.grad] if y is not None else []))


# how the input's scalars combine across ranks: norm, sum and count of the
# finite entries, their number, the gradient's norm and number of entries
_INPUT_KINDS = [NORM, SUM, SUM, SUM, GRAD_NORM, SUM]


def _input_scalars(leaves: list[torch.Tensor], grads: list[torch.Tensor], exact: bool) -> list[torch.Tensor | float]:
    """The first input's norm, sum, number of finite entries and of entries,
    and its gradient's norm and size (read under ``no_grad``).  The fast
    pass reads the input as it is: a NaN/Inf in it makes the norm or sum
    non-finite and sends the call to the exact pass, as a non-finite row
    does, which masks those entries and counts the finite ones."""
    if not leaves:
        return []
    x = leaves[0]
    a = acc(x)
    n = float(x.numel())
    if exact:
        finite = torch.isfinite(x)
        xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
        out: list[torch.Tensor | float] = [torch.linalg.vector_norm(xf, dtype=a), xf.sum(dtype=a),
                                           finite.sum(dtype=a), n]
    else:
        out = [torch.linalg.vector_norm(x, dtype=a), x.sum(dtype=a), n, n]
    if grads:
        out += [torch.linalg.vector_norm(grads[0], dtype=acc(grads[0])), float(grads[0].numel())]
    return out


def _input_stats(leaves: list[torch.Tensor], grads: list[torch.Tensor], v: list[float]) -> InputStats | None:
    if not leaves:
        return None
    x = leaves[0]
    n, finite = max(v[3], 1.0), max(v[2], 1.0)
    return InputStats(second_moment=v[0] ** 2 / finite, mean=v[1] / finite, nonfinite_fraction=1.0 - v[2] / n,
                      width=int(x.shape[-1]) if x.dim() > 1 else 1,
                      grad_rms=v[4] / math.sqrt(max(v[5], 1.0)) if grads else None)
