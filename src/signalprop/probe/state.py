"""Leave a model exactly as it was: buffers, grads, requires_grad, mode, RNG."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def preserved(model: nn.Module, modules: list[nn.Module] | None = None, python_state: bool = True,
              writes_parameters: bool = False) -> Iterator[list[str]]:
    """Restore everything a diagnostic pass could touch, also on exceptions.
    ``modules``: ``list(model.modules())`` when the caller has it already.

    Buffers' values are copied and put back (BatchNorm running statistics
    change in train mode), and so are the ``.grad`` references,
    ``requires_grad`` flags, each module's ``training`` flag, the global RNG
    states (dropout draws from them) and which tensor each module holds
    under each parameter and buffer name: a forward that reassigns a buffer
    (``self.steps = self.steps + 1``, an EMA) or registers a new one (HF's
    dynamic RoPE recomputes ``inv_freq`` for a longer input) gets the
    original tensor back and loses the new name.  ``python_state`` (on by
    default): also each module's plain Python attributes (a step counter, a
    cache list or dict a ``forward`` keeps, ``max_seq_len_cached``): values
    put back, lists, dicts and sets refilled in place (so references to them
    stay valid), attributes the pass added removed (~9 ms for the 4,000
    modules of a 2,000-layer net).

    Parameters' values are not copied: a pass never writes them (gradients
    are taken with ``torch.autograd.grad``, which leaves ``.grad`` alone).  A
    forward that writes its own parameters in place (HF RWKV rescales two
    weights per block on its first forward in eval mode and records it in
    ``layers_are_rescaled``; a clamp under ``no_grad``) cannot have them put
    back: the list this yields is filled on exit with their names, and the
    Python attributes are then left as the forward set them, which may
    record that write (putting RWKV's flag back alone would make its next
    forward rescale the weights twice).  ``writes_parameters``: the caller's
    job is to write them (LSUV): nothing is listed, attributes put back.
    """
    mods = list(model.modules()) if modules is None else modules  # one traversal (4,000 modules in a 2,000-layer net)
    params = list(dict.fromkeys(p for m in mods for p in m._parameters.values() if p is not None))
    bufs = list(dict.fromkeys(b for m in mods for b in m._buffers.values() if b is not None))
    buffers = [(b, b.detach().clone()) for b in bufs]
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    versions = [p._version for p in params]
    modes = [(m, m.training) for m in mods]
    held = [(d, dict(d)) for m in mods for d in (m._parameters, m._buffers, m._modules)]
    devices = sorted({b.device.index for b in [*params, *bufs]
                      if b.device.type == "cuda" and b.device.index is not None})
    attrs = [(m, _plain_state(m)) for m in mods] if python_state else []
    written: list[str] = []
    with torch.random.fork_rng(devices=devices):
        try:
            yield written
        finally:
            idx = [] if writes_parameters else [i for i, (p, v) in enumerate(zip(params, versions)) if p._version != v]
            if idx:
                names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
                written += [names.get(id(params[i]), "?") for i in idx]
            else:
                for m, plain in attrs:
                    _restore_plain_state(m, plain)
            for now, was in held:
                _restore_mapping(now, was)
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


def _restore_mapping(now: dict[str, Any], was: dict[str, Any]) -> None:
    """``now`` (a module's ``_parameters``, ``_buffers`` or ``_modules``) holding exactly
    the objects of ``was`` again, refilled in place only when one differs."""
    if len(now) != len(was) or any(now.get(k, now) is not v for k, v in was.items()):
        now.clear()
        now.update(was)


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
