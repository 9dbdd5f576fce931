"""The monitored training step the monitor's loop tests share (not collected:
no ``test_`` prefix)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def corrupted(data: Callable[[int], tuple[torch.Tensor, torch.Tensor]], steps: int, at: int, value: float
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``data(k)`` for each of ``steps`` steps, step ``at``'s first input entry set to ``value`` (NaN, inf)."""
    for k in range(steps):
        x, y = data(k)
        if k == at:
            x[0, 0] = value
        yield x, y


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                mon: Any = None, takes: Callable[[int, torch.Tensor], bool] = lambda k, loss: True,
                sched: Any = None) -> None:
    """One step per ``(x, y)`` batch: cross-entropy of ``model(x)``, zero_grad,
    backward, ``mon.step(loss)`` when a monitor is given, the optimizer step
    where ``takes(k, loss)`` (a loop that skips a step by hand, or guards
    against NaN itself), then ``sched.step()`` when a scheduler is given."""
    for k, (x, y) in enumerate(batches):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if mon is not None:
            mon.step(loss)
        if takes(k, loss):
            opt.step()
        if sched is not None:
            sched.step()


def steps_with_losses(model: nn.Module, opt: torch.optim.Optimizer, mon: Any, values: Iterable[float],
                      x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step per value on the fixed batch ``(x, y)``, the monitor
    given ``value`` as the step's loss (a tensor off the real loss's graph):
    the rules read a chosen series while the model trains as usual."""
    for value in values:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        mon.step(loss.detach() * 0 + value)
        opt.step()
