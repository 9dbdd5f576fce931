"""``signalprop.check``: one forward and one backward pass, diagnosed layer by
layer -- one run of the pipeline (:mod:`.pipeline`)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..formats import resolve
from ..records import Report, evolve
from .distributed import Reduction, resolve_group, unwrap
from .inputs import CallArgs, ModelError, batch_size, shapes, tensors_of, without_cache
from .pipeline import check_limits, check_materialised, check_model, rng_states, run_pass, set_rng_states
from .state import preserved

__all__ = ["CallArgs", "ModelError", "Report", "check", "check_limits", "check_model"]


def check(model: nn.Module, inputs: Any, *, loss_fn: Callable[..., torch.Tensor] | None = None,
          targets: Any = None, bounds: tuple[float, float] = (1e-6, 1e3), trend: float = 100.0,
          spectrum: bool = False, group: Any = None, dtype: Any = None) -> Report:
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

    ``dtype``: a low-precision format to judge the model against ("float16",
    "bfloat16", "float8_e4m3fn", "float8_e5m2", aliases such as "fp16" or
    "fp8_e4m3", or the torch dtype): the pass then also counts, for every
    row's output, gradient and weights, the shares of nonzero entries that
    a cast would overflow, leave below the smallest normal or flush to zero
    in each of the four formats (at the current scale: the model is not
    cast), and ``report.precision()`` says which layers would not survive
    ``dtype``.  Counting costs a few more passes over each tensor.

    Models whose ``forward`` takes ``use_cache`` run with ``use_cache=False``
    unless ``inputs`` sets it.  The model comes back exactly as it was
    (parameters, buffers, ``.grad``, ``requires_grad``, train/eval mode,
    global RNG state), also on errors; the pass runs in the model's current
    mode.  The one exception is a forward that writes its own parameters in
    place (``nn.Embedding(max_norm=...)`` renormalising rows, a ``clamp_``
    under ``no_grad``): those writes cannot be told from the values they
    replace once made, and the report's notes name the parameters written.
    """
    check_model(model, "check")
    check_limits(bounds, trend)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if targets is not None and loss_fn is None:
        raise ValueError("targets are read only by a loss: pass loss_fn as well (check computes "
                         "loss_fn(output, targets)); without one the output gets a random unit-variance gradient")
    named = list(model.named_modules())  # one traversal, shared by the parameters, preserved() and the recorder
    check_materialised(named, "check")
    params = list(dict.fromkeys(p for _, m in named for p in m._parameters.values() if p is not None))
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters: nothing to diagnose")
    fmt = resolve(dtype) if dtype is not None else None
    _dense_inputs(inputs)
    if batch_size(inputs) == 0:
        raise ValueError(f"empty batch: inputs have shape {shapes(inputs)}; pass at least one example")

    g = resolve_group(group)
    red = Reduction(g) if g is not None else None
    inner = unwrap(model)
    caller = model if red is not None and inner is not model else None
    call_inputs = without_cache(inner, inputs)
    with preserved(model, [m for _, m in named]) as written, _collector_paused(), _attention_fast_path_off():
        rng = rng_states(params)
        known = (params, named) if inner is model else None  # the traversal above, not another
        grads = True  # the input made a leaf that requires grad, so its gradient is measured too
        try:
            report = run_pass(inner, call_inputs, loss_fn, targets, bounds, trend, False, red, caller, known,
                              precision=fmt is not None)
        except ModelError as e:
            if not _sets_requires_grad_on_input(e):
                raise
            # the model sets requires_grad on a view of its input (HF Wav2Vec2's feature encoder in train
            # mode), which a leaf that requires grad refuses: the input goes in exactly as it was passed
            grads = False
            set_rng_states(rng)
            report = run_pass(inner, call_inputs, loss_fn, targets, bounds, trend, False, red, caller, known, grads,
                              fmt is not None)
        if report is None:  # a NaN/Inf somewhere: the same pass again, masking and locating it
            set_rng_states(rng)
            report = run_pass(inner, call_inputs, loss_fn, targets, bounds, trend, True, red, caller, known, grads,
                              fmt is not None)
        assert report is not None
        if fmt is not None:
            report = Report(report.verdict, report.layers, report.problems, evolve(report.summary, dtype=fmt))
        if spectrum:
            from .spectrum import jacobian_reading

            report = Report(report.verdict, report.layers, report.problems, report.summary,
                            jacobian_reading(inner, call_inputs))
    if written:  # known once the model is back: said in the report, not put back
        note = (f"the model's forward wrote {len(written)} of its parameters in place ({', '.join(written[:3])}"
                f"{', ...' if len(written) > 3 else ''}); check could not put them back, nor the module attributes "
                "that may record the write (HF RWKV rescales weights on its first forward in eval mode)")
        report = evolve(report, summary=evolve(report.summary, notes=(*report.summary.notes, note)))
    return report


def _numbers(v: Any) -> bool:
    """Whether ``v`` is a number or a (nested, non-empty) list of numbers only: raw data, not arguments."""
    if isinstance(v, list):
        return bool(v) and all(_numbers(x) for x in v)
    return isinstance(v, (int, float, complex)) and not isinstance(v, bool)


def _dense_inputs(inputs: Any) -> None:
    """Refuse a first input tensor (whose shape gives the batch size) or a
    first floating one (whose norm and sum the pass reads) that is not
    dense: sparse and nested tensors have neither.  Other arguments may be
    anything the model takes (a GCN's sparse adjacency)."""
    if isinstance(inputs, (int, float, complex)) or (isinstance(inputs, list) and inputs and _numbers(inputs)):
        raise TypeError(f"check takes the model's input as a tensor (or a tuple of its positional arguments, a "
                        f"dict of its keyword arguments), got Python {type(inputs).__name__}s of numbers: convert "
                        "them with torch.tensor(...) first")
    ts = tensors_of(inputs)
    for t in ts[:1] + [t for t in ts if t.is_floating_point()][:1]:
        if t.is_nested:
            raise ValueError("check reads the batch size and the statistics of the first input tensor, which is "
                             "a nested tensor (torch.nested) here: pass a padded batch (x.to_padded_tensor(0.0)) "
                             "with the mask the model takes")
        if t.layout != torch.strided:
            raise ValueError("check reads the batch size and the statistics of the first input tensor, which is "
                             f"a {str(t.layout).removeprefix('torch.')} tensor here: pass x.to_dense(), or pass "
                             "the dense input first")


def _sets_requires_grad_on_input(e: ModelError) -> bool:
    cause = e.__cause__
    return isinstance(cause, RuntimeError) and "requires_grad flags of leaf variables" in str(cause)


@contextlib.contextmanager
def _attention_fast_path_off() -> Iterator[None]:
    """PyTorch's fused attention fast path off for the pass, back as it was
    after.  The pass's recording mode already keeps ``MultiheadAttention``
    off it, but a frozen ``nn.TransformerEncoder`` in eval mode with a
    padding mask still packed its input into a nested tensor for it, which
    ``MultiheadAttention`` then refused ("does not support NestedTensor
    outside of its fast path").  Off, the encoder runs as training runs it."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # torch < 2.3: no switch (nor this encoder path)
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


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

