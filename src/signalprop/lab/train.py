"""A small, seeded training loop: SGD with momentum on a data split."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .datasets import Split


@dataclass
class TrainResult:
    lr: float
    steps: int
    losses: list[float] = field(default_factory=list)  # every `log_every` steps
    val_acc: float = 0.0
    test_acc: float = 0.0
    diverged: bool = False


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside (0: left as they are),
    back to the caller's number after, also on errors."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def denormals_flushed() -> bool:
    """Whether torch flushes subnormal floats to zero now (torch has no
    getter: a subnormal float32 times 1 stays itself unless they are)."""
    return bool((torch.tensor([1e-40]) * 1.0).item() == 0.0)


@contextmanager
def flush_denormals(on: bool = True) -> Iterator[None]:
    """Subnormal floats flushed to zero inside (``torch.set_flush_denormal``,
    x86 CPUs with SSE3 and ARM), the caller's setting back after, also on
    errors.  A vanishing network's gradients sit in the subnormal range,
    where every CPU multiply takes a slow path: a 50-layer sigmoid MLP with
    torch's default initialization measured 438 ms a step with them and
    31 ms flushed, with the same losses to the last digit (its updates are
    0 either way)."""
    before = denormals_flushed()
    changed = on != before and torch.set_flush_denormal(on)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(before)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        f = getattr(model, "fast_forward", model)
        return float((f(x).argmax(1) == y).float().mean())


def train(model: nn.Module, data: Split, *, steps: int, lr: float, momentum: float = 0.9, batch: int = 128,
          seed: int = 0, clip: float | None = None, log_every: int = 25, progress: Any = None,
          optimizer: str = "sgd") -> TrainResult:
    """Train in place; minibatches drawn from ``seed``.  A loss that turns
    non-finite stops the run (``diverged``), counted at chance accuracy."""
    g = torch.Generator().manual_seed(seed)
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    f = getattr(model, "fast_forward", model)
    res = TrainResult(lr, steps)
    n = data.x_train.shape[0]
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        loss = nn.functional.cross_entropy(f(data.x_train[idx]), data.y_train[idx])
        if not math.isfinite(float(loss.detach())):
            res.diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            res.losses.append(float(loss.detach()))
        if progress is not None:
            progress.advance()
    model.eval()
    if res.diverged:
        res.val_acc = res.test_acc = 1.0 / data.n_classes
    else:
        res.val_acc = accuracy(model, data.x_val, data.y_val)
        res.test_acc = accuracy(model, data.x_test, data.y_test)
    return res
