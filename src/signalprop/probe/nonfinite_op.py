"""The operation that made the first NaN/Inf, and the line of your code that called it.

What ``torch.autograd.detect_anomaly`` gives, found on one replayed pass
only (so that it costs nothing otherwise): the forward runs under a
``TorchFunctionMode`` that checks every operation's outputs (one host sync
per operation); the first whose output is non-finite while its inputs are
finite *made* the NaN/Inf -- unless it was given no floating tensor or an
infinite number (``torch.full(..., -inf)``, ``masked_fill(mask, -inf)``:
a causal mask, written on purpose).  For the backward, each operation's autograd node
gets a hook that checks the gradients it returns: the first node (in the
order the backward runs them) that returns a non-finite gradient from finite
incoming ones made it, and the forward operation that created the node
names it.  The stack of each operation is kept as (code, line) pairs from
the caller's frame inward and turned into file and source text for the
culprit only.
"""

from __future__ import annotations

import linecache
import math
import os
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

# frames of these folders are machinery, not the user's code: torch, the probe and the monitor
_MACHINERY = tuple(str(Path(p).resolve()) + os.sep for p in (
    Path(torch.__file__).parent, Path(__file__).parent, Path(__file__).parent.parent / "monitor"))
_STDLIB = str(Path(os.__file__).parent.resolve()) + os.sep


@dataclass(frozen=True)
class Frame:
    """One line of the user's code on the way to the operation."""

    file: str
    line: int
    function: str
    code: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}" + (f": {self.code}" if self.code else "")


@dataclass(frozen=True)
class Origin:
    """Where the first NaN/Inf was made: the operation (``torch.log``,
    ``Tensor.__truediv__``, ``F.linear``), the pass ("forward": its output;
    "backward": the gradient its backward returned), the innermost module of
    the model running it ("" the root, "(loss)" outside the model's forward)
    and the user's frames, outermost first (the last is the line that called
    the operation)."""

    operation: str
    phase: str
    module: str
    frames: tuple[Frame, ...]

    @property
    def line(self) -> Frame | None:
        return self.frames[-1] if self.frames else None


def op_name(func: Any) -> str:
    """A readable name for a function the mode saw."""
    name = getattr(func, "__name__", None) or repr(func)
    qual = getattr(func, "__qualname__", "") or ""
    mod = getattr(func, "__module__", "") or ""
    if qual.startswith(("Tensor.", "TensorBase.", "_TensorBase.")):
        return f"Tensor.{name}"
    if mod == "torch.nn.functional" or mod.startswith("torch._C._nn"):
        return f"F.{name}"
    return f"torch.{name}" if mod.startswith("torch") or not mod else f"{mod}.{name}"


def _float_tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() or obj.is_complex() else []
    if depth > 2:
        return []
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _float_tensors(v, depth + 1)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _float_tensors(v, depth + 1)]
    return []


def _finite(ts: Sequence[torch.Tensor | None]) -> bool:
    return all(t is None or t.numel() == 0 or bool(torch.isfinite(t).all()) for t in ts)


def _nonfinite_scalar(args: Any, kwargs: Any) -> bool:
    """Whether a call was handed an infinite or NaN number (``masked_fill(mask,
    float("-inf"))``): its non-finite output is written on purpose."""
    vals = [*(args if isinstance(args, (tuple, list)) else (args,)), *(kwargs or {}).values()]
    return any(isinstance(v, float) and not math.isfinite(v) for v in vals)


_Stack = tuple[tuple[types.CodeType, int], ...]


class _Watch(TorchFunctionMode):
    """Checks each operation's outputs and remembers, for each autograd node
    it creates, the operation and stack that made it."""

    def __init__(self, base: types.FrameType | None, modules: list[str]) -> None:
        super().__init__()
        self.base = base
        self.modules = modules  # the stack of the model's modules in forward (names)
        self.found: tuple[str, str, _Stack] | None = None  # (op, module, stack)
        self.first_bad: tuple[str, str, _Stack] | None = None
        self.nodes: dict[Any, tuple[str, str, _Stack]] = {}

    def _stack(self) -> _Stack:
        out = []
        f: types.FrameType | None = sys._getframe(2)
        while f is not None and f is not self.base:
            out.append((f.f_code, f.f_lineno))
            f = f.f_back
        return tuple(reversed(out))

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = _float_tensors(out)
        if not outs:
            return out
        where = self.modules[-1] if self.modules else "(loss)"
        info = None
        ins = _float_tensors(args) + _float_tensors(kwargs or {})
        if self.found is None and ins and not _nonfinite_scalar(args, kwargs) and not _finite(list(outs)):
            # (an output made from no floating tensor, or from an infinite number, is a mask written on purpose)
            info = (op_name(func), where, self._stack())
            if self.first_bad is None:
                self.first_bad = info
            if _finite(ins):
                self.found = info
        for t in outs:
            if t.grad_fn is not None and t.grad_fn not in self.nodes:
                self.nodes[t.grad_fn] = info or (op_name(func), where, self._stack())
        return out


def frames_of(stack: _Stack) -> tuple[Frame, ...]:
    """The user's frames of a kept stack (machinery and the standard library left out)."""
    out = []
    for code, line in stack:
        path = str(Path(code.co_filename).resolve()) if not code.co_filename.startswith("<") else code.co_filename
        if path.startswith(_MACHINERY) or path.startswith(_STDLIB) or code.co_filename.startswith("<frozen"):
            continue
        out.append(Frame(code.co_filename, line, code.co_name, linecache.getline(code.co_filename, line).strip()))
    return tuple(out)


def locate(model: nn.Module, run_forward: Callable[[], Any], backward: Callable[[Any], None]) -> Origin | None:
    """Run ``run_forward()`` (the model's forward and, when given, the loss)
    under the watch, then ``backward(its result)``; the :class:`Origin` of
    the first NaN/Inf, or None when both passes stay finite."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []

    def pre(m: nn.Module, args: Any) -> None:
        if m in names:
            stack.append(names[m])

    def post(m: nn.Module, args: Any, out: Any) -> None:
        if m in names and stack:
            stack.pop()

    watch = _Watch(sys._getframe(0), stack)
    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        with watch:
            result = run_forward()
    finally:
        for h in handles:
            h.remove()
    hit = watch.found or watch.first_bad
    if hit is not None:
        return Origin(hit[0], "forward", hit[1], frames_of(hit[2]))
    found: list[tuple[str, str, _Stack]] = []
    first: list[tuple[str, str, _Stack]] = []

    def node_hook(info: tuple[str, str, _Stack], grad_inputs: Any, grad_outputs: Any) -> None:
        if found or not grad_inputs or _finite(list(grad_inputs)):
            return
        if not first:
            first.append(info)
        if _finite(list(grad_outputs)):
            found.append(info)

    hooks = [node.register_hook(lambda gi, go, info=info: node_hook(info, gi, go))
             for node, info in watch.nodes.items()]
    try:
        backward(result)
    finally:
        for h in hooks:
            h.remove()
    hit = found[0] if found else first[0] if first else None
    return Origin(hit[0], "backward", hit[1], frames_of(hit[2])) if hit is not None else None
