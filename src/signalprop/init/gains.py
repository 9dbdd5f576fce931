"""Gains: torch's table, and the exact second-moment-preserving gain of any activation."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from .. import activations as _act
from ..theory.maps import _deriv_second_moment, _second_moment

GainMode = Literal["forward", "backward"]
_MODES = ("forward", "backward")


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """Torch's recommended gains, same values and errors (a drop-in for
    :func:`torch.nn.init.calculate_gain`): linear/conv/sigmoid 1, tanh 5/3,
    relu sqrt(2), leaky_relu sqrt(2 / (1 + slope^2)), selu 3/4.

    These are heuristics: tanh's 5/3 and sigmoid's 1 are not what preserves
    the signal's second moment (see :func:`gain`).
    """
    return float(torch.nn.init.calculate_gain(nonlinearity, param))  # type: ignore[arg-type]


def gain(activation: Any, mode: GainMode = "forward") -> float:
    """The gain g such that weights of variance g^2 / fan preserve the second
    moment through ``activation`` for standard normal pre-activations.

    ``forward``: g = 1 / sqrt(E[phi(z)^2]) keeps E[h^2] layer to layer (the
    n_in gamma^2 = 1 of Dive into Deep Learning's derivation with the activation's second moment included).
    ``backward``: g = 1 / sqrt(E[phi'(z)^2]) keeps the gradient's second
    moment (n_out gamma^2 = 1 through phi').  z ~ N(0, 1).

    ``activation`` is a registry name, a ``torch.nn`` module such as
    ``nn.GELU()`` or ``nn.LeakyReLU(0.2)``, or any callable.  Expectations use
    closed forms where known (ReLU: sqrt(2) both ways) and otherwise
    kink-aware quadrature, accurate to ~1e-12.

    Differences from :func:`calculate_gain` (torch's table):
    tanh 1.5925 forward vs 5/3 (torch's value was chosen to land in the
    non-linear regime, not to preserve E[h^2]); sigmoid 1.8462 vs 1 (torch
    ignores sigmoid's mean of 1/2, which carries a quarter of its second
    moment); SELU 1.0 vs 3/4 (SELU is self-normalizing at unit variance).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    a = _act.resolve(activation)
    one = np.float64(1.0)
    m = float(_second_moment(a, one) if mode == "forward" else _deriv_second_moment(a, one))
    if not math.isfinite(m) or m <= 0:
        raise ValueError(f"activation {a.name!r} has E[{'phi' if mode == 'forward' else 'phi_prime'}(z)^2]"
                         f" = {m}: no finite gain preserves the signal")
    return 1.0 / math.sqrt(m)
