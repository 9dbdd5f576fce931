"""Leave a model exactly as it was: buffers, grads, requires_grad, mode, RNG."""

from __future__ import annotations

import collections
import copy
import operator
import random
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _parametrisations(mods: list[nn.Module]) -> set[int]:
    """ids of the modules inside ``torch.nn.utils.parametrize`` containers (the parametrisations themselves)."""
    from torch.nn.utils.parametrize import ParametrizationList

    return {id(sub) for m in mods if isinstance(m, ParametrizationList) for sub in m.modules()}


@contextmanager
def preserved(model: nn.Module, modules: list[nn.Module] | None = None, python_state: bool = True,
              writes_parameters: bool = False) -> Iterator[list[str]]:
    """Restore everything a diagnostic pass could touch, also on exceptions.
    ``modules``: ``list(model.modules())`` when the caller has it already.

    Buffers' values are copied and put back (BatchNorm running statistics
    change in train mode), and so are the ``.grad`` references,
    ``requires_grad`` flags, each module's ``training`` flag, the global RNG
    states (dropout draws from them; Python's and NumPy's too, and those of
    the ``torch.Generator`` and ``numpy.random.Generator`` objects among the
    attributes of modules of classes defined outside ``torch.nn``) and which tensor each module holds
    under each parameter and buffer name: a forward that reassigns a buffer
    (``self.steps = self.steps + 1``, an EMA) or registers a new one (HF's
    dynamic RoPE recomputes ``inv_freq`` for a longer input) gets the
    original tensor back and loses the new name; a buffer resized or moved
    in place is set back onto its own storage, shape and strides.  With
    ``python_state``, each module's forward and backward hooks (those a
    forward registers are removed: HF's first forward that collects hidden
    states registers some and records that in an attribute) and children too (a head built on the first
    call, a ModuleList appended to), unless parameters were written (below).  ``python_state`` (on by
    default): also each module's plain Python attributes (a step counter, a
    cache list or dict a ``forward`` keeps, ``max_seq_len_cached``): values
    put back, lists, dicts and sets refilled in place (so references to them
    stay valid), attributes the pass added removed -- for the modules of
    classes defined outside ``torch.nn`` (torch's own layers keep no Python
    state that their forward changes; a 2,000-layer MLP of them costs
    nothing more, an HF model of 40 modules ~0.05 ms); of torch's own
    layers, which tensor each holds under each parameter and buffer name
    (a parent's forward may reassign them: ``self.bn.running_mean = ...``).

    Parameters' values are not copied: a pass never writes them (gradients
    are taken with ``torch.autograd.grad``, which leaves ``.grad`` alone).  A
    forward that writes its own parameters in place (HF RWKV rescales two
    weights per block on its first forward in eval mode and records it in
    ``layers_are_rescaled``; a clamp under ``no_grad``), or moves them to
    other memory (``p.data = ...``), cannot have them put back: the list
    this yields is filled on exit with their names, and the Python
    attributes are then left as the forward set them, which may record
    that write (putting RWKV's flag back alone would make its next forward
    rescale the weights twice).  ``writes_parameters``: the caller's
    job is to write them (LSUV): nothing is listed, attributes put back.
    """
    mods = list(model.modules()) if modules is None else modules  # one traversal (4,000 modules in a 2,000-layer net)
    params = list(dict.fromkeys(p for m in mods for p in m._parameters.values() if p is not None))
    # with writes_parameters, a parametrisation's buffers are the weights' state, not the forward's (torch's
    # orthogonal parametrisation keeps the weight in one, which a write through it replaces): not put back
    weights = _parametrisations(mods) if writes_parameters else set()
    bufs = list(dict.fromkeys(b for m in mods if id(m) not in weights for b in m._buffers.values() if b is not None))
    saved_bufs = _copies(bufs)
    layouts = [_layout(b) for b in bufs]  # where each buffer's entries live (a forward may resize or move them)
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    versions = [p._version for p in params]
    # where each parameter's entries live: p.data = ... moves them without a version bump (a write all the same)
    ptrs = [p.data_ptr() for p in params]
    modes = [(m, m.training) for m in mods]
    # (is_cuda and get_device() are flags read in C: .device builds a torch.device per tensor, ~1 ms a 2,000-layer net)
    devices = sorted({b.get_device() for b in [*params, *bufs] if b.is_cuda})
    # per module of a class defined outside torch (torch's own layers keep no Python state a forward changes):
    # its attributes (a copy of its __dict__, made in C), its parameter and buffer mappings where it has any,
    # and copies of the containers among its own attributes (see _containers)
    attrs: list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any], list[tuple[Any, Any]]]] = []
    # and per module of torch's own classes that holds parameters or buffers, those mappings: its own forward
    # changes none, but its parent's may (self.bn.running_mean = ..., self.out.weight = nn.Parameter(...))
    maps: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
    if python_state:
        for m in mods:
            if id(m) in weights:
                continue
            conts = _containers(m)
            if conts is not None:
                attrs.append((m, vars(m).copy(), dict(m._parameters), dict(m._buffers), conts))
            elif m._parameters or m._buffers:
                maps.append((m, dict(m._parameters), dict(m._buffers)))
    # every module's children, torch's containers too (a forward that appends to a ModuleList, swaps a
    # Sequential's layer or builds a head on its first call)
    children = [(m, dict(m._modules) if m._modules else None) for m in mods] if python_state else []
    # each module's forward and backward hooks, where it has any (HF's output-capturing hooks are registered by
    # the first forward, which records that in a Python attribute: that attribute put back alone, every later
    # forward registered them once more)
    # (attributes read in an or-chain: ~0.2 us a module, half of map(attrgetter) and any())
    hooks = {id(m): [frozenset(d) for d in _HOOKS(m)] for m in mods if m._forward_hooks or m._forward_pre_hooks
             or m._backward_hooks or m._backward_pre_hooks} if python_state else None
    # random generators the forward may draw from besides torch's global ones (which fork_rng puts back):
    # Python's and NumPy's global ones (a LayerDrop coin, a NumPy augmentation) and the torch and NumPy
    # generators a module holds as attributes (noise injection) -- the states, not the objects, change
    np_mod = sys.modules.get("numpy")
    np_gen = np_mod.random.Generator if np_mod is not None else None
    kinds = frozenset(t for t in (torch.Generator, np_gen) if t is not None)
    # (the attribute dicts that hold one found in C, ~0.1 us a module; only those are looked through)
    found = list(dict.fromkeys(v for _, saved, _, _, _ in attrs if not kinds.isdisjoint(map(type, saved.values()))
                               for v in saved.values() if type(v) in kinds))
    torch_gens = [(g, g.get_state()) for g in found if type(g) is torch.Generator]
    np_gens = [(g, g.bit_generator.state) for g in found if type(g) is not torch.Generator]
    py_state = random.getstate()
    np_state = np_mod.random.get_state() if np_mod is not None else None
    written: list[str] = []
    with torch.random.fork_rng(devices=devices):
        try:
            yield written
        finally:
            idx = [] if writes_parameters else [i for i, (p, v, a) in enumerate(zip(params, versions, ptrs))
                                                if p._version != v or p.data_ptr() != a]
            if idx:
                names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
                written += [names.get(id(params[i]), "?") for i in idx]
            for m, saved, ps, bs, conts in attrs:
                d = vars(m)
                if not written and (len(d) != len(saved) or not all(map(operator.is_, d.values(), saved.values()))):
                    d.clear()
                    d.update(saved)
                _restore_mapping(m, m._parameters, ps)
                _restore_mapping(m, m._buffers, bs)
                if not written:
                    for v, c in conts:  # refilled in place: others may hold a reference to the container
                        _refill(v, c)
            for m, ps, bs in maps:
                _restore_mapping(m, m._parameters, ps)
                _restore_mapping(m, m._buffers, bs)
            if not written:  # (left as the forward set them, as the attributes that may refer to them are)
                for m, ms in children:  # compared in C, by identity and in order: ~0.1 us a module
                    now = m._modules
                    if ms is None:
                        if now:
                            now.clear()
                    elif len(now) != len(ms) or not all(map(operator.is_, now.values(), ms.values())):
                        now.clear()
                        now.update(ms)
                if hooks is not None:
                    _restore_hooks(mods, hooks)
            try:
                _put_back(bufs, saved_bufs, layouts)
            finally:  # what follows is put back also when a buffer cannot be
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
                random.setstate(py_state)
                if np_mod is not None:
                    np_mod.random.set_state(np_state)
                for gen, st in torch_gens:
                    gen.set_state(st)
                for npg, nst in np_gens:
                    npg.bit_generator.state = nst


def _plain(ts: list[torch.Tensor]) -> bool:
    """Whether ``ts`` are plain strided tensors, which torch's list ops copy in
    one call (not views with the conjugate or negative bit set, which they refuse)."""
    return all(type(t) is torch.Tensor and t.layout == torch.strided and not t.is_conj() and not t.is_neg()
               for t in ts)


def _copies(bufs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of each buffer (same dtype, device and layout): plain tensors copied by
    one list op, where a clone each cost two dispatched ops (a ResNet's BatchNorm
    statistics, three buffers a layer, ~0.3 ms of a small model's check)."""
    with torch.no_grad():
        if not _plain(bufs):
            return [b.detach().clone() for b in bufs]
        out = [torch.empty_like(b) for b in bufs]
        if out:
            torch._foreach_copy_(out, bufs)
        return out


Layout = tuple[Any, int, Any, torch.Size, tuple[int, ...]]


def _layout(b: torch.Tensor) -> Layout:
    """Where a buffer's entries live: its storage (and that storage's address),
    offset, shape and strides."""
    st = b.untyped_storage()
    return st, st.data_ptr(), b.storage_offset(), b.shape, b.stride()


def _overlaps(b: torch.Tensor) -> bool:
    """Whether several of ``b``'s entries are one memory location (an
    expanded buffer, stride 0): it cannot be written entry by entry."""
    return any(st == 0 and n > 1 for st, n in zip(b.stride(), b.shape))


def _put_back(bufs: list[torch.Tensor], saved: list[torch.Tensor], layouts: list[Layout]) -> None:
    """The values of :func:`_copies` written back into the buffers, in place;
    a buffer the forward resized in place (torch.ao's observers resize their
    empty ``min_val``/``max_val`` on the first forward) or moved to other
    storage (``b.data = ...``) set back onto its own storage, offset, shape
    and strides first (a view of another buffer stays that view).  An
    expanded buffer (stride 0), which cannot be written entry by entry, is
    left alone where its values did not change, else written through a view
    that reads each of its memory locations once."""
    with torch.no_grad():
        for b, (st, ptr, off, shape, stride) in zip(bufs, layouts):
            if b.shape != shape or b.stride() != stride or b.storage_offset() != off or \
                    b.untyped_storage().data_ptr() != ptr:
                b.set_(st, off, shape, stride)
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for b, c in zip(bufs, saved):
            if not _overlaps(b):
                pairs.append((b, c))
            elif not torch.equal(b, c):  # each distinct location written once: through a view without repeats
                idx = tuple(slice(0, 1) if st == 0 else slice(None) for st in b.stride())
                b[idx].copy_(c[idx])
        if pairs and _plain([b for b, _ in pairs]):
            torch._foreach_copy_([b for b, _ in pairs], [c for _, c in pairs])
        else:
            for b, c in pairs:
                b.copy_(c)


_HOOKS = operator.attrgetter("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _restore_hooks(mods: list[nn.Module], hooks: dict[int, list[frozenset[int]]]) -> None:
    """The hooks registered on each module since ``hooks`` was taken (the
    handle ids each module's hook dicts held then, by ``id`` of the module,
    for those that had any) removed.  Hooks removed meanwhile stay removed:
    their owner removed them (the monitor's own, standing aside while it
    replays a step inside :func:`preserved`), and no handle would remove
    them again."""
    for m in mods:
        was = hooks.get(id(m)) if hooks else None
        if was is None:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                for d in _HOOKS(m):
                    d.clear()
            continue
        for d, keys in zip(_HOOKS(m), was):
            if len(d) > len(keys) or not keys.issuperset(d):
                for k in [k for k in d if k not in keys]:
                    del d[k]


def _restore_mapping(m: nn.Module, now: dict[str, Any], was: dict[str, Any]) -> None:
    """``m``'s ``_parameters`` or ``_buffers`` (``now``) holding exactly the
    objects of ``was`` again, put back through the module's own
    ``__setattr__`` where one differs: torch's RNNs (and their subclasses)
    keep a second list of their weights (``_flat_weights``) that their
    ``__setattr__`` updates, and a mapping written directly left an LSTM
    computing with the tensor the forward had set.  Compared in C (keys,
    then each object's identity): a deep net's thousands of layers cost a
    few ms."""
    if not isinstance(now, dict):  # a torch.jit.script'ed module's (a wrapper its compiled code reads): as it was
        return
    if now.keys() == was.keys() and all(map(operator.is_, now.values(), was.values())):
        return
    for k in [k for k in now if k not in was]:
        delattr(m, k)
    for k, v in was.items():
        if now.get(k, now) is not v:
            if k not in now:
                now[k] = v  # (an entry the forward deleted: back in its place's mapping)
            else:
                setattr(m, k, v)


# what nn.Module keeps for itself (parameters, buffers, children, hooks, flags): restored above or left alone
_OWN = frozenset(vars(nn.Module())) | {"training"}
# the containers a forward fills in place, by exact type: the collections' own subclasses (a history in a
# deque(maxlen=...), a defaultdict(int) of counts) refill as their bases do, keeping maxlen and the default
# factory; other subclasses are left alone (HF's ModelOutput, an OrderedDict, refuses update())
_CONTAINERS = frozenset({list, dict, set, collections.OrderedDict, collections.defaultdict, collections.Counter,
                         collections.deque})
# how deep containers held in containers are copied too (a dict of per-layer lists a forward appends to)
_NESTED = 3


# torch.nn's own classes (they live as long as torch): no Python state that a forward changes
_TORCH_CLASSES: set[type] = set()
# per other class, the names of its instances' own attributes that held a container and how many
# attributes the first instance seen had (an instance with another count -- a list set only under a flag
# of its __init__ -- is read again and its names added; held weakly: a class let go -- torch.fx makes one
# per traced module -- takes its entry with it)
_CONTAINER_NAMES: weakref.WeakKeyDictionary[type, tuple[tuple[str, ...], int]] = weakref.WeakKeyDictionary()


def _containers(m: nn.Module) -> list[tuple[Any, Any]] | None:
    """(container, shallow copy) of each container among ``m``'s own
    attributes (a cache a ``forward`` appends to) and of the containers held
    in those (a dict of lists), or None for a module of torch's own classes:
    the names looked up once per class."""
    typ = type(m)
    if typ in _TORCH_CLASSES:
        return None
    d = vars(m)
    known = _CONTAINER_NAMES.get(typ)
    if known is None or known[1] != len(d):  # a first instance, or one with other attributes than the first's
        if known is None and (typ.__module__ or "").startswith("torch.nn."):
            _TORCH_CLASSES.add(typ)
            return None
        found = tuple(k for k, v in d.items() if k not in _OWN and type(v) in _CONTAINERS)
        # (the names of every instance seen, under the first one's count of attributes)
        known = (tuple(dict.fromkeys(known[0] + found)), known[1]) if known is not None else (found, len(d))
        try:
            _CONTAINER_NAMES[typ] = known
        except TypeError:  # a class that cannot be weakly referenced: asked each time
            pass
    names = known[0]
    out: list[tuple[Any, Any]] = []
    for k in names:
        if type(v := d.get(k)) in _CONTAINERS:
            _copy_into(v, out, _NESTED)
    return out


def _copy_into(v: Any, out: list[tuple[Any, Any]], depth: int) -> None:
    """``(v, shallow copy of v)`` appended to ``out``, then the same for the
    containers ``v`` holds, ``depth`` levels down (a cycle ends there)."""
    out.append((v, copy.copy(v)))
    if depth:
        for x in (v.values() if isinstance(v, dict) else v):
            if type(x) in _CONTAINERS:
                _copy_into(x, out, depth - 1)


def _refill(v: Any, c: Any) -> None:
    """Container ``v`` holding what its copy ``c`` holds again, in place."""
    if isinstance(v, list):
        v[:] = c
    elif isinstance(v, collections.deque):
        v.clear()
        v.extend(c)
    else:
        v.clear()
        v.update(c)
