"""``critical_``: orthogonal weights at the edge of chaos, scales from theory."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from .. import activations as _act
from ..layers import CONV_TRANSPOSE, computed_weight, fans, left_as_they_were, settable
from ..records import InitSummary, LayerInit, ParamInit
from ..theory.critical import CriticalPoint, critical_point
from ._transaction import check_generator, is_parametrized, transactional, writable
from .detect import WeightLayer, weight_layers
from .orthogonal import _orthogonal_fill


def _centered_orthogonal(rows: int, cols: int, centered: bool, dtype: torch.dtype, device: torch.device,
                         generator: torch.Generator | None) -> torch.Tensor:
    """A (rows x cols) semi-orthogonal Q, times P = I - 11^T/cols when centered:
    orthogonal on the complement of the all-ones input direction, which it
    maps to zero (W 1 = 0)."""
    q = torch.empty(rows, cols, dtype=torch.float64, device=device)
    _orthogonal_fill(q, 1.0, generator)
    if centered and cols > 1:
        q = q - q.mean(dim=1, keepdim=True)  # Q P
    return q.to(dtype)


def _draw(layer: WeightLayer, sigma_w2: float, sigma_b2: float, mean: float | None,
          generator: torch.Generator | None) -> str:
    """Write weights of entry variance sigma_w2 / fan_in, orthogonal (delta-
    orthogonal for convolutions that do not shrink channels); biases N(0, sigma_b2).

    ``mean``: the input activation's Gaussian mean mu, to be removed.  With a
    bias, the weights stay fully orthogonal and the bias absorbs it
    (b -= mu W 1), so W (phi(h) - mu 1) is what the layer computes and the
    Jacobian keeps every direction; without a bias the weights annihilate
    the all-ones direction instead (orthogonal on its complement).
    """
    with writable(layer.module, "weight") as w:  # through a parametrisation (weight_norm ...) when there is one
        return _draw_into(layer, w, sigma_w2, sigma_b2, mean, generator)


def _draw_into(layer: WeightLayer, w: torch.Tensor, sigma_w2: float, sigma_b2: float, mean: float | None,
               generator: torch.Generator | None) -> str:
    m = layer.module
    # a bias computed by a parametrisation that cannot be inverted is left as it was (and listed as skipped)
    has_bias = getattr(m, "bias", None) is not None and settable(m, "bias")
    out_ch, in_ch = w.shape[0], w.shape[1]
    fan_in = fans(m)[0]  # the module's real wiring (ConvTranspose: input channels per group x taps / stride)
    transposed = isinstance(m, CONV_TRANSPOSE)
    # a strided ConvTranspose's output entries sum different taps by position (their phase): a bias, one number
    # a channel, cannot remove a mean that alternates with the phase, so the weights annihilate it, per phase
    phased = transposed and mean is not None and (not has_bias or math.prod(getattr(m, "stride", (1,))) > 1)
    centered = mean is not None and not has_bias or phased
    with torch.no_grad():
        if w.dim() > 2 and not transposed and out_ch >= in_ch and getattr(m, "groups", 1) == 1:
            # Xiao et al. (2018): orthogonal centre tap; per-unit second moment scales by g^2 in/out
            tap = _centered_orthogonal(out_ch, in_ch, centered, w.dtype, w.device, generator)
            g = math.sqrt(sigma_w2 * out_ch / in_ch)
            w.zero_()
            centre = tuple((k - 1) // 2 for k in w.shape[2:])
            w[(slice(None), slice(None)) + centre] = g * tap
            kind = "delta_orthogonal"
        else:
            rows, cols = w.shape[0], w[0].numel()
            q = _centered_orthogonal(rows, cols, centered and not transposed, w.dtype, w.device, generator)
            # semi-orthogonal entries have mean square 1/max(rows, cols)
            g = math.sqrt(sigma_w2 / fan_in * max(rows, cols))
            w.copy_((g * q).reshape(w.shape))
            kind = "orthogonal"
            if phased:
                # weight (in, out / groups, *k): an output entry sums, over its group's input channels, the
                # taps of its phase; with every column centred over those channels each phase's sum is 0
                groups = getattr(m, "groups", 1)
                per = w.view(groups, w.shape[0] // groups, -1)
                per.sub_(per.mean(dim=1, keepdim=True))
    if has_bias:
        with torch.no_grad(), writable(m, "bias") as b:  # through its parametrisation when there is one
            if sigma_b2 > 0:
                b.normal_(0.0, math.sqrt(sigma_b2), generator=generator)
            else:
                b.zero_()
            if mean is not None and not phased:
                if transposed:  # weight (in, out / groups, *k): output channel g * (out / groups) + j
                    groups = getattr(m, "groups", 1)
                    per_group = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
                    b.sub_(mean * per_group.sum(dim=(1,) + tuple(range(3, per_group.dim()))).reshape(-1))
                else:
                    b.sub_(mean * w.sum(dim=tuple(range(1, w.dim()))))
                kind += " (mean removed through the bias)"
    return kind + (" (mean-annihilating)" if centered else "")


@transactional
def critical_(model: nn.Module, inputs: Any = None, *, activation: Any = None,
              generator: torch.Generator | None = None, isometry: float = 0.25,
              q_star: float | None = None, residual: str | None = None) -> InitSummary:
    """Initialize every Linear/Conv layer at the edge of chaos, with orthogonal weights.

    For each weight layer the activation that follows it is detected (see
    :func:`signalprop.init.detect.weight_layers`: an example forward pass with
    ``inputs`` captures modules and functional calls), or taken from
    ``activation`` (one for all, or ``{module_name: act}``).  Theory
    (:func:`signalprop.theory.critical_point`) picks q* -- small enough that
    the Jacobian's squared singular values spread by at most ``isometry`` at
    this depth -- and the (sigma_w2, sigma_b2) on the critical line chi1 = 1.

    * A layer fed by an activation gets that activation's critical point;
      when the activation has a non-zero Gaussian mean mu (sigmoid, softplus,
      GELU, ReLU family) the layer's bias removes it (b -= mu W 1) while the
      weights stay fully orthogonal, so the layer computes W (phi(h) - mu) + b
      -- a sigmoid stack becomes a scaled tanh stack (see
      :mod:`signalprop.theory.critical`).  Layers without a bias annihilate
      the all-ones direction instead.
    * The first layer (fed by the data) brings pre-activations straight to
      q*: sigma_w2 = (q* - sigma_b2) / E[x^2], with E[x^2] measured on
      ``inputs`` (assumed 1 without them) -- the transient from the input's
      scale to q* would otherwise cost gradient.
    * A layer whose input comes from an unrecognised module (a norm, an
      attention block) is treated like a first layer, using its measured
      input second moment.

    ``residual``: ``"fixup"`` or ``"skipinit"`` then rescales residual
    branches (see :func:`signalprop.init.scale_residual_`).

    Convolutions that do not shrink channels get delta-orthogonal kernels
    (Xiao et al. 2018).  Other parametrised modules are left untouched and
    listed.  Returns an :class:`InitSummary` with, per layer, the activation
    detected and (sigma_w2, sigma_b2, q*, chi1).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"critical_ takes an nn.Module, got {type(model).__name__}")
    if isinstance(isometry, bool) or not isinstance(isometry, (int, float)) or not 0 < isometry < math.inf:
        raise ValueError(f"isometry must be a positive number (the tolerated spread of the Jacobian's squared "
                         f"singular values, e.g. 0.25), got {isometry!r}")
    if q_star is not None and (isinstance(q_star, bool) or not isinstance(q_star, (int, float))
                               or not 0 < q_star < math.inf):
        raise ValueError(f"q_star must be a positive number or None, got {q_star!r}")
    check_generator(model, generator)
    layers, notes = weight_layers(model, inputs, activation)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layers to initialize")
    depth = len(layers)
    cache: dict[str, CriticalPoint] = {}

    def cp(a: _act.Activation) -> CriticalPoint:
        if a.name not in cache:
            cache[a.name] = critical_point(a, depth=depth, isometry=isometry, q_star=q_star)
        return cache[a.name]

    plan: list[tuple[WeightLayer, float, float, float | None, CriticalPoint | None, str]] = []
    for layer in layers:
        out_cp = cp(layer.out_act) if layer.out_act is not None else None
        if layer.in_act is not None:  # fed by an activation: its critical point
            c = cp(layer.in_act)
            mean = c.mean if c.centered else None
            plan.append((layer, c.sigma_w2, c.sigma_b2, mean, c, "critical line of the input activation"))
        else:  # fed by data or an unknown module: land on the next activation's q*
            m2 = layer.input_second_moment if layer.input_second_moment else 1.0
            target = out_cp.q_star if out_cp is not None else m2
            sb2 = out_cp.sigma_b2 if out_cp is not None else 0.0
            sw2 = max(target - sb2, 1e-12) / m2
            plan.append((layer, sw2, sb2, None, out_cp, f"brings E[h^2] from {m2:.3g} to q* = {target:.3g}"))
    names_of: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    records, layer_recs = [], []
    drawn_ids: dict[int, str] = {}
    drawn_biases: set[int] = set()  # drawn with their layer's weight
    left: list[str] = []  # parameters of planned layers that were not drawn after all
    for layer, sw2, sb2, mean, point, why in plan:
        bias = getattr(layer.module, "bias", None)
        if computed_weight(layer.module):  # a write would not reach it: the parameters it is made from are skipped
            left += [f"{layer.name}.{n}" for n, p in layer.module.named_parameters(recurse=False)]
            continue
        wid = id(layer.module.weight) if not is_parametrized(layer.module) else id(layer.module)
        if wid in drawn_ids:  # two layers share one weight: drawn once, by the first
            notes.append(f"{layer.name}.weight is tied to {drawn_ids[wid]}: initialised once, as {drawn_ids[wid]}")
            if bias is not None and id(bias) not in drawn_biases:
                left.append(f"{layer.name}.bias")  # its own bias, beside the tied weight: left as it was
            continue
        drawn_ids[wid] = f"{layer.name}.weight"
        if bias is not None:
            drawn_biases.add(id(bias))
        others = [n for n in names_of.get(id(layer.module.weight), []) if n != f"{layer.name}.weight"]
        if others:
            notes.append(f"{layer.name}.weight is tied to {', '.join(others)}: drawing it sets those too")
        kind = _draw(layer, sw2, sb2, mean, generator)
        w = cast(torch.Tensor, layer.module.weight)
        fan_in, fan_out = fans(layer.module)
        records.append(ParamInit(f"{layer.name}.weight", tuple(w.shape), fan_in, fan_out, math.sqrt(sw2 / fan_in), kind))
        act_name = layer.out_act.name if layer.out_act is not None else "linear (none detected)"
        chi = point.chi1 if (point is not None and layer.in_act is not None) else None
        layer_recs.append(LayerInit(layer.name, type(layer.module).__name__, act_name, sw2, sb2,
                                    point.q_star if point is not None else None, chi, None, why))
    for name, c in cache.items():
        if c.centered:
            notes.append(f"{name}: E[phi] != 0 at q*; layers after it remove the mean through their bias "
                         "(b -= mu W 1; without a bias, weights annihilate the all-ones direction); "
                         "theory uses Var[phi]")
        if c.note:
            notes.append(c.note)
    skipped = list(dict.fromkeys(left_as_they_were(model, [(layer.name, layer.module) for layer in layers]) + left))
    if residual is not None:
        from .residual import scale_residual_

        notes += scale_residual_(model, residual)  # type: ignore[arg-type]
    return InitSummary("critical", tuple(records), tuple(skipped), tuple(layer_recs), tuple(notes))
