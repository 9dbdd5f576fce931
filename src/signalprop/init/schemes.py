"""Variance scaling, the one primitive, and the named schemes built on it.

Shapes follow torch: a weight is ``(out, in, *kernel)`` and ``Linear``
computes ``x @ w.T`` with ``w.shape = [fan_out, fan_in]``.  Every function
works in place under ``torch.no_grad()``, keeps dtype and device, takes
``generator=`` and returns the tensor.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
from scipy import special, stats

from ..layers import tensor_fans
from ._checks import check_2d, check_choice, check_tensor, work_dtype
from .gains import calculate_gain

FanMode = Literal["fan_in", "fan_out", "fan_avg"]
Distribution = Literal["truncated_normal", "normal", "uniform", "orthogonal"]
_MODES = ("fan_in", "fan_out", "fan_avg")
_DISTS = ("truncated_normal", "normal", "uniform", "orthogonal")


@lru_cache(maxsize=32)
def truncation_std(bound: float) -> float:
    """Standard deviation of N(0, 1) truncated to (-bound, bound).

    bound = 2 gives 0.87962566103423978, the constant JAX and TensorFlow use.
    """
    return float(math.sqrt(stats.truncnorm.var(-bound, bound)))


def _fan(fan_in: int, fan_out: int, mode: str) -> float:
    return {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]


def _trunc_normal_fill(t: torch.Tensor, std: float, bound: float,
                       generator: torch.Generator | None) -> None:
    """Inverse-CDF sampling of N(0, s^2) truncated to (-bound s, bound s),
    s = std / truncation_std(bound), so the result has standard deviation std."""
    lo = float(special.ndtr(-bound))
    buf = torch.empty(t.shape, dtype=work_dtype(t), device=t.device)
    buf.uniform_(2 * lo - 1, 1 - 2 * lo, generator=generator)
    buf.erfinv_().mul_(math.sqrt(2.0) * std / truncation_std(bound)).clamp_(
        -bound * std / truncation_std(bound), bound * std / truncation_std(bound))
    t.copy_(buf)


def _fill(t: torch.Tensor, std: float, distribution: str, generator: torch.Generator | None) -> None:
    if distribution == "normal":
        t.normal_(0.0, std, generator=generator)
    elif distribution == "uniform":
        a = math.sqrt(3.0) * std  # U(-a, a) has variance a^2 / 3
        t.uniform_(-a, a, generator=generator)
    elif distribution == "truncated_normal":
        _trunc_normal_fill(t, std, 2.0, generator)
    else:
        from .orthogonal import _orthogonal_fill

        # A semi-orthogonal matrix has entries of variance 1 / max(rows, cols).
        rows, cols = t.shape[0], t.numel() // max(t.shape[0], 1)
        _orthogonal_fill(t, std * math.sqrt(max(rows, cols)), generator)


def variance_scaling_(tensor: torch.Tensor, scale: float = 1.0, mode: FanMode = "fan_in",
                      distribution: Distribution = "truncated_normal",
                      generator: torch.Generator | None = None,
                      fans: tuple[int, int] | None = None) -> torch.Tensor:
    """Fill ``t`` with zero-mean values of variance ``scale / fan``.

    fan is fan_in, fan_out or (fan_in + fan_out) / 2 by ``mode``, from
    ``fans`` if given (see :func:`signalprop.init.fans` for a module's real
    fans) and otherwise from the tensor by torch's layout rule.

    distribution:
      ``truncated_normal``: N(0, s^2) truncated to (-2s, 2s) with
      s = sqrt(scale / fan) / 0.87962566103423978, the standard deviation of a
      standard normal truncated to (-2, 2), so that the *result* has variance
      scale / fan.
      ``normal``: N(0, scale / fan).
      ``uniform``: U(-a, a), a = sqrt(3 scale / fan).
      ``orthogonal``: a (semi-)orthogonal matrix of the flattened
      ``(out, in * prod(kernel))`` shape, scaled to the same entry variance:
      g * Q with g^2 = scale * max(out, in*k) / fan.

    Glorot & Bengio (2010), He et al. (2015) and LeCun et al. (1998) are
    special cases; see :func:`xavier_normal_` and friends.
    """
    check_choice(mode, _MODES, "mode")
    check_choice(distribution, _DISTS, "distribution")
    if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if fans is not None and not (isinstance(fans, (tuple, list)) and len(fans) == 2 and all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 and math.isfinite(f) for f in fans)):
        raise ValueError(f"fans must be two positive numbers (fan_in, fan_out), got {fans!r}")
    if not check_tensor(tensor, "variance_scaling_"):
        return tensor
    if distribution == "orthogonal" and tensor.dim() < 2:
        raise ValueError(f"orthogonal distribution needs a tensor with >= 2 dims, got shape {tuple(tensor.shape)}")
    fi, fo = fans if fans is not None else tensor_fans(tensor)
    # sqrt(scale / fan) in torch's arithmetic, so the named schemes draw torch's values to the last bit
    # in float64 too: xavier's gain * sqrt(2 / (fan_in + fan_out)), kaiming's gain / sqrt(fan)
    # (sqrt(gain**2) == gain exactly in binary floating point)
    root = math.sqrt(scale)
    std = root * math.sqrt(2.0 / (fi + fo)) if mode == "fan_avg" else root / math.sqrt(_fan(fi, fo, mode))
    with torch.no_grad():
        _fill(tensor, std, distribution, generator)
    return tensor


def xavier_normal_(tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None, *,
                   fans: tuple[int, int] | None = None) -> torch.Tensor:
    """Glorot & Bengio (2010): N(0, gain^2 * 2 / (fan_in + fan_out)).

    Dive into Deep Learning's derivation: forward needs n_in sigma^2 = 1, backward
    n_out sigma^2 = 1; Xavier takes their average.
    (``variance_scaling_(scale=gain**2, mode="fan_avg", distribution="normal")``.)
    Fans from the tensor by torch's rule, or ``fans=signalprop.init.fans(module)``
    for the module's real wiring (grouped, strided, transposed convolutions, RNN
    gates -- torch's rule is 2-3x off there).
    """
    check_2d(tensor, "xavier_normal_")
    return variance_scaling_(tensor, gain**2, "fan_avg", "normal", generator, fans)


def xavier_uniform_(tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None, *,
                    fans: tuple[int, int] | None = None) -> torch.Tensor:
    """Glorot & Bengio (2010): U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)).
    (``variance_scaling_(scale=gain**2, mode="fan_avg", distribution="uniform")``.)
    ``fans=`` as in :func:`xavier_normal_`."""
    check_2d(tensor, "xavier_uniform_")
    return variance_scaling_(tensor, gain**2, "fan_avg", "uniform", generator, fans)


def kaiming_normal_(tensor: torch.Tensor, a: float = 0.0, mode: FanMode = "fan_in",
                    nonlinearity: str = "leaky_relu", generator: torch.Generator | None = None, *,
                    fans: tuple[int, int] | None = None) -> torch.Tensor:
    """He et al. (2015): N(0, gain^2 / fan), gain = calculate_gain(nonlinearity, a).
    Same signature and values as :func:`torch.nn.init.kaiming_normal_` (fans from
    the tensor by torch's rule); ``fans=signalprop.init.fans(module)`` uses the
    module's real wiring instead (grouped, strided, transposed convolutions, RNN
    gates: see :mod:`signalprop.init.fans`)."""
    g = calculate_gain(nonlinearity, a)
    check_2d(tensor, "kaiming_normal_")
    return variance_scaling_(tensor, g**2, mode, "normal", generator, fans)


def kaiming_uniform_(tensor: torch.Tensor, a: float = 0.0, mode: FanMode = "fan_in",
                     nonlinearity: str = "leaky_relu", generator: torch.Generator | None = None, *,
                     fans: tuple[int, int] | None = None) -> torch.Tensor:
    """He et al. (2015): U(-b, b), b = gain * sqrt(3 / fan).
    Same signature and values as :func:`torch.nn.init.kaiming_uniform_`;
    ``fans=`` as in :func:`kaiming_normal_`."""
    g = calculate_gain(nonlinearity, a)
    check_2d(tensor, "kaiming_uniform_")
    return variance_scaling_(tensor, g**2, mode, "uniform", generator, fans)


def lecun_normal_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """LeCun et al. (1998): variance 1 / fan_in, truncated normal (as in JAX and
    Klambauer et al. 2017 for SELU)."""
    return variance_scaling_(tensor, 1.0, "fan_in", "truncated_normal", generator)


def lecun_uniform_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """LeCun et al. (1998): U(-a, a), a = sqrt(3 / fan_in)."""
    return variance_scaling_(tensor, 1.0, "fan_in", "uniform", generator)


def scaled_trunc_normal_(tensor: torch.Tensor, std: float = 1.0, bound: float = 2.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-mean truncated normal whose *result* has standard deviation ``std``
    (the convention of JAX's and TensorFlow's variance scaling).

    Draws N(0, s^2) truncated to (-bound s, bound s) with
    s = std / sd(N(0,1) | |z| < bound).  :func:`trunc_normal_` is torch's
    instead: its ``std`` is that of the normal before truncation (the
    result's is 0.88 std for bounds at 2 std) and its bounds are absolute.
    """
    if not (isinstance(std, (int, float)) and isinstance(bound, (int, float)) and std > 0 and bound > 0
            and math.isfinite(std) and math.isfinite(bound)):
        raise ValueError(f"std and bound must be positive finite numbers, got std={std!r}, bound={bound!r}")
    if bound < 1e-3:
        raise ValueError(f"bound={bound!r} (in units of the normal's std) leaves an interval too narrow to sample: "
                         "use bound >= 1e-3 (2 is the usual value)")
    if not check_tensor(tensor, "scaled_trunc_normal_"):
        return tensor
    with torch.no_grad():
        _trunc_normal_fill(tensor, float(std), float(bound), generator)
    return tensor
