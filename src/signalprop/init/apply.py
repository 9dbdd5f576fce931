"""``apply_``: one scheme over a whole model, with each layer's real fans."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..layers import CONV, ParamSpec, param_specs
from ..records import InitSummary, ParamInit
from ._transaction import check_generator, is_parametrized, transactional, writable
from .defaults import torch_default_
from .gains import gain as _gain
from .orthogonal import delta_orthogonal_
from .schemes import variance_scaling_


@dataclass(frozen=True)
class _Scheme:
    mode: str
    distribution: str
    default_gain: float  # used when no activation is given
    uses_activation: bool = True


# Every named scheme is variance scaling with a fixed mode and distribution.
SCHEMES: dict[str, _Scheme] = {
    "xavier_normal": _Scheme("fan_avg", "normal", 1.0),
    "xavier_uniform": _Scheme("fan_avg", "uniform", 1.0),
    "kaiming_normal": _Scheme("fan_in", "normal", math.sqrt(2.0)),
    "kaiming_uniform": _Scheme("fan_in", "uniform", math.sqrt(2.0)),
    "lecun_normal": _Scheme("fan_in", "truncated_normal", 1.0, uses_activation=False),
    "lecun_uniform": _Scheme("fan_in", "uniform", 1.0, uses_activation=False),
    "orthogonal": _Scheme("fan_in", "orthogonal", 1.0),
    "delta_orthogonal": _Scheme("fan_in", "orthogonal", 1.0),
}
_SPECIAL = ("normal", "normal(STD)", "torch_default", "critical")
_NORMAL_RE = re.compile(r"^normal(?:\(([0-9.eE+-]+)\))?$")


def scheme_names() -> list[str]:
    return sorted(SCHEMES) + list(_SPECIAL)


def _parse(scheme: str) -> tuple[str, float | None]:
    m = _NORMAL_RE.match(scheme)
    if m:
        std = float(m.group(1)) if m.group(1) else 1.0
        if not 0 < std < math.inf:
            raise ValueError(f"{scheme!r}: the standard deviation must be a positive finite number, got {std}")
        return "normal", std
    if scheme in SCHEMES or scheme in ("torch_default", "critical"):
        return scheme, None
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {scheme_names()}")


def _plan_param(full: str, spec: ParamSpec, scheme: str, std_naive: float | None, g: float,
                owner: nn.Module) -> tuple[Callable[[torch.Generator | None], object], list[ParamInit]]:
    """What to do with one parameter; raises before anything is written.  A
    parametrised weight (weight_norm, spectral_norm) is drawn into a copy and
    assigned back through its parametrisation."""
    if not is_parametrized(owner, spec.name):
        return _plan_plain(full, spec, scheme, std_naive, g, owner)
    _, recs = _plan_plain(full, replace(spec, tensor=getattr(owner, spec.name).detach().clone()), scheme,
                          std_naive, g, owner)

    def through(gen: torch.Generator | None) -> None:
        with writable(owner, spec.name) as buf:
            _plan_plain(full, replace(spec, tensor=buf), scheme, std_naive, g, owner)[0](gen)

    return through, [replace(r, note=(r.note + "; " if r.note else "") + "set through its parametrisation")
                     for r in recs]


def _plan_plain(full: str, spec: ParamSpec, scheme: str, std_naive: float | None, g: float,
                owner: nn.Module) -> tuple[Callable[[torch.Generator | None], object], list[ParamInit]]:
    t = spec.tensor
    if spec.role in ("bias", "norm_bias"):
        return (lambda gen: t.zero_()), [ParamInit(full, tuple(t.shape), None, None, 0.0, "zeros")]
    if spec.role == "norm_weight":
        return (lambda gen: t.fill_(1.0)), [ParamInit(full, tuple(t.shape), None, None, 0.0, "ones")]
    fans = (spec.fan_in, spec.fan_out)
    blocks = t.chunk(spec.blocks, 0) if spec.blocks > 1 else (t,)
    note = f"{spec.blocks} blocks" if spec.blocks > 1 else ""
    if spec.role == "embedding":
        g = 1.0  # no activation acts on an embedding lookup directly
    if scheme == "normal":
        std = float(std_naive or 1.0)
        return ((lambda gen: t.normal_(0.0, std, generator=gen)),
                [ParamInit(full, tuple(t.shape), *fans, float(std_naive or 0.0), "normal")])
    s = SCHEMES[scheme]
    fan = {"fan_in": fans[0], "fan_out": fans[1], "fan_avg": (fans[0] + fans[1]) / 2}[s.mode]
    std = g / math.sqrt(fan)
    if scheme == "delta_orthogonal" and t.dim() >= 3 and isinstance(owner, CONV):
        if t.shape[1] > t.shape[0]:
            raise ValueError(f"{full}: delta_orthogonal needs out_channels >= in_channels, got shape "
                             f"{tuple(t.shape)}; use 'orthogonal' for this model")
        # Centre tap Q (orthonormal columns) scaled so per-unit second moments keep g^2.
        dg = g * math.sqrt(t.shape[0] / t.shape[1])
        return ((lambda gen: delta_orthogonal_(t, dg, gen)),
                [ParamInit(full, tuple(t.shape), *fans, std, "delta_orthogonal", note)])
    dist = s.distribution
    if dist == "orthogonal" and t.dim() < 2:
        dist = "normal"

    def run(gen: torch.Generator | None) -> None:
        for b in blocks:
            variance_scaling_(b, g * g, s.mode, dist, gen, fans)  # type: ignore[arg-type]

    return run, [ParamInit(full, tuple(t.shape), *fans, std, dist, note)]


@transactional
def apply_(model: nn.Module, scheme: str, *, activation: Any = None,
           generator: torch.Generator | None = None, residual: str | None = None) -> InitSummary:
    """Initialize every parameter of ``model`` with ``scheme`` and per-layer fans.

    Schemes: ``xavier_normal``, ``xavier_uniform``, ``kaiming_normal``,
    ``kaiming_uniform``, ``lecun_normal``, ``lecun_uniform``, ``orthogonal``,
    ``delta_orthogonal`` (convolutions; other layers orthogonal), ``normal``
    or ``normal(STD)`` (the naive N(0, STD^2) of Dive into Deep Learning's example, STD = 1 by default),
    ``torch_default`` and ``critical`` (see :func:`critical_`).

    Gains: with ``activation`` given, :func:`gain` of it (exact
    second-moment preservation); otherwise 1 for Xavier and orthogonal, and
    sqrt(2) for Kaiming (torch's default, ReLU).  LeCun schemes have gain 1.
    Weights of Linear, Bilinear, ConvNd, ConvTransposeNd, Embedding, RNN/LSTM/GRU
    (per gate) and MultiheadAttention (per q/k/v block) are drawn; biases are
    zero; norm layers get weight 1 and bias 0.  Parameters of other modules
    are left untouched and listed in ``summary.skipped``.  Everything is
    validated before the first write, so a bad argument changes nothing.

    ``residual``: ``"fixup"`` or ``"skipinit"`` rescales the residual branches
    afterwards (see :func:`signalprop.init.scale_residual_`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_ takes an nn.Module, got {type(model).__name__}")
    if not isinstance(scheme, str):
        raise ValueError(f"scheme must be a string, one of {scheme_names()}; got {scheme!r}")
    name, std_naive = _parse(scheme)
    check_generator(model, generator)
    if residual is not None:
        from .residual import _MODES, residual_branches

        if residual not in _MODES:
            raise ValueError(f"residual must be one of {_MODES} or None, got {residual!r}")
        if not residual_branches(model):
            raise ValueError("residual=... given but no residual branches found: mark them with "
                             "signalprop.init.mark_residual(module) or name the submodule 'branch'")
    if name == "critical":
        from .critical import critical_

        return critical_(model, activation=activation, generator=generator, residual=residual)
    if name == "torch_default":
        skipped = torch_default_(model, generator)
        return _with_residual(InitSummary("torch_default", skipped=tuple(skipped)), model, residual)
    sch = SCHEMES.get(name)
    if sch is None:  # "normal": its std is the scheme's own
        g = 1.0
    elif activation is not None and sch.uses_activation:
        g = _gain(activation)
    else:
        g = sch.default_gain
    owners = {f"{mn}." if mn else "": m for mn, m in model.named_modules()}
    specs, skipped = param_specs(model)
    plan: list[Callable[[torch.Generator | None], object]] = []
    records: list[ParamInit] = []
    first: dict[int, str] = {}
    notes = []
    for full, spec in specs:
        owner = owners.get(full[: len(full) - len(spec.name)], model)
        # a parametrised tensor is computed anew at each read: known by its owner and name (weight and bias
        # both parametrised are two tensors, not one tied)
        key: Any = id(spec.tensor) if not is_parametrized(owner, spec.name) else (id(owner), spec.name)
        if key in first:  # a tied tensor (GPT-2's lm_head and wte): drawn once, by its first user
            notes.append(f"{full} is the same tensor as {first[key]} (tied): initialised once, as {first[key]}")
            continue
        first[key] = full
        run, recs = _plan_param(full, spec, name, std_naive, g, owner)
        pad = getattr(owner, "padding_idx", None) if spec.name == "weight" and \
            isinstance(owner, (nn.Embedding, nn.EmbeddingBag)) else None
        if pad is not None:  # torch's own init zeroes the padding row, which the padding token then reads
            run = _keeping_row_zero(run, owner, pad)
            notes.append(f"{full}: row {pad} (padding_idx) kept at zero, as torch's own init leaves it")
        plan.append(run)
        records += recs
    with torch.no_grad():
        for run in plan:
            run(generator)
    if activation is not None and name in SCHEMES and SCHEMES[name].uses_activation:
        notes.append(f"gain {g:.6g} = signalprop.init.gain({activation!r})")
    return _with_residual(InitSummary(scheme, tuple(records), tuple(skipped), notes=tuple(notes)), model, residual)


def _keeping_row_zero(run: Callable[[torch.Generator | None], object], owner: nn.Module, row: int
                      ) -> Callable[[torch.Generator | None], object]:
    """``run``, then row ``row`` of ``owner``'s weight set to zero (an embedding's padding row)."""
    def wrapped(gen: torch.Generator | None) -> None:
        run(gen)
        with writable(owner, "weight") as w:
            w[row].zero_()

    return wrapped


def _with_residual(summary: InitSummary, model: nn.Module, residual: str | None) -> InitSummary:
    if residual is None:
        return summary
    from dataclasses import replace

    from .residual import scale_residual_

    return replace(summary, notes=summary.notes + tuple(scale_residual_(model, residual)))  # type: ignore[arg-type]
