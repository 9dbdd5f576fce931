"""Leave a model exactly as it was: buffers, grads, requires_grad, mode, RNG."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def preserved(model: nn.Module, modules: list[nn.Module] | None = None, python_state: bool = False
              ) -> Iterator[None]:
    """Restore everything a diagnostic pass could touch, also on exceptions.
    ``modules``: ``list(model.modules())`` when the caller has it already.
    ``python_state``: also each module's plain Python attributes (a step
    counter, a cache list or dict a ``forward`` keeps): values put back,
    lists, dicts and sets refilled in place (so references to them stay
    valid), attributes the pass added removed -- for replaying a user's
    forward, whose own state must not advance twice.

    Parameters' values are not copied: a pass never writes them (gradients
    are taken with ``torch.autograd.grad``, which leaves ``.grad`` alone).
    Buffers are (BatchNorm running statistics change in train mode), and so
    are the ``.grad`` references, ``requires_grad`` flags, each module's
    ``training`` flag and the global RNG states (dropout draws from them).
    """
    mods = list(model.modules()) if modules is None else modules  # one traversal (4,000 modules in a 2,000-layer net)
    params = list(dict.fromkeys(p for m in mods for p in m._parameters.values() if p is not None))
    bufs = list(dict.fromkeys(b for m in mods for b in m._buffers.values() if b is not None))
    buffers = [(b, b.detach().clone()) for b in bufs]
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in mods]
    devices = sorted({b.device.index for b in [*params, *bufs]
                      if b.device.type == "cuda" and b.device.index is not None})
    attrs = [(m, _plain_state(m)) for m in mods] if python_state else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for m, plain in attrs:
                _restore_plain_state(m, plain)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            # set only what changed: a module's attribute write goes through its
            # __setattr__, a parameter's .grad through a checked setter (4,000 modules
            # of a deep net cost ~10 ms to restore unconditionally)
            for p, g, f in zip(params, grads, flags):
                if p.grad is not g:
                    p.grad = g
                if p.requires_grad != f:
                    p.requires_grad_(f)
            for m, t in modes:
                if m.training is not t:
                    m.training = t


# what nn.Module keeps for itself (parameters, buffers, children, hooks, flags): restored above or left alone
_OWN = frozenset(vars(nn.Module())) | {"training"}
_CONTAINERS = (list, dict, set)


def _plain_state(m: nn.Module) -> dict[str, tuple[Any, Any]]:
    """A module's own Python attributes: (value, shallow copy of a list/dict/set, else None)."""
    return {k: (v, copy.copy(v) if type(v) in _CONTAINERS else None) for k, v in vars(m).items() if k not in _OWN}


def _restore_plain_state(m: nn.Module, saved: dict[str, tuple[Any, Any]]) -> None:
    d = vars(m)
    for k in [k for k in d if k not in _OWN and k not in saved]:
        del d[k]
    for k, (v, c) in saved.items():
        if c is not None:  # refill the same container: others may hold a reference to it
            if isinstance(v, list):
                v[:] = c
            else:
                v.clear()
                v.update(c)
        d[k] = v
