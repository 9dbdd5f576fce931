"""The hook oracle shared by the statistics and precision tests (not
collected: no ``test_`` prefix): every leaf module's output and the gradient
at it, taken by plain PyTorch hooks on the same pass ``check`` runs."""

from __future__ import annotations

import torch
from torch import nn


def leaf_outputs_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every leaf module's output and the gradient of the check's backward
    (the same seeded unit-variance cotangent) at it, by module name; copies,
    so that a later in-place operation cannot change them."""
    from signalprop.probe.inputs import cotangent

    outs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(m, i, o):
            outs[name] = o.detach().clone()
            o.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))
        return hook

    hs = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if not list(m.children())]
    try:
        y = model(x.detach().requires_grad_(True))
        y.backward(cotangent(y))
    finally:
        for h in hs:
            h.remove()
    model.zero_grad(set_to_none=True)
    return outs, grads
