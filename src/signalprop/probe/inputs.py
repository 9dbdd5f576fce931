"""The call's inputs: how a model is called with them, which floating tensors
become leaves that require grad (so the gradient reaches the input), and the
random cotangent that starts the backward pass when no loss is given."""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn


class ModelError(ValueError):
    """The model failed on the given inputs; the message names the module."""


COTANGENT_SEED = 0  # the random unit-variance cotangent is the same on every call on a device


@dataclass(frozen=True)
class CallArgs:
    """Positional and keyword arguments of one model call, as captured by a
    forward pre-hook (the monitor replays a call with them)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _sequence(inputs: Any) -> bool:
    """Whether ``inputs`` are several arguments: a tuple or list -- not a
    ``PackedSequence``, a named tuple that is one argument (an RNN's input)."""
    return isinstance(inputs, (tuple, list)) and not isinstance(inputs, nn.utils.rnn.PackedSequence)


# signalprop's own passes through a model running now (check, a monitor's replay of a NaN step, LSUV): a
# process-wide count, not per thread (nn.DataParallel runs a model's hooks in its worker threads)
_OWN_PASSES = [0]

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def own_pass() -> Iterator[None]:
    """While signalprop runs a model itself (forward and backward): a
    monitor watching the model (:func:`in_own_pass`) leaves these calls
    alone -- ``sp.check(model, x)`` inside a monitored loop, or another
    monitor's replay of a NaN step, is no forward of the training's."""
    _OWN_PASSES[0] += 1
    try:
        yield
    finally:
        _OWN_PASSES[0] -= 1


def in_own_pass() -> bool:
    """Whether one of signalprop's own passes runs (see :func:`own_pass`)."""
    return _OWN_PASSES[0] > 0


def as_own_pass(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run as one of signalprop's own passes (:func:`own_pass`)."""
    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with own_pass():
            return fn(*args, **kwargs)
    return run


@as_own_pass
def call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, CallArgs):
        return model(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if _sequence(inputs):
        return model(*inputs)
    return model(inputs)


def tensors_of(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, CallArgs):
        return tensors_of(inputs.args) + tensors_of(inputs.kwargs)
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, nn.utils.rnn.PackedSequence):
        return [inputs.data]
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return [v for v in values if isinstance(v, torch.Tensor)]


def batch_size(inputs: Any) -> int | None:
    t = next(iter(tensors_of(inputs)), None)
    return None if t is None or t.dim() == 0 else int(t.shape[0])


# a class's forward -> the names of its parameters after self: inspect.signature of an HF forward (a
# decorated function of a dozen parameters) cost ~0.1 ms a call, the same answer every time
_PARAMS: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _forward_params(model: nn.Module) -> tuple[str, ...] | None:
    """The parameter names of ``model.forward`` (bound: without ``self``), or
    None where it has no signature; kept per function for a forward defined
    on the class, asked anew for one set on the instance."""
    fwd = model.forward
    func = getattr(fwd, "__func__", None) if getattr(fwd, "__self__", None) is model else None
    if func is not None:
        try:
            known = _PARAMS.get(func)
        except TypeError:  # a function that cannot be weakly referenced
            func = None
        else:
            if known is not None:
                return known
    try:
        names = tuple(inspect.signature(fwd).parameters)
    except (TypeError, ValueError):
        return None
    if func is not None:
        _PARAMS[func] = names
    return names


def without_cache(model: nn.Module, inputs: Any) -> Any:
    """A diagnostic pass never needs a key/value cache, and a cache updated in
    place (HF RWKV's state in eval mode, say) breaks the backward pass: models
    whose forward takes ``use_cache`` get ``use_cache=False`` unless the
    caller set it."""
    params = _forward_params(model)
    if params is None or "use_cache" not in params:
        return inputs
    if isinstance(inputs, dict):
        return inputs if "use_cache" in inputs else {**inputs, "use_cache": False}
    if isinstance(inputs, torch.Tensor) and params:
        return {params[0]: inputs, "use_cache": False}
    return inputs


def prepare_inputs(inputs: Any) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
    """Floating input tensors become leaves that require grad, so the gradient
    reaches (and is measured at) the input; integer ones (token ids) stay.
    The model is fed a copy of each leaf (returned third, in order), so that
    a forward that edits its input in place (``ReLU(inplace=True)`` first,
    ``x.sub_(mean)``) works as it does on the user's own tensor: autograd
    refuses in-place edits of a leaf that requires grad.  An inference
    tensor (made under ``torch.inference_mode()``) is copied into an
    ordinary one first."""
    leaves: list[torch.Tensor] = []
    fed: list[torch.Tensor] = []

    def conv(v: Any) -> Any:
        if isinstance(v, nn.utils.rnn.PackedSequence):  # its data, as a tensor's
            return v._replace(data=conv(v.data))
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            leaf = (v.clone() if v.is_inference() else v.detach()).requires_grad_(True)
            leaves.append(leaf)
            fed.append(leaf.clone())
            return fed[-1]
        return v

    if isinstance(inputs, CallArgs):
        out: Any = CallArgs(tuple(conv(v) for v in inputs.args), {k: conv(v) for k, v in inputs.kwargs.items()})
    elif isinstance(inputs, dict):
        out = {k: conv(v) for k, v in inputs.items()}
    elif _sequence(inputs):
        out = rebuilt(inputs, [conv(v) for v in inputs])
    else:
        out = conv(inputs)
    return out, leaves, fed


def rebuilt(seq: tuple[Any, ...] | list[Any], items: list[Any]) -> Any:
    """A sequence of ``seq``'s type holding ``items``: a named tuple (a
    ``typing.NamedTuple`` batch) takes them as its fields, a tuple or list
    (or a subclass) as one iterable."""
    return type(seq)(*items) if isinstance(seq, tuple) and hasattr(seq, "_fields") else type(seq)(items)


def shapes(inputs: Any, most: int = 16) -> str:
    """The shapes of ``inputs`` as a message shows them; a sequence of more
    than ``most`` arguments is cut short, with its length."""
    if isinstance(inputs, nn.utils.rnn.PackedSequence):
        return f"PackedSequence{tuple(inputs.data.shape)}"
    if isinstance(inputs, (tuple, list)) and len(inputs) > most:
        return f"{shapes(list(inputs[:most]))}, ... ({len(inputs)} arguments)"
    if isinstance(inputs, CallArgs):
        return ", ".join(x for x in (shapes(inputs.args), shapes(inputs.kwargs)) if x)
    if isinstance(inputs, torch.Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, dict):
        return ", ".join(f"{k}={shapes(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(shapes(v) for v in inputs)
    return type(inputs).__name__


# A CPU cotangent above this many entries is drawn in blocks of it, each from its own generator
# (seeded COTANGENT_SEED + block index) on a thread of its own: a generator draws on one thread, and
# GPT-2's logits at batch 8 x 512 (206M entries) took 2.8 s to draw inside check, 12% of the step
_COT_BLOCK = 1 << 22


def cotangent(t: torch.Tensor) -> torch.Tensor:
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
