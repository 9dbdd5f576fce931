"""``torch_default_``: what torch's own layers draw at construction, with ``generator=``."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import CONV, CONV_TRANSPOSE, NORMS, tensor_fans
from ._transaction import transactional


def _uniform(t: torch.Tensor, bound: float, g: torch.Generator | None) -> None:
    t.uniform_(-bound, bound, generator=g)


def _xavier_uniform_torch(t: torch.Tensor, g: torch.Generator | None) -> None:
    fi, fo = tensor_fans(t)  # torch's own (packed) fans, to reproduce its default exactly
    _uniform(t, math.sqrt(6.0 / (fi + fo)), g)


def _reset(m: nn.Module, g: torch.Generator | None) -> bool:
    """Re-draw ``m``'s own parameters as its constructor does; False if unknown."""
    if isinstance(m, (nn.Linear,) + CONV + CONV_TRANSPOSE):
        # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)), torch's fan rule
        bound = 1.0 / math.sqrt(max(tensor_fans(m.weight)[0], 1))
        _uniform(m.weight, bound, g)
        if m.bias is not None:
            _uniform(m.bias, bound, g)
    elif isinstance(m, nn.Bilinear):
        bound = 1.0 / math.sqrt(m.weight.shape[1])
        _uniform(m.weight, bound, g)
        if m.bias is not None:
            _uniform(m.bias, bound, g)
    elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        m.weight.normal_(0.0, 1.0, generator=g)
        if getattr(m, "padding_idx", None) is not None:
            m.weight[m.padding_idx].zero_()
    elif isinstance(m, NORMS):
        for pname, value in (("weight", 1.0), ("bias", 0.0)):
            t = getattr(m, pname, None)
            if isinstance(t, torch.Tensor):
                t.fill_(value)
    elif isinstance(m, nn.RNNBase):
        bound = 1.0 / math.sqrt(m.hidden_size)
        for p in m.parameters(recurse=False):
            _uniform(p, bound, g)
    elif isinstance(m, nn.MultiheadAttention):
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            w = getattr(m, name, None)
            if w is not None:
                _xavier_uniform_torch(w, g)
        if m.in_proj_bias is not None:
            m.in_proj_bias.zero_()
            m.out_proj.bias.zero_()
        for name in ("bias_k", "bias_v"):
            kv = getattr(m, name, None)
            if kv is not None:
                fi, fo = tensor_fans(kv)
                kv.normal_(0.0, math.sqrt(2.0 / (fi + fo)), generator=g)
    else:
        return not any(True for _ in m.parameters(recurse=False))
    return True


@transactional
def torch_default_(module: nn.Module, generator: torch.Generator | None = None) -> list[str]:
    """Re-initialize ``module`` (recursively) exactly as torch's constructors do,
    drawing from ``generator``: Linear/Conv U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weight and bias, Embedding N(0, 1), norms 1 and 0, RNNs
    U(-1/sqrt(hidden), 1/sqrt(hidden)), MultiheadAttention Xavier-uniform
    in-projection and zero biases.  Returns the parameter names of modules it
    does not know, which it leaves untouched."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"torch_default_ takes an nn.Module, got {type(module).__name__}")
    unknown: list[str] = []
    with torch.no_grad():
        for name, m in module.named_modules():
            if not _reset(m, generator):
                prefix = f"{name}." if name else ""
                unknown += [prefix + n for n, _ in m.named_parameters(recurse=False)]
    return unknown
