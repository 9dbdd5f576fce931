"""Which activation follows (and precedes) each weight layer.

From an example forward pass when inputs are given -- modules *and*
functional calls (``F.gelu``, ``torch.tanh``) in execution order -- and
otherwise from the order of registration (right for ``nn.Sequential``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import activations as _act
from ..layers import PASS_THROUGH, WEIGHT_LAYERS

NEUTRAL = PASS_THROUGH  # the name this module has always used


@dataclass
class WeightLayer:
    name: str
    module: nn.Module
    out_act: _act.Activation | None  # the activation applied to its output (None: none/unknown)
    in_act: _act.Activation | None  # the activation that produced its input
    input_second_moment: float | None = None


_RESOLVED: dict[tuple[type, str], _act.Activation | None] = {}


def _unknown_activation(m: nn.Module | None) -> _act.Activation | None:
    """A parameter-free leaf module the activation table does not name
    (``nn.Hardswish``, ``nn.ReLU6``, HF's ``GELUActivation``...): the exact
    function it computes when it is deterministic and elementwise (theory
    then works from the function itself), else None."""
    if m is None or isinstance(m, WEIGHT_LAYERS + NEUTRAL) or any(True for _ in m.parameters()) \
            or any(True for n, _ in m.named_children() if n != "parametrizations"):
        return None
    key = (type(m), m.extra_repr())
    if key not in _RESOLVED:
        try:
            _RESOLVED[key] = _act.resolve(m)
        except (ValueError, TypeError, RuntimeError):
            _RESOLVED[key] = None
    return _RESOLVED[key]


def looks_like_activation(m: nn.Module | None) -> bool:
    """Whether an unrecognised module is probably an activation (its class
    lives in torch's activation module or is named like one)."""
    if m is None:
        return False
    cls = type(m)
    return cls.__module__.endswith("activation") or cls.__module__.endswith("activations") or \
        cls.__name__.endswith(("Activation", "LU", "Swish", "Tanh", "Sigmoid", "Mish", "Shrink"))


_Step = tuple[str, nn.Module | None, _act.Activation | None, float | None]  # name, module, activation, input E[x^2]


def _sequence_from_pass(model: nn.Module, inputs: Any) -> list[_Step]:
    from ..probe.inputs import call_model
    from ..probe.recorder import Recorder
    from ..probe.state import preserved

    rec = Recorder(model, stats=False, track_inputs=True)
    with preserved(model), torch.no_grad():
        rec.attach()
        try:
            mode = rec.functional_mode()
            with mode if mode is not None else contextlib.nullcontext():
                call_model(model, inputs)
        finally:
            rec.detach()
    return [(r.name, r.module, r.act if r.act is not None else _unknown_activation(r.module), r.input_second_moment)
            for r in rec.rows]


def _sequence_from_registration(model: nn.Module) -> list[_Step]:
    from ..probe.recorder import leaf_modules

    leaves = set(map(id, leaf_modules(model)))
    out: list[_Step] = []
    for name, m in model.named_modules():
        if id(m) not in leaves:
            continue
        known = _act.from_module(m)
        out.append((name, m, known if known is not None else _unknown_activation(m), None))
    return out


def weight_layers(model: nn.Module, inputs: Any = None,
                  activation: Any = None) -> tuple[list[WeightLayer], list[str]]:
    """The weight layers in execution order with their activations, and notes.

    ``activation``: one activation for every layer, or a mapping from module
    name to activation, overriding what is detected.
    """
    seq = _sequence_from_pass(model, inputs) if inputs is not None else _sequence_from_registration(model)
    notes = ["activations detected from an example forward pass" if inputs is not None
             else "no inputs: activations read from the order of registration (right for nn.Sequential)"]
    unknown = sorted({type(m).__name__ for _, m, a, _ in seq if a is None and looks_like_activation(m)
                      and not isinstance(m, WEIGHT_LAYERS + NEUTRAL)})
    if unknown:
        notes.append(f"unknown activation(s) {', '.join(unknown)} (not elementwise or not deterministic): "
                     "treated as linear; pass activation= to say what they compute")
    layers: list[WeightLayer] = []
    seen: set[int] = set()
    prev_act: _act.Activation | None = None
    for i, (name, m, act, m2) in enumerate(seq):
        if isinstance(m, WEIGHT_LAYERS):
            out_act = None
            for _, m2_, a2, _ in seq[i + 1:]:
                if a2 is not None:
                    out_act = a2
                    break
                if not isinstance(m2_, NEUTRAL):
                    break
            if id(m) not in seen:  # a module called twice is initialized once
                layers.append(WeightLayer(name, m, out_act, prev_act, m2))
                seen.add(id(m))
            prev_act = None
        elif act is not None:
            prev_act = act
        elif not isinstance(m, NEUTRAL):
            prev_act = None
    if activation is not None:
        mapping = activation if isinstance(activation, dict) else None
        for layer in layers:
            a = mapping.get(layer.name) if mapping is not None else activation
            if a is not None:
                layer.out_act = _act.resolve(a)
        for prev, cur in zip(layers, layers[1:]):  # in a chain, a layer's input is its predecessor's output
            if mapping is None or prev.name in mapping:
                cur.in_act = prev.out_act
        notes.append("activations given explicitly")
    return layers, notes
