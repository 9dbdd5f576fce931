"""Hooks that turn one forward/backward pass into per-call statistics.

Every leaf module that runs is recorded, in execution order (a module called
twice gives two rows).  Activations called as functions inside a forward
(``torch.tanh(x)``, ``F.gelu(x)``, ``x.relu()``) are recorded too, through a
``TorchFunctionMode``; inside a leaf module they are part of that module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import activations as _act
from . import stats as S

_WEIGHT_LAYERS = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                  nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Functions recognised as activations when called inside a forward: name per function.
_FUNCTIONAL: dict[Callable[..., Any], str] = {}
for _name, _fns in {
    "tanh": (torch.tanh, torch.Tensor.tanh, F.tanh),
    "sigmoid": (torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid),
    "relu": (torch.relu, torch.Tensor.relu, F.relu, torch.relu_, torch.Tensor.relu_),
    "gelu": (F.gelu,), "silu": (F.silu,), "leaky_relu": (F.leaky_relu,), "elu": (F.elu,),
    "selu": (F.selu, torch.selu), "softplus": (F.softplus,), "mish": (F.mish,),
    "hardtanh": (F.hardtanh,), "softsign": (F.softsign,), "erf": (torch.erf, torch.Tensor.erf),
}.items():
    for _f in _fns:
        _FUNCTIONAL[_f] = _name


def base_name(a: _act.Activation | None) -> str | None:
    """Registry base name ("tanh", "leaky_relu", ...) of an activation, else None."""
    return None if a is None else a.name.split("(")[0]


def functional_activation(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _act.Activation | None:
    """The exact activation a recognised functional call computes, with its parameters."""
    name = _FUNCTIONAL.get(func)
    if name is None:
        return None
    if name == "leaky_relu":
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return _act.get("leaky_relu", float(slope))
    if name == "elu":
        return _act.get("elu", float(args[1] if len(args) > 1 else kwargs.get("alpha", 1.0)))
    if name == "gelu":
        return _act.get("gelu_tanh" if kwargs.get("approximate", "none") == "tanh" else "gelu")
    if name == "hardtanh" and (args[1:3] or (kwargs.get("min_val", -1.0), kwargs.get("max_val", 1.0))) not in \
            ((-1.0, 1.0), (-1, 1)):
        return None
    if name == "softplus" and (len(args) > 1 or kwargs.get("beta", 1) != 1):
        return None
    return _act.get(name)


def first_float_tensor(obj: Any, _depth: int = 0) -> torch.Tensor | None:
    """The first floating-point tensor in a (nested) output: tensors, tuples,
    lists, dicts (HuggingFace ``ModelOutput`` is one) and dataclasses."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() or obj.is_complex() else None
    if _depth > 6:
        return None
    if isinstance(obj, dict):
        items: Iterator[Any] = iter(obj.values())
    elif isinstance(obj, (tuple, list)):
        items = iter(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    else:
        return None
    for v in items:
        t = first_float_tensor(v, _depth + 1)
        if t is not None:
            return t
    return None


@dataclass
class Row:
    """Raw record of one call; statistics are 0-d tensors until finalised."""

    index: int
    name: str
    kind: str
    depth: int
    shape: tuple[int, ...]
    module: nn.Module | None
    act: _act.Activation | None  # the exact activation this row computes, if it is one
    input_second_moment: float | None = None
    fwd: dict[str, torch.Tensor] = field(default_factory=dict)
    bwd: dict[str, torch.Tensor] = field(default_factory=dict)


# Modules that compute their children functionally (MultiheadAttention never
# calls its out_proj as a module): recorded as one row, their children not.
FUSED = (nn.MultiheadAttention,)


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    fused_children = {id(c) for m in model.modules() if isinstance(m, FUSED) for c in m.modules() if c is not m}
    return [m for m in model.modules() if id(m) not in fused_children
            and (isinstance(m, FUSED) or not any(True for _ in m.children()))]


class _FunctionalCapture(TorchFunctionMode):
    def __init__(self, recorder: "Recorder") -> None:
        super().__init__()
        self.r = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.r.leaf_depth == 0 and func in _FUNCTIONAL and isinstance(out, torch.Tensor):
            act = functional_activation(func, args, kwargs)
            name = _FUNCTIONAL[func]
            parent = self.r.stack[-1] if self.r.stack else ""
            self.r.record(f"{parent}.{name}" if parent else name, f"F.{name}", None, act, out)
        return out


class Recorder:
    """Attach to a model; ``with recorder.active(): model(...)``; read ``rows``."""

    def __init__(self, model: nn.Module, *, capture_functional: bool = True, stats: bool = True,
                 track_inputs: bool = False) -> None:
        """``stats=False`` records only the call sequence (activation detection);
        ``track_inputs`` also records each weight layer's input second moment."""
        self.model = model
        self.stats = stats
        self.track_inputs = track_inputs
        self.rows: list[Row] = []
        self.stack: list[str] = []  # names of modules currently inside forward
        self.leaf_depth = 0
        self.capture_functional = capture_functional
        self._handles: list[Any] = []
        self._names = {m: n for n, m in model.named_modules()}
        self._leaves = leaf_modules(model)

    # -- hooks ----------------------------------------------------------------
    def _pre(self, m: nn.Module, args: Any) -> None:
        self.stack.append(self._names.get(m, "?"))
        if m in self._leafset:
            self.leaf_depth += 1

    def _post(self, m: nn.Module, args: Any, out: Any) -> Any:
        self.stack.pop()
        if m in self._leafset:
            self.leaf_depth -= 1
            replaced = None
            if self.stats and isinstance(out, torch.Tensor) and out.requires_grad and out._is_view():
                # An in-place op on a view (ReLU(inplace=True) after a Linear on
                # 3-D input) rebases the view's history, and a gradient hook on
                # it would never fire; a non-view copy of the output keeps it.
                out = replaced = out.clone()
            t = first_float_tensor(out)
            if t is not None:
                row = self.record(self._names.get(m, "?"), type(m).__name__, m, _act.from_module(m), t)
                if self.track_inputs and isinstance(m, _WEIGHT_LAYERS):
                    x = first_float_tensor(args)
                    if x is not None:
                        with torch.no_grad():
                            row.input_second_moment = float(x.detach().float().pow(2).mean())
            return replaced
        return None

    def record(self, name: str, kind: str, module: nn.Module | None, act: _act.Activation | None,
               t: torch.Tensor) -> Row:
        depth = name.count(".") + 1 if name else 0
        row = Row(len(self.rows), name, kind, depth, tuple(t.shape), module, act)
        activation = base_name(act)
        if not self.stats:
            self.rows.append(row)
            return row
        with torch.no_grad():
            y = t.detach().float()
            row.fwd.update(S.forward_moments(y))
            if activation is not None:
                sat = S.saturation(activation)
                if sat is not None:
                    row.fwd.update(sat(y))
                if activation == "relu":
                    row.fwd.update(S.dead_units(y))
        self.rows.append(row)
        if t.requires_grad:
            t.register_hook(lambda g, row=row: self._grad(row, g))
        return row

    @staticmethod
    def _grad(row: Row, g: torch.Tensor) -> None:
        with torch.no_grad():
            row.bwd.update(S.grad_moments(g.detach().float()))

    # -- lifecycle --------------------------------------------------------------
    def attach(self) -> None:
        self._leafset = set(self._leaves)
        for m in self.model.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def functional_mode(self) -> TorchFunctionMode | None:
        return _FunctionalCapture(self) if self.capture_functional else None
