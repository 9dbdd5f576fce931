"""All or nothing: a whole-model initializer that fails halfway leaves the model as it was."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import torch
from torch import nn

T = TypeVar("T")


_ACTIVE: set[int] = set()  # models already inside a transaction (apply_("critical") calls critical_)


@contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Snapshot every parameter and buffer (a shared tensor once); on any
    exception -- KeyboardInterrupt included -- copy them back, put back any
    that was replaced by another tensor, and re-raise.
    Nested on the same model (one initializer calling another), the outer
    snapshot is the one kept: no second copy of the weights."""
    if id(model) in _ACTIVE:
        yield
        return
    seen: set[int] = set()
    saved = []
    # (the dict that holds it, its name, the tensor): a write that replaces a tensor is undone too
    slots: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    for m in model.modules():
        for d in cast(tuple[dict[str, Any], ...], (m._parameters, m._buffers)):
            for name, t in d.items():
                if t is None:
                    continue
                slots.append((d, name, t))
                if id(t) not in seen:
                    seen.add(id(t))
                    saved.append((t, t.detach().clone()))
    _ACTIVE.add(id(model))
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for t, s in saved:
                t.copy_(s)
            for d, name, t in slots:  # (torch's orthogonal parametrisation assigns its buffer `base` anew)
                if d.get(name) is not t:
                    d[name] = t
        raise
    finally:
        _ACTIVE.discard(id(model))


def transactional(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a whole-model initializer ``fn(model, ...)`` under :func:`all_or_nothing`."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> T:
        if not isinstance(model, nn.Module):
            return fn(model, *args, **kwargs)  # fn raises its own clear TypeError
        with all_or_nothing(model):
            return fn(model, *args, **kwargs)

    return wrapper


def is_parametrized(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is computed by ``torch.nn.utils.parametrize``
    (``weight_norm``, ``spectral_norm``, orthogonal ...): writing into it in
    place would change a temporary, not the model."""
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(module, name)


@contextmanager
def writable(module: nn.Module, name: str = "weight") -> Iterator[torch.Tensor]:
    """The tensor to write ``module.<name>``'s new values into.  A plain
    parameter is itself; a parametrised one is a copy that is then assigned
    back, so the parametrisation's ``right_inverse`` sets its underlying
    parameters (weight_norm's g and v, spectral_norm's original)."""
    if not is_parametrized(module, name):
        yield getattr(module, name)
        return
    buf = getattr(module, name).detach().clone()
    yield buf
    try:
        # a right_inverse may draw from the global RNG (torch's orthogonal parametrisation completes a
        # non-square weight to a square one with Gaussian columns the weight never shows): the weight comes
        # from the initializer's draws alone, so those draws are not allowed to move the caller's RNG
        devices = [buf.device.index if buf.device.index is not None else torch.cuda.current_device()] \
            if buf.is_cuda else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            setattr(module, name, buf)
    except (NotImplementedError, RuntimeError) as e:  # torch raises RuntimeError for a missing right_inverse
        if isinstance(e, RuntimeError) and "right_inverse" not in str(e):
            raise
        raise ValueError(f"{type(module).__name__}.{name} is parametrised by a parametrisation without "
                         "right_inverse: its underlying parameters cannot be set from a weight; initialise them "
                         "directly") from e


def check_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """A generator draws on its own device: one for another device than the
    model's parameters cannot fill them."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator= takes a torch.Generator (torch.Generator().manual_seed({generator!r}) for a "
                        f"seed), got {type(generator).__name__}")
    devices = {p.device.type for p in model.parameters()}
    if devices and generator.device.type not in devices:
        raise ValueError(f"generator= is a {generator.device.type} generator but the model's parameters are on "
                         f"{', '.join(sorted(devices))}: create it there, e.g. torch.Generator(device='cuda')")
