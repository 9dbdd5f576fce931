"""Residual branches: mark them, and scale them so the stream's variance grows as designed.

Convention: a *branch* is the module f in ``x + f(x)``.  signalprop finds
branches (1) marked with :func:`mark_residual`, (2) the ``branch`` of a
:class:`ScaledResidual`, or (3) any submodule whose own name is ``branch``
or ``residual``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..layers import WEIGHT_LAYERS

ResidualMode = Literal["fixup", "skipinit"]
_MODES = ("fixup", "skipinit")


def mark_residual(module: nn.Module) -> nn.Module:
    """Mark ``module`` as a residual branch; returns it (usable inline)."""
    module.signalprop_residual = True  # type: ignore[assignment]
    return module


class ScaledResidual(nn.Module):
    """``x + alpha * branch(x)`` with a learnable scalar alpha (SkipInit, De & Smith 2020)."""

    def __init__(self, branch: nn.Module, alpha: float = 1.0) -> None:
        super().__init__()
        self.branch = mark_residual(branch)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.branch(x)


def residual_branches(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """(name, branch, its ScaledResidual parent or None), outermost first; a
    branch nested inside another counts once (the outer one)."""
    out: list[tuple[str, nn.Module, nn.Module | None]] = []
    parents = {id(m.branch): m for m in model.modules() if isinstance(m, ScaledResidual)}
    for name, m in model.named_modules():
        if m is model:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if getattr(m, "signalprop_residual", False) or leaf in ("branch", "residual"):
            if any(name.startswith(f"{n}.") for n, _, _ in out):
                continue
            out.append((name, m, parents.get(id(m))))
    return out


def scale_residual_(model: nn.Module, mode: ResidualMode = "fixup") -> list[str]:
    """Rescale every residual branch of an already initialized model.

    ``fixup`` (Zhang et al. 2019): in each of the L branches with m weight
    layers, the last weight layer is zero and the others are multiplied by
    L^(-1/(2m-2)), so the residual stream's variance stays O(1) however deep.
    ``skipinit`` (De & Smith 2020): each branch's alpha starts at 0; a branch
    without an alpha (not a :class:`ScaledResidual`) gets its last weight
    layer zeroed instead, which matches SkipInit at initialization.
    Returns notes on what was done.
    """
    if mode not in _MODES:
        raise ValueError(f"residual mode must be one of {_MODES}, got {mode!r}")
    branches = residual_branches(model)
    if not branches:
        raise ValueError("no residual branches found: mark them with signalprop.init.mark_residual(module), "
                         "wrap them in ScaledResidual, or name the submodule 'branch'")
    L = len(branches)
    notes = []
    m_counts: set[int] = set()
    with torch.no_grad():
        for name, br, parent in branches:
            ws = [m for m in br.modules() if isinstance(m, WEIGHT_LAYERS)]
            m_counts.add(len(ws))
            if mode == "skipinit" and parent is not None:
                parent.alpha.zero_()  # type: ignore[operator]
                continue
            if not ws:
                notes.append(f"{name}: no weight layer to scale")
                continue
            last = ws[-1]
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()
            if mode == "fixup" and len(ws) > 1:
                f = L ** (-1.0 / (2 * len(ws) - 2))
                for m in ws[:-1]:
                    m.weight.mul_(f)
    notes.insert(0, f"{mode}: {L} residual branches" + (
        f", inner weights x L^(-1/(2m-2)) with m in {sorted(m_counts)}, last layer zero" if mode == "fixup" else ""))
    return notes


__all__ = ["ScaledResidual", "mark_residual", "residual_branches", "scale_residual_"]
