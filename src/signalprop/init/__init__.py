"""Principled initializers for every layer type (torch conventions: in place,
trailing underscore, ``generator=``, no autograd).

A drop-in superset of :mod:`torch.nn.init`: every function there exists
here with torch's signature and meaning (``import signalprop.init as init``
runs torch code unchanged) and draws torch's values for the same seed or
generator (``sparse_`` with a generator: see its docstring), plus ``fans=``,
any-activation gains (:func:`gain`), critical, LSUV, delta-orthogonal and
residual scaling.

Two gains, two questions: :func:`calculate_gain` is torch's table of
recommended gains (tanh 5/3, sigmoid 1: heuristics, kept for
compatibility); :func:`gain` is the value that preserves the signal's
second moment for that activation under Gaussian inputs (tanh ~1.59,
relu sqrt(2)), computed from the activation itself.
"""

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
    scaled_trunc_normal_,
    truncation_std,
    variance_scaling_,
    xavier_normal_,
    xavier_uniform_,
)
from .torch_compat import (
    _deprecated,
    constant_,
    dirac_,
    eye_,
    normal_,
    ones_,
    sparse_,
    trunc_normal_,
    uniform_,
    zeros_,
)

# torch.nn.init's deprecated names without the underscore (FutureWarning, as there)
uniform = _deprecated(uniform_)
normal = _deprecated(normal_)
constant = _deprecated(constant_)
eye = _deprecated(eye_)
dirac = _deprecated(dirac_)
xavier_uniform = _deprecated(xavier_uniform_)
xavier_normal = _deprecated(xavier_normal_)
kaiming_uniform = _deprecated(kaiming_uniform_)
kaiming_normal = _deprecated(kaiming_normal_)
orthogonal = _deprecated(orthogonal_)
sparse = _deprecated(sparse_)

__all__ = [
    "SCHEMES",
    "ScaledResidual",
    "apply_",
    "calculate_gain",
    "constant_",
    "critical_",
    "delta_orthogonal_",
    "dirac_",
    "eye_",
    "fans",
    "gain",
    "kaiming_normal_",
    "kaiming_uniform_",
    "lecun_normal_",
    "lecun_uniform_",
    "lsuv_",
    "mark_residual",
    "normal_",
    "ones_",
    "orthogonal_",
    "residual_branches",
    "scale_residual_",
    "scaled_trunc_normal_",
    "scheme_names",
    "sparse_",
    "torch_default_",
    "trunc_normal_",
    "truncation_std",
    "uniform_",
    "variance_scaling_",
    "xavier_normal_",
    "xavier_uniform_",
    "zeros_",
]
