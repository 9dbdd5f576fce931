"""One model at one width and one seed: a few training steps, every layer's scale read at each.

Readings ``t = 0 .. steps``: ``t = 0`` is the forward pass at initialization,
``t = k`` the forward pass after ``k`` optimizer steps (the batch of reading
``t`` is then back-propagated and stepped on, except after the last).  At each
reading, per module (matched across widths by its name and the role):

* ``activation`` -- the module's output, one number per coordinate (mean |x|,
  as ``mup``'s coord check, or RMS);
* ``update`` -- the change of the module's output that its own parameter
  update (w after - w before, as the optimizer applied it) makes at this
  reading's input: f(x; w_t) - f(x; w_{t-1}).  Measured where the update acts,
  not on the raw weights: a width-n layer sums n correlated inputs, and a
  parametrization may put its width factor in the forward pass (mup's
  ``MuReadout`` divides by the width multiplier; u-muP scales every op), so
  only the output change has one right exponent, zero (Yang et al. 2022,
  Tensor Programs V, Desideratum J.1; Yang, Simon & Bernstein 2023);
* ``logits`` -- the model's output (the root module's);
* ``attention`` -- the logits q.k^T * scale of every
  ``F.scaled_dot_product_attention`` call (its ``scale=``, default 1/sqrt(d)),
  RMS over all query-key pairs, attributed to the innermost module running it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..probe.attention import sdpa_logits

STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "l1": lambda x: x.abs().mean(),  # mean |x| per coordinate: mup's FDICT["l1"]
    "rms": lambda x: x.square().mean().sqrt(),
}


@dataclass(frozen=True)
class Task:
    """One (width, seed) cell of a coordinate check: what a worker needs."""

    make_model: Callable[[int], nn.Module]
    width: int
    seed: int
    data: Any
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    steps: int
    statistic: str
    loss_fn: Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class Cell:
    """A cell's readings: ``values[(name, role)]`` is one float per reading
    (NaN where the quantity does not exist, e.g. an update at ``t = 0``)."""

    width: int
    seed: int
    values: dict[tuple[str, str], tuple[float, ...]]
    kinds: dict[str, str]  # module name -> class name ("Linear")
    fans: dict[str, tuple[int, int]]  # module name -> (fan_in, fan_out) of its weight, where it has one
    optimizer: str


def cross_entropy(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension, leading dimensions flattened (sequence models)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))


def _first_float(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, (tuple, list)):
        for x in obj:
            t = _first_float(x)
            if t is not None:
                return t
    return None


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


class _Recorder(TorchFunctionMode):
    """Forward hooks on every module plus a mode that sees SDPA calls."""

    def __init__(self, model: nn.Module, statistic: str) -> None:
        super().__init__()
        self.model = model
        self.stat = STATISTICS[statistic]
        self.names = {m: n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.busy = False  # inside our own extra forward (update measurement): record nothing
        self.t = 0
        self.rows: dict[tuple[str, str], dict[int, float]] = {}
        self.old: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # module -> (param, w_{t-1})
        self.sdpa_calls: dict[str, int] = {}
        self.handles: list[Any] = []

    def _put(self, name: str, role: str, value: torch.Tensor) -> None:
        self.rows.setdefault((name, role), {})[self.t] = float(value)

    def attach(self) -> None:
        for m in self.model.modules():
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post, with_kwargs=True))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, m: nn.Module, args: Any) -> None:
        if not self.busy:
            self.stack.append(self.names.get(m, "?"))

    def _post(self, m: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        if self.busy:
            return
        name = self.stack.pop()
        y = _first_float(out)
        if y is None:
            return
        with torch.no_grad():
            self._put(name, "logits" if m is self.model else "activation", self.stat(y.detach()))
            if m in self.old:
                self._put(name, "update", self.stat(y.detach() - self._previous_output(m, args, kwargs, y)))

    def _previous_output(self, m: nn.Module, args: Any, kwargs: dict[str, Any], y: torch.Tensor) -> torch.Tensor:
        """The module's output at the same input with its own parameters as
        they were before the last step.  Values are swapped through ``.data``
        (no autograd version bump: the graph of this pass stays valid) and
        restored, buffers too (a BatchNorm's running statistics)."""
        own = self.old[m]
        bufs = [(b, b.detach().clone()) for b in m.buffers(recurse=False)]
        now = [(p, p.detach().clone()) for p, _ in own]
        self.busy = True
        try:
            for p, before in own:
                p.data.copy_(before)
            prev = _first_float(m(*args, **kwargs))
        finally:
            for p, v in now:
                p.data.copy_(v)
            for b, v in bufs:
                b.data.copy_(v)
            self.busy = False
        if prev is None or prev.shape != y.shape:
            return torch.full_like(y, math.nan)
        return prev.detach()

    def snapshot(self) -> None:
        """Remember w_{t-1} of every module's own trainable parameters (before a step)."""
        self.old = {}
        for m in self.model.modules():
            own: list[tuple[torch.Tensor, torch.Tensor]] = [
                (p, p.detach().clone()) for p in m.parameters(recurse=False) if p.requires_grad]
            if own:
                self.old[m] = own

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not self.busy:
            with torch.no_grad():
                self._attention(args, kwargs)
        return func(*args, **kwargs)

    def _attention(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """RMS of the logits over every query-key pair the softmax keeps (a
        masked pair is never learned from), formed as the probe forms them."""
        parent = self.stack[-1] if self.stack else ""
        i = self.sdpa_calls.get(parent, 0)
        self.sdpa_calls[parent] = i + 1
        got = sdpa_logits(args, kwargs, query_rows=None)
        if got is None:
            return
        logits, keep = got
        name = (f"{parent}." if parent else "") + ("sdpa" if i == 0 else f"sdpa[{i}]")
        self._put(name, "attention", logits[keep.expand_as(logits)].square().mean().sqrt())


@contextmanager
def _recording(rec: _Recorder) -> Iterator[_Recorder]:
    rec.attach()
    try:
        with rec:
            yield rec
    finally:
        rec.detach()


def _fans(m: nn.Module) -> tuple[int, int] | None:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    from ..layers import fans

    try:
        return fans(m)
    except (ValueError, TypeError):
        return None


def run_cell(task: Task) -> Cell:
    """Build the model at ``task.width`` under ``torch.manual_seed(task.seed)``
    (the global generator is restored after) and read it at every step."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.seed)
        model = task.make_model(task.width)
        if not isinstance(model, nn.Module):
            raise ValueError(f"make_model({task.width}) returned {type(model).__name__}, not an nn.Module")
        model.train()
        opt = task.make_optimizer(model)
        batches = task.data if isinstance(task.data, list) else [task.data]
        rec = _Recorder(model, task.statistic)
        with _recording(rec):
            for t in range(task.steps + 1):
                rec.t, rec.sdpa_calls = t, {}
                inputs, targets = batches[t % len(batches)]
                out = _call(model, inputs)
                if t == task.steps:
                    break
                loss = task.loss_fn(out, targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                rec.snapshot()
                opt.step()
    n = task.steps + 1
    values = {key: tuple(row.get(t, math.nan) for t in range(n)) for key, row in rec.rows.items()}
    names = dict(model.named_modules())
    fans = {name: f for name, m in names.items() if (f := _fans(m)) is not None}
    return Cell(task.width, task.seed, values, {n_: type(m).__name__ for n_, m in names.items()}, fans,
                type(opt).__name__)
