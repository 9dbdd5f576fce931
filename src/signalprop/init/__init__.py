"""Principled initializers for every layer type (torch conventions: in place,
trailing underscore, ``generator=``, no autograd)."""

from .apply import SCHEMES, apply_, scheme_names
from .critical import critical_
from .defaults import torch_default_
from .fans import fans
from .gains import calculate_gain, gain
from .lsuv import lsuv_
from .orthogonal import delta_orthogonal_, orthogonal_
from .residual import ScaledResidual, mark_residual, residual_branches, scale_residual_
from .schemes import (
    kaiming_normal_,
    kaiming_uniform_,
    lecun_normal_,
    lecun_uniform_,
    trunc_normal_,
    truncation_std,
    variance_scaling_,
    xavier_normal_,
    xavier_uniform_,
)

__all__ = [
    "SCHEMES",
    "ScaledResidual",
    "apply_",
    "calculate_gain",
    "critical_",
    "delta_orthogonal_",
    "fans",
    "gain",
    "kaiming_normal_",
    "kaiming_uniform_",
    "lecun_normal_",
    "lecun_uniform_",
    "lsuv_",
    "mark_residual",
    "orthogonal_",
    "residual_branches",
    "scale_residual_",
    "scheme_names",
    "torch_default_",
    "trunc_normal_",
    "truncation_std",
    "variance_scaling_",
    "xavier_normal_",
    "xavier_uniform_",
]
