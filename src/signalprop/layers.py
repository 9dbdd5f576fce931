"""Layer facts, one source for every part of signalprop: fans (with stride,
dilation, groups and transposition), which classes are weight layers,
convolutions, normalisations and pass-through modules, and which activation
a module computes.  ``init`` sets scales from them, the theory column
(:mod:`signalprop.probe.predict`) predicts from them, the recorder,
:mod:`signalprop.probe.diagnose` and the monitor's alerts read them.

Fan-in and fan-out for every parameter kind a user meets.

fan_in of a weight is the number of terms each output unit sums over (the
n_{t-1} in Dive into Deep Learning's derivation); fan_out the number of
output units each input unit feeds (its n_t).  These set the forward (n_in gamma^2 = 1) and backward
(n_out gamma^2 = 1) conditions.

Bare tensors follow torch's layout rule ``(out, in, *kernel)``: fan_in =
``in * prod(kernel)``, fan_out = ``out * prod(kernel)``; a 1-D tensor of n
entries has fans (n, n) and a 0-D one (1, 1).  With a module, its real
wiring is used, which differs from ``torch.nn.init._calculate_fan_in_and_fan_out``
in four places:

* grouped and depthwise ``ConvNd``: each input channel feeds only
  ``out/groups`` output channels, so fan_out = ``out/groups * prod(k)``;
  torch counts all ``out`` channels (too large by a factor ``groups``);
* strided ``ConvNd``: an input element falls under ``prod(k) / prod(stride)``
  kernel positions on average, so fan_out = ``out/groups * prod(k) /
  prod(stride)`` (torch ignores the stride);
* ``ConvTransposeNd`` stores its weight as ``(in, out/groups, *k)``; torch
  reads it with the plain rule and swaps the fans.  Each output element sums
  over ``in/groups`` channels and ``prod(k / stride)`` taps: fan_in =
  ``in/groups * prod(k) / prod(stride)``, fan_out = ``out/groups * prod(k)``;
* stacked weights -- RNN/LSTM/GRU gates and ``MultiheadAttention``'s packed
  in-projection -- have per-block fans (``hidden``, not ``4*hidden``).

The tensor-level initializers (``xavier_normal_(tensor)`` ...) see only the
tensor, so they use torch's rule, as torch does; pass ``fans=fans(module)``
to use the module's wiring.  The whole-model ones (``apply_``, ``critical_``)
always use the module's.

``Embedding`` has fans (1, 1): its one-hot input selects one row, so every
output unit is a single weight.  ``Bilinear``'s ``(out, in1, in2)`` weight has
fan_in = ``in1*in2`` and fan_out = ``out*in2`` (the terms in the gradient
with respect to the first input).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as an initializer should see it.

    ``blocks`` > 1 means the tensor stacks that many independent matrices
    along dim 0 (RNN gates, q/k/v projections); fans are per block.
    ``role`` is "weight", "bias", "norm_weight", "norm_bias" or "embedding".
    """

    name: str
    tensor: torch.Tensor
    fan_in: int
    fan_out: int
    role: str
    blocks: int = 1


def tensor_fans(t: torch.Tensor) -> tuple[int, int]:
    """Fans of a bare tensor by torch's ``(out, in, *kernel)`` rule (see module doc)."""
    if t.dim() == 0:
        return 1, 1
    if t.dim() == 1:
        return int(t.shape[0]), int(t.shape[0])
    rf = math.prod(t.shape[2:])
    return int(t.shape[1]) * rf, int(t.shape[0]) * rf


CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONVS = CONV + CONV_TRANSPOSE  # every convolution, named by its public classes
WEIGHT_LAYERS = (nn.Linear,) + CONVS
# layers whose output units sum over their input's: what the recorder calls weight layers (dead-unit axis)
UNIT_LAYERS = (nn.Linear, nn.Bilinear) + CONVS
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORMS = BATCHNORMS + (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                      nn.RMSNorm)
# Norms of other libraries (LlamaRMSNorm, T5LayerNorm, ...) known by their class name only
NORM_NAME = re.compile(r"Norm(\d+d)?$")
# Modules that pass the signal through unchanged at initialization (dropout is the identity in
# expectation, a reshape moves entries without changing them), as far as a scale is concerned
PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                nn.Identity, nn.Flatten, nn.Unflatten)
PASS_THROUGH_NAMES = frozenset(c.__name__ for c in PASS_THROUGH)


def is_norm_kind(kind: str) -> bool:
    """Whether a row's class name is a normalisation layer's (torch's or another library's)."""
    return NORM_NAME.search(kind) is not None


def feature_dim(m: nn.Module) -> int | None:
    """The dimension of a weight layer's output that indexes its units: 1 for
    convolutions (channels), -1 for Linear and Bilinear; None for others."""
    if isinstance(m, CONVS):
        return 1
    return -1 if isinstance(m, UNIT_LAYERS) else None
_RNN_GATES = {"LSTM": 4, "GRU": 3}


def _rnn_spec(m: nn.RNNBase, pname: str, t: torch.Tensor) -> ParamSpec:
    gates = _RNN_GATES.get(m.mode, 1)  # mode: "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    if pname.startswith("weight_hr"):  # LSTM projection (proj_size, hidden)
        return ParamSpec(pname, t, int(t.shape[1]), int(t.shape[0]), "weight")
    if pname.startswith("weight"):
        return ParamSpec(pname, t, int(t.shape[1]), int(t.shape[0]) // gates, "weight", gates)
    return ParamSpec(pname, t, 1, int(t.shape[0]) // gates, "bias", gates)


def module_specs(m: nn.Module, computed: bool = True) -> list[ParamSpec] | None:
    """Specs of a module's own (non-recursive) parameters, or None if unknown.
    ``computed=False`` (init's view): leave out a weight that is neither a
    parameter nor parametrised -- one a forward pre-hook computes from other
    parameters (pruning's ``weight_orig * weight_mask``, the hook-based
    ``weight_norm`` and ``spectral_norm``), which a write would not reach
    (the next forward computes it anew) -- and include a parametrised bias."""
    # the module's own parameters as named_parameters(recurse=False) gives them (a tensor under two names
    # once), read from _parameters directly: the generator cost 10 us a call, 20 ms on a 2,000-layer net
    own: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for n, t in m._parameters.items():
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            own[n] = t
    if not own and not _parametrized(m):  # (a parametrised weight counts)
        return []
    specs: list[ParamSpec] = []
    if not computed and computed_weight(m):
        b = own.get("bias")
        return [ParamSpec("bias", b, 1, int(b.shape[0]), "bias")] if b is not None else []
    if isinstance(m, (nn.Linear, nn.Bilinear, CONV)):
        w = m.weight
        if isinstance(m, nn.Bilinear):
            fi, fo = w.shape[1] * w.shape[2], w.shape[0] * w.shape[2]
        else:
            rf = math.prod(w.shape[2:])
            groups = getattr(m, "groups", 1)
            stride = math.prod(getattr(m, "stride", (1,)))
            fi, fo = w.shape[1] * rf, max(1, (w.shape[0] // groups) * rf // stride)
        specs.append(ParamSpec("weight", w, int(fi), int(fo), "weight"))
    elif isinstance(m, CONV_TRANSPOSE):
        w = m.weight
        k = math.prod(w.shape[2:])
        stride = math.prod(m.stride)
        fi = max(1, (w.shape[0] // m.groups) * k // stride)
        specs.append(ParamSpec("weight", w, int(fi), int(w.shape[1] * k), "weight"))
    elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        specs.append(ParamSpec("weight", m.weight, 1, 1, "embedding"))
    elif isinstance(m, NORMS):
        if own.get("weight") is not None:
            specs.append(ParamSpec("weight", own["weight"], 1, 1, "norm_weight"))
        if own.get("bias") is not None:
            specs.append(ParamSpec("bias", own["bias"], 1, 1, "norm_bias"))
        return specs
    elif isinstance(m, nn.RNNBase):
        return [_rnn_spec(m, n, t) for n, t in own.items()]
    elif isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        for n, t in own.items():
            if n == "in_proj_weight":
                specs.append(ParamSpec(n, t, e, e, "weight", 3))
            elif n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                specs.append(ParamSpec(n, t, int(t.shape[1]), int(t.shape[0]), "weight"))
            elif n == "in_proj_bias":
                specs.append(ParamSpec(n, t, 1, e, "bias", 3))
            elif n in ("bias_k", "bias_v"):
                specs.append(ParamSpec(n, t, 1, e, "bias"))
        return specs
    else:
        return None
    bias: torch.Tensor | None = own.get("bias")
    pz = parametrizations(m)
    if bias is None and not computed and pz is not None and "bias" in pz._modules and settable(m, "bias"):
        # a parametrised bias, as its weight is: the value its parametrisation computes (init writes it back
        # through right_inverse); not read elsewhere (a monitor must not run a parametrisation outside the
        # model's forward: a weight dropout draws, a spectral norm iterates)
        bias = cast(torch.Tensor, m.bias)
    if bias is not None:
        specs.append(ParamSpec("bias", bias, 1, int(bias.shape[0]), "bias"))
    return specs


def param_specs(model: nn.Module) -> tuple[list[tuple[str, ParamSpec]], list[str]]:
    """All known parameters of ``model`` as (full name, spec), and the names of
    parameters owned by modules signalprop does not know."""
    known: list[tuple[str, ParamSpec]] = []
    unknown: list[str] = []
    from torch.nn.utils.parametrize import ParametrizationList

    for mname, m in model.named_modules():
        if isinstance(m, ParametrizationList):  # its owner's parametrised weight stands for it
            continue
        specs = module_specs(m, computed=False)
        prefix = f"{mname}." if mname else ""
        if specs is None:
            unknown += [prefix + n for n, _ in m.named_parameters(recurse=False)]
            continue
        known += [(prefix + s.name, s) for s in specs]
        covered = {s.name for s in specs}  # (a pruned layer's weight_orig: its weight is computed from it)
        unknown += [prefix + n for n, _ in m.named_parameters(recurse=False) if n not in covered]
        pz = parametrizations(m)  # parametrised tensors the specs leave out (a norm's, or one
        if pz is not None:  # without right_inverse): named under the tensor they compute
            unknown += [prefix + n for n in pz._modules if n not in covered]
    return known, unknown


def left_as_they_were(model: nn.Module, written: list[tuple[str, nn.Module]]) -> list[str]:
    """The parameters of ``model`` (named as :func:`param_specs` names them)
    that an initializer which wrote the modules ``written`` (name, module)
    left as they were: every one of another module, those :func:`param_specs`
    does not know, and a tensor of a written module that cannot be assigned
    (:func:`settable`)."""
    done = {id(p) for _, m in written for p in own_parameters(m)}
    names = {f"{n}.{p}" if n else p for n, m in written for p in ("weight", "bias") if settable(m, p)}
    specs, unknown = param_specs(model)
    return list(dict.fromkeys(unknown + [n for n, s in specs if id(s.tensor) not in done and n not in names]))


def parametrizations(m: nn.Module) -> nn.Module | None:
    """``m``'s ``torch.nn.utils.parametrize`` container, or None: read off its
    ``_modules`` dict (a getattr miss costs ~1 us a module), which a
    ``torch.jit.script``ed module holds as a wrapper without ``get``."""
    mods = m._modules
    pz = mods.get("parametrizations") if isinstance(mods, dict) else None
    return pz if isinstance(pz, nn.Module) else None


def own_parameters(m: nn.Module) -> list[nn.Parameter]:
    """``m``'s own parameters and, where ``torch.nn.utils.parametrize``
    computes one of its tensors (``weight_norm``, ``spectral_norm``,
    ``orthogonal``), the parameters that tensor is computed from: a
    parametrised Linear's trained weight is its ``parametrizations.weight``'s
    ``original0`` and ``original1``, not a parameter of its own."""
    ps = [p for p in m._parameters.values() if p is not None]
    pz = parametrizations(m)
    if pz is not None:
        seen = set(map(id, ps))
        ps += [p for p in pz.parameters() if id(p) not in seen]
    return ps


# layers with a weight of known wiring (module_specs reads it)
_WEIGHTED = UNIT_LAYERS + (nn.Embedding, nn.EmbeddingBag)


def _parametrized(m: nn.Module) -> bool:
    """Whether ``torch.nn.utils.parametrize`` computes one of ``m``'s tensors:
    its ``parametrizations`` container, read off the dict (a getattr miss
    costs ~1 us a module)."""
    return parametrizations(m) is not None


def computed_weight(m: nn.Module) -> bool:
    """Whether a write into a weight layer's weight cannot reach the model:
    it is neither a parameter nor parametrised -- a forward pre-hook computes
    it from other parameters (pruning's ``weight_orig * weight_mask``, the
    hook-based ``weight_norm`` and ``spectral_norm``; the next forward
    computes it anew) -- or a parametrisation computes it that cannot be
    inverted (no ``right_inverse``: a positivity constraint's softplus)."""
    if not isinstance(m, _WEIGHTED):
        return False
    if _parametrized(m):
        return not settable(m, "weight")
    return "weight" not in m._parameters


def settable(m: nn.Module, name: str) -> bool:
    """Whether ``m.<name>`` can be assigned: a plain attribute, or computed by
    ``torch.nn.utils.parametrize`` through parametrisations that all have a
    ``right_inverse`` (the assignment runs them backwards; torch raises
    without one)."""
    pz = parametrizations(m)
    chain = pz._modules.get(name) if pz is not None else None
    return chain is None or all(hasattr(p, "right_inverse") for p in chain._modules.values())


def param_fan_ins(module: nn.Module) -> dict[str, int]:
    """Fan-in of each of a module's own parameters, by name: its real wiring
    where the module is known (a ``ConvTranspose`` weight's fan-in is not its
    ``shape[1] * prod(k)``), torch's tensor rule for the others."""
    own = [(n, p) for n, p in module._parameters.items() if p is not None]
    if "weight" not in module._parameters and isinstance(module, _WEIGHTED):
        # its weight is computed from other tensors (torch.nn.utils.parametrize, pruning, the hook-based
        # weight_norm and spectral_norm): reading it would run that computation -- a power iteration that
        # updates buffers, a dropout draw -- outside the model's forward; its own parameters are a bias
        # (fan-in 1) and the tensors the weight is made from (torch's rule)
        return {n: 1 if n == "bias" else tensor_fans(p)[0] for n, p in own}
    specs = module_specs(module)
    known = {s.name: s.fan_in for s in specs} if specs is not None else {}
    return {n: known.get(n, tensor_fans(p)[0]) for n, p in own}


def fans(tensor_or_module: torch.Tensor | nn.Module, name: str | None = None) -> tuple[int, int]:
    """(fan_in, fan_out) of a tensor (torch's layout rule) or of a module's
    parameter ``name`` (default ``"weight"``), using the module's real wiring.

    >>> fans(nn.Conv2d(8, 16, 3, groups=4))
    (18, 36)
    """
    if isinstance(tensor_or_module, torch.Tensor):
        return tensor_fans(tensor_or_module)
    if not isinstance(tensor_or_module, nn.Module):
        raise TypeError(f"fans() takes a tensor or an nn.Module, got {type(tensor_or_module).__name__}")
    if type(tensor_or_module) is nn.Linear and name in (None, "weight"):  # the common case, 1 us instead of 9
        # (not a parameter where the weight is computed from others: pruning, parametrizations)
        w = tensor_or_module._parameters.get("weight")
        if w is not None:
            return int(w.shape[1]), int(w.shape[0])
    specs = module_specs(tensor_or_module)
    want = name or ("weight" if specs is None or any(s.name == "weight" for s in specs)
                    else (specs[0].name if specs else "weight"))
    if specs is None:
        t = getattr(tensor_or_module, want, None)
        if isinstance(t, torch.Tensor):
            return tensor_fans(t)
        raise ValueError(f"{type(tensor_or_module).__name__} has no parameter {want!r}")
    for s in specs:
        if s.name == want:
            return s.fan_in, s.fan_out
    raise ValueError(
        f"{type(tensor_or_module).__name__} has no parameter {want!r}; "
        f"it has {[s.name for s in specs]}"
    )


__all__ = ["BATCHNORMS", "CONV", "CONVS", "CONV_TRANSPOSE", "NORMS", "PASS_THROUGH", "PASS_THROUGH_NAMES", "ParamSpec",
           "UNIT_LAYERS", "WEIGHT_LAYERS", "fans", "feature_dim", "is_norm_kind", "module_specs", "param_fan_ins",
           "param_specs", "tensor_fans"]
