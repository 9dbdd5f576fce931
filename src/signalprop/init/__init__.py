"""Principled initializers for every layer type (torch conventions: in place,
trailing underscore, ``generator=``, no autograd)."""

from .apply import SCHEMES, apply_, scheme_names
from .defaults import torch_default_
from .fans import fans
from .gains import calculate_gain, gain
from .orthogonal import delta_orthogonal_, orthogonal_
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
    "apply_",
    "calculate_gain",
    "delta_orthogonal_",
    "fans",
    "gain",
    "kaiming_normal_",
    "kaiming_uniform_",
    "lecun_normal_",
    "lecun_uniform_",
    "orthogonal_",
    "scheme_names",
    "torch_default_",
    "trunc_normal_",
    "truncation_std",
    "variance_scaling_",
    "xavier_normal_",
    "xavier_uniform_",
]
