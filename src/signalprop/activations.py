"""Activation registry shared by ``theory``, ``init`` and ``probe``.

Each entry carries phi and phi' as vectorized numpy functions (closed forms),
the points where phi' jumps (so quadrature can split the integral there), and
what kind of activation it is (bounded ones can saturate, rectifiers can die).
Importing this module never imports torch: the torch counterparts are built
lazily by :meth:`Activation.torch_fn`.

This is the one table of activation facts: the function and its derivative,
the ``torch.nn`` module class and the functional aliases that compute it
(how ``probe`` recognises it in a forward pass), whether it is bounded (can
saturate; the output band where it does is derived here from phi', see
:func:`saturation_band`) or a rectifier (units can die).  Adding an activation
touches one place: :data:`REGISTRY`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special

Array = np.ndarray
NumpyFn = Callable[[Array], Array]

__all__ = [
    "Activation",
    "REGISTRY",
    "names",
    "get",
    "resolve",
    "from_callable",
    "from_module",
    "detect_kinks",
    "from_call",
    "saturation_band",
    "torch_functions",
    "SATURATION_THRESHOLD",
]

# A unit is saturated where its activation's derivative is below this share
# of the derivative's maximum (tanh |x| > 2.99, sigmoid |x| > 5.99).
SATURATION_THRESHOLD = 0.01


@dataclass(frozen=True)
class Activation:
    """An elementwise activation with what theory needs to integrate it.

    ``kinks`` are the pre-activation values where phi' is discontinuous
    (ReLU: 0; hardtanh: -1 and 1) or phi'' is (softsign, ELU: 0): where
    quadrature splits.  ``bounded`` marks saturating activations,
    ``rectifier`` those whose output is exactly zero on a half-line (units can
    die).  ``torch_name`` with ``torch_kwargs`` names the ``torch.nn.functional``
    function (or a key of :data:`_TORCH_EXTRA`) that computes the same map.
    ``module`` (with ``module_kwargs``) is the ``torch.nn`` class computing it,
    ``functional`` the dotted names of torch callables that do (their
    parameters are read by :func:`from_call`).
    """

    name: str
    phi: NumpyFn
    dphi: NumpyFn
    kinks: tuple[float, ...] = ()
    bounded: bool = False
    rectifier: bool = False
    torch_name: str | None = None
    torch_kwargs: dict[str, Any] = field(default_factory=dict)
    # Optional closed forms of E[phi(sqrt(q) z)^2] and E[phi'(sqrt(q) z)^2],
    # z ~ N(0, 1); quadrature is used where these are None.
    second_moment: Callable[[Array], Array] | None = None
    deriv_second_moment: Callable[[Array], Array] | None = None
    # Optional closed form, for two inputs of second moment q at correlation c = 1 - eps, of
    # (E[phi(u1) (phi(u1) - phi(u2))], E[phi'(u1) phi'(u2)]): what the correlation fixed point
    # solves (theory.maps), written without cancellation as eps -> 0.
    corr_moments: Callable[[Array, Array], tuple[Array, Array]] | None = None
    # Some callers need the torch form of a user's own callable.
    torch_callable: Callable[[Any], Any] | None = None
    module: str | None = None
    module_kwargs: dict[str, Any] = field(default_factory=dict)
    functional: tuple[str, ...] = ()

    @property
    def base(self) -> str:
        """The family name without parameters ("leaky_relu" for "leaky_relu(0.2)")."""
        return self.name.split("(")[0]

    def torch_module(self) -> Any:
        """A fresh ``torch.nn`` module computing this activation."""
        if self.module is None:
            raise ValueError(f"activation {self.name!r} has no torch.nn module class")
        from torch import nn

        return getattr(nn, self.module)(**self.module_kwargs)

    def __call__(self, x: Array) -> Array:
        return self.phi(np.asarray(x, dtype=float))

    def torch_fn(self) -> Callable[[Any], Any]:
        """The same function on torch tensors (imports torch lazily)."""
        if self.torch_callable is not None:
            return self.torch_callable
        if self.torch_name is None:
            raise ValueError(f"activation {self.name!r} has no torch counterpart")
        import torch
        import torch.nn.functional as F

        kwargs = dict(self.torch_kwargs)
        if self.torch_name in _TORCH_EXTRA:
            return _TORCH_EXTRA[self.torch_name](**kwargs)
        fn = getattr(torch, self.torch_name, None) or getattr(F, self.torch_name)
        return (lambda x: fn(x, **kwargs)) if kwargs else fn


def _sigmoid(x: Array) -> Array:
    return special.expit(x)


def _dsigmoid(x: Array) -> Array:
    s = special.expit(x)
    return s * (1.0 - s)


def _leaky(slope: float) -> tuple[NumpyFn, NumpyFn]:
    return (lambda x: np.where(x > 0, x, slope * x), lambda x: np.where(x > 0, 1.0, slope))


def _elu(alpha: float, scale: float = 1.0) -> tuple[NumpyFn, NumpyFn]:
    def phi(x: Array) -> Array:
        return scale * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))

    def dphi(x: Array) -> Array:
        return scale * np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0.0)))

    return phi, dphi


_SQRT2 = math.sqrt(2.0)
_SQRT_2_PI = math.sqrt(2.0 / math.pi)
# SELU constants, Klambauer et al. (2017), eq. 14 (as in torch.nn.SELU).
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _gelu(x: Array) -> Array:
    return x * special.ndtr(x)


def _dgelu(x: Array) -> Array:
    return special.ndtr(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gelu_tanh(x: Array) -> Array:
    # Hendrycks & Gimpel (2016), tanh approximation (torch approximate="tanh").
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_PI * (x + 0.044715 * x**3)))


def _dgelu_tanh(x: Array) -> Array:
    u = _SQRT_2_PI * (x + 0.044715 * x**3)
    t = np.tanh(u)
    du = _SQRT_2_PI * (1.0 + 3 * 0.044715 * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def _silu(x: Array) -> Array:
    return x * special.expit(x)


def _dsilu(x: Array) -> Array:
    s = special.expit(x)
    return s * (1.0 + x * (1.0 - s))


def _softplus(x: Array) -> Array:
    return np.logaddexp(0.0, x)


def _mish(x: Array) -> Array:
    return x * np.tanh(np.logaddexp(0.0, x))


def _dmish(x: Array) -> Array:
    t = np.tanh(np.logaddexp(0.0, x))
    return t + x * (1.0 - t * t) * special.expit(x)


def _hardtanh(x: Array) -> Array:
    return np.clip(x, -1.0, 1.0)


def _dhardtanh(x: Array) -> Array:
    return np.where(np.abs(x) < 1.0, 1.0, 0.0)


# Closed forms of second moments, z ~ N(0, 1), x = sqrt(q) z.
def _erf_m2(q: Array) -> Array:
    return (2.0 / math.pi) * np.arcsin(2.0 * q / (1.0 + 2.0 * q))


def _erf_dm2(q: Array) -> Array:
    # phi' = 2/sqrt(pi) exp(-x^2)  ->  E[phi'^2] = (4/pi) E[exp(-2 q z^2)].
    return (4.0 / math.pi) / np.sqrt(1.0 + 4.0 * q)


def _erf_corr(q: Array, eps: Array) -> tuple[Array, Array]:
    # E[erf(u1) erf(u2)] = (2/pi) arcsin(s c), s = 2q / (1 + 2q); the difference of arcsines
    # arcsin(s) - arcsin(s c) = arcsin((x^2 - y^2) / (x sqrt(1 - y^2) + y sqrt(1 - x^2))) with
    # x^2 - y^2 = s^2 (1 - c^2) = s^2 eps (2 - eps): no cancellation as eps -> 0.
    # E[phi'(u1) phi'(u2)] = (4/pi) / sqrt(det(I + 2 Sigma)) = (4/pi) / sqrt((1 + 2q)^2 - (2qc)^2).
    c = 1.0 - eps
    s = 2.0 * q / (1.0 + 2.0 * q)
    d = (2.0 / math.pi) * np.arcsin(s * eps * (2.0 - eps) / (np.sqrt(1.0 - (s * c) ** 2) + c * np.sqrt(1.0 - s * s)))
    dd = (4.0 / math.pi) / np.sqrt((1.0 + 2.0 * q) ** 2 - (2.0 * q * c) ** 2)
    return d, dd


def _hardtanh_m2(q: Array) -> Array:
    q = np.asarray(q, dtype=float)
    t = 1.0 / np.sqrt(np.maximum(q, 1e-300))
    inside = 2.0 * special.ndtr(t) - 1.0
    pdf = np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    return q * (inside - 2.0 * t * pdf) + (1.0 - inside)


def _hardtanh_dm2(q: Array) -> Array:
    t = 1.0 / np.sqrt(np.maximum(np.asarray(q, dtype=float), 1e-300))
    return 2.0 * special.ndtr(t) - 1.0


_F = "torch.nn.functional."


def _fns(name: str, torch_too: bool = True, inplace: bool = False) -> tuple[str, ...]:
    """Dotted names of the torch callables computing ``name``."""
    out = [_F + name] + ([f"torch.{name}", f"torch.Tensor.{name}"] if torch_too else [])
    return tuple(out + ([f"torch.{name}_", f"torch.Tensor.{name}_"] if inplace else []))


def _make_leaky_relu(slope: float = 0.01) -> Activation:
    phi, dphi = _leaky(slope)
    s2 = (1.0 + slope * slope) / 2.0
    return Activation(
        f"leaky_relu({slope:g})", phi, dphi, kinks=(0.0,), rectifier=False,
        torch_name="leaky_relu", torch_kwargs={"negative_slope": slope},
        module="LeakyReLU", module_kwargs={"negative_slope": slope}, functional=(_F + "leaky_relu",),
        second_moment=lambda q: s2 * np.asarray(q, dtype=float),
        deriv_second_moment=lambda q: s2 + 0.0 * np.asarray(q, dtype=float),
    )


def _make_elu(alpha: float = 1.0) -> Activation:
    phi, dphi = _elu(alpha)
    return Activation(f"elu({alpha:g})", phi, dphi, kinks=(0.0,),
                      torch_name="elu", torch_kwargs={"alpha": alpha},
                      module="ELU", module_kwargs={"alpha": alpha}, functional=(_F + "elu",))


_relu_phi, _relu_dphi = _leaky(0.0)
_selu_phi, _selu_dphi = _elu(_SELU_ALPHA, _SELU_SCALE)

REGISTRY: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation("linear", lambda x: np.asarray(x, dtype=float) * 1.0,
                   lambda x: np.ones_like(np.asarray(x, dtype=float)),
                   torch_name="_identity", module="Identity",
                   second_moment=lambda q: np.asarray(q, dtype=float),
                   deriv_second_moment=lambda q: np.ones_like(np.asarray(q, dtype=float))),
        Activation("tanh", np.tanh, lambda x: 1.0 - np.tanh(x) ** 2, bounded=True,
                   torch_name="tanh", module="Tanh", functional=_fns("tanh")),
        Activation("sigmoid", _sigmoid, _dsigmoid, bounded=True, torch_name="sigmoid",
                   module="Sigmoid", functional=_fns("sigmoid")),
        Activation("relu", _relu_phi, _relu_dphi, kinks=(0.0,), rectifier=True,
                   torch_name="relu", module="ReLU", functional=_fns("relu", inplace=True),
                   second_moment=lambda q: 0.5 * np.asarray(q, dtype=float),
                   deriv_second_moment=lambda q: 0.5 + 0.0 * np.asarray(q, dtype=float)),
        _make_leaky_relu(0.01),
        _make_elu(1.0),
        # SELU's derivative jumps at 0 (scale vs scale*alpha).
        Activation("selu", _selu_phi, _selu_dphi, kinks=(0.0,), torch_name="selu", module="SELU",
                   functional=(_F + "selu", "torch.selu")),
        Activation("gelu", _gelu, _dgelu, torch_name="gelu", module="GELU", functional=(_F + "gelu",)),
        Activation("gelu_tanh", _gelu_tanh, _dgelu_tanh, torch_name="gelu",
                   torch_kwargs={"approximate": "tanh"}, module="GELU",
                   module_kwargs={"approximate": "tanh"}),
        Activation("silu", _silu, _dsilu, torch_name="silu", module="SiLU", functional=(_F + "silu",)),
        Activation("softplus", _softplus, _sigmoid, torch_name="softplus", module="Softplus",
                   functional=(_F + "softplus",)),
        Activation("erf", special.erf, lambda x: (2.0 / math.sqrt(math.pi)) * np.exp(-x * x),
                   bounded=True, torch_name="erf", functional=("torch.erf", "torch.Tensor.erf"),
                   second_moment=_erf_m2, deriv_second_moment=_erf_dm2, corr_moments=_erf_corr),
        Activation("hardtanh", _hardtanh, _dhardtanh, kinks=(-1.0, 1.0), bounded=True,
                   torch_name="hardtanh", module="Hardtanh", functional=(_F + "hardtanh",),
                   second_moment=_hardtanh_m2, deriv_second_moment=_hardtanh_dm2),
        # MobileNetV2's: a ReLU clipped at 6 -- a rectifier (units die below 0); its zero derivative above 6 is
        # not judged as saturation (the band of saturating activations is symmetric, and 0 is the dead side)
        Activation("relu6", lambda x: np.clip(x, 0.0, 6.0),
                   lambda x: np.where((x > 0.0) & (x < 6.0), 1.0, 0.0), kinks=(0.0, 6.0), rectifier=True,
                   torch_name="relu6", module="ReLU6", functional=(_F + "relu6",)),
        Activation("mish", _mish, _dmish, torch_name="mish", module="Mish", functional=(_F + "mish",)),
        Activation("softsign", lambda x: x / (1.0 + np.abs(x)),
                   lambda x: 1.0 / (1.0 + np.abs(x)) ** 2, kinks=(0.0,), bounded=True,
                   torch_name="softsign", module="Softsign", functional=(_F + "softsign",)),
    ]
}
# Parametrised families: name -> factory(param).
_FAMILIES: dict[str, Callable[[float], Activation]] = {
    "leaky_relu": _make_leaky_relu,
    "elu": _make_elu,
}
_ALIASES = {"identity": "linear", "swish": "silu", "leaky_relu": "leaky_relu(0.01)",
            "elu": "elu(1)", "gelu_exact": "gelu"}


def _torch_identity() -> Callable[[Any], Any]:
    return lambda x: x


_TORCH_EXTRA: dict[str, Callable[..., Callable[[Any], Any]]] = {"_identity": _torch_identity}


def names() -> list[str]:
    """Registered activation names (parametrised families with their default)."""
    return sorted(REGISTRY)


def get(name: str, param: float | None = None) -> Activation:
    """Look up an activation by name, e.g. ``"tanh"``, ``"leaky_relu(0.2)"``
    or ``get("leaky_relu", 0.2)``."""
    key = name.strip().lower()
    if "(" in key and key.endswith(")"):
        base, arg = key[:-1].split("(", 1)
        return get(base, float(arg))
    if param is not None:
        if key not in _FAMILIES:
            raise ValueError(
                f"activation {name!r} takes no parameter; parametrised ones are "
                f"{sorted(_FAMILIES)}"
            )
        return _FAMILIES[key](float(param))
    key = _ALIASES.get(key, key)
    if key in REGISTRY:
        return REGISTRY[key]
    if "(" in key:
        return get(key)
    raise ValueError(
        f"unknown activation {name!r}; known: {', '.join(names())} "
        f"(or pass an Activation, an nn.Module or a callable)"
    )


def detect_kinks(dphi: NumpyFn, lo: float = -30.0, hi: float = 30.0, h: float = 1e-3) -> tuple[float, ...]:
    """Points in [lo, hi] where phi' jumps, so quadrature can split there.

    Scans phi' on a grid of step h: a jump shows as one grid difference far
    larger (x 20) than both neighbours' and above 1e-6; each is then located
    to ~1e-12 by bisection on which side's derivative value the midpoint
    matches.  Smooth parts change phi' by O(h phi'') per step, so they do not
    trigger; a kink of derivative jump below 1e-6 is not worth splitting for.
    """
    x = np.arange(lo, hi + h, h)
    d = np.asarray(dphi(x), dtype=float)
    if not np.all(np.isfinite(d)):
        return ()
    dd = np.abs(np.diff(d))
    # A finite-difference phi' smears a jump over up to two grid steps, so a
    # step is compared with the steps two away on each side.
    pad = np.concatenate([[0.0, 0.0], dd, [0.0, 0.0]])
    near = np.maximum(pad[:-4], pad[4:])
    spikes = np.flatnonzero((dd > 1e-6) & (dd > 20 * near))
    groups = np.split(spikes, np.flatnonzero(np.diff(spikes) > 2) + 1) if spikes.size else []
    kinks = []
    for grp in groups:
        i, j = int(grp[0]), int(grp[-1]) + 1
        a, b = x[i], x[j]
        da, db = d[i], d[j]
        for _ in range(45):
            m = 0.5 * (a + b)
            dm = float(np.asarray(dphi(np.array([m])))[0])
            if abs(dm - da) < abs(dm - db):
                a = m
            else:
                b = m
        kinks.append(float(round(0.5 * (a + b), 9)))
    return tuple(kinks)


def from_callable(fn: Callable[[Array], Array], name: str | None = None,
                  kinks: tuple[float, ...] | None = None, eps: float = 1e-5) -> Activation:
    """Wrap a plain numpy callable; phi' by a fourth-order central difference.

    The derivative's truncation error is O(eps^4 phi^(5)) and its rounding
    error O(1e-16 / eps): about 1e-11 for eps = 1e-5 on smooth functions.
    Quadrature splits at ``kinks``, found by :func:`detect_kinks` unless given.
    """

    def phi(x: Array) -> Array:
        return np.asarray(fn(np.asarray(x, dtype=float)), dtype=float)

    def dphi(x: Array) -> Array:
        x = np.asarray(x, dtype=float)
        return (-phi(x + 2 * eps) + 8 * phi(x + eps) - 8 * phi(x - eps) + phi(x - 2 * eps)) / (
            12 * eps
        )

    found = detect_kinks(dphi) if kinks is None else tuple(kinks)
    return Activation(str(name or getattr(fn, "__name__", "callable")), phi, dphi, kinks=found)


# Module classes whose parameters select the entry; every other class maps
# through REGISTRY's ``module`` field (the default-parameter entry).
_MODULE_READERS: dict[str, Callable[[Any], Activation | None]] = {
    "LeakyReLU": lambda m: _make_leaky_relu(float(m.negative_slope)),
    "ELU": lambda m: _make_elu(float(m.alpha)),
    "GELU": lambda m: REGISTRY["gelu_tanh" if m.approximate == "tanh" else "gelu"],
    "Hardtanh": lambda m: REGISTRY["hardtanh"] if (m.min_val, m.max_val) == (-1.0, 1.0) else None,
    "Softplus": lambda m: REGISTRY["softplus"] if m.beta == 1 and m.threshold >= 20 else None,
    # PReLU with one shared slope is a leaky ReLU at its current slope
    "PReLU": lambda m: _make_leaky_relu(float(m.weight.detach().reshape(-1)[0]))
    if m.weight.numel() == 1 else None,
}
_BY_MODULE = {a.module: a for a in REGISTRY.values() if a.module and a.module not in _MODULE_READERS}


_NEAREST: dict[type, str] = {}


def from_module(module: Any) -> Activation | None:
    """The registry entry equal to a torch activation module, or None.

    Recognises the ``torch.nn`` activation classes by type and reads their
    parameters (LeakyReLU's slope, ELU's alpha, GELU's ``approximate``).
    """
    # the nearest torch.nn class in the MRO, so subclasses of nn.ReLU count too (looked up once per class)
    typ = type(module)
    cls = _NEAREST.get(typ)
    if cls is None:
        cls = _NEAREST[typ] = next((c.__name__ for c in typ.__mro__
                                    if (c.__module__ or "").startswith("torch.nn.")), "")
    if cls in _MODULE_READERS:
        return _MODULE_READERS[cls](module)
    if cls == "Module" and (typ.__module__ or "").startswith("transformers."):
        name = _HF_MODULES.get(typ.__name__)
        return REGISTRY[name] if name is not None else None
    return _BY_MODULE.get(cls)


# HF transformers' own activation modules (transformers.activations, ACT2FN) that compute a registry entry
# exactly; QuickGELU (x * sigmoid(1.702 x)), the clipped and "accurate" GELUs compute other maps and stay unknown
_HF_MODULES = {"GELUActivation": "gelu", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
               "FastGELUActivation": "gelu_tanh", "SiLUActivation": "silu", "MishActivation": "mish",
               "LinearActivation": "linear"}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, key: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(key, default)


# Functional calls whose arguments select the entry (None: not one we model).
_CALL_READERS: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], Activation | None]] = {
    "leaky_relu": lambda a, k: _make_leaky_relu(float(_arg(a, k, 1, "negative_slope", 0.01))),
    "elu": lambda a, k: _make_elu(float(_arg(a, k, 1, "alpha", 1.0))),
    "gelu": lambda a, k: REGISTRY["gelu_tanh" if k.get("approximate", "none") == "tanh" else "gelu"],
    "hardtanh": lambda a, k: REGISTRY["hardtanh"] if (float(_arg(a, k, 1, "min_val", -1.0)),
                                                      float(_arg(a, k, 2, "max_val", 1.0))) == (-1.0, 1.0)
    else None,
    "softplus": lambda a, k: REGISTRY["softplus"] if (_arg(a, k, 1, "beta", 1) == 1
                                                      and _arg(a, k, 2, "threshold", 20) >= 20) else None,
}


def from_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Activation | None:
    """The exact entry a functional call computes, e.g. ``F.leaky_relu(x, 0.2)``;
    ``name`` is the base name :func:`torch_functions` gave the callable."""
    reader = _CALL_READERS.get(name)
    return reader(args, kwargs) if reader is not None else get(name)


_TORCH_FUNCTIONS: dict[Any, str] = {}


def torch_functions() -> dict[Any, str]:
    """Every torch callable listed in the table's ``functional`` names -> base
    name (imports torch on first use; names missing in this torch are skipped)."""
    if not _TORCH_FUNCTIONS:
        import importlib

        for a in [*REGISTRY.values()]:
            for dotted in a.functional:
                mod, _, attr = dotted.rpartition(".")
                owner: Any = importlib.import_module("torch") if mod == "torch" else None
                if owner is None:
                    head, _, cls = mod.rpartition(".")
                    owner = (getattr(importlib.import_module(head), cls) if mod == "torch.Tensor"
                             else importlib.import_module(mod))
                fn = getattr(owner, attr, None)
                if fn is not None:
                    _TORCH_FUNCTIONS[fn] = a.base
    return _TORCH_FUNCTIONS


_BANDS: dict[tuple[str, float], tuple[float, float] | None] = {}
_NONNEG: dict[str, bool] = {}


def nonnegative(act: Activation) -> bool:
    """Whether phi(x) >= 0 everywhere (read on a grid over [-50, 50]; ReLU
    yes, leaky ReLU and GELU no): a rectifier unit whose largest output is 0
    is then zero throughout."""
    if act.name not in _NONNEG:
        _NONNEG[act.name] = bool(np.min(act.phi(np.linspace(-50.0, 50.0, 2001))) >= 0.0)
    return _NONNEG[act.name]


_DIES: dict[str, bool] = {}


def can_die(act: Activation) -> bool:
    """Whether a unit can die -- output exactly 0, and pass no gradient, for
    every input below some point: a rectifier, or an unbounded activation
    whose output underflows to 0 far on the negative side (GELU, SiLU, Mish,
    softplus: a pre-activation of -100 outputs exactly 0).  Read at -1e4;
    bounded activations that reach 0 there (sigmoid) saturate instead."""
    if act.name not in _DIES:
        with np.errstate(all="ignore"):
            far = float(np.asarray(act.phi(np.array([-1e4])), dtype=float).reshape(-1)[0])
        _DIES[act.name] = act.rectifier or (not act.bounded and far == 0.0)
    return _DIES[act.name]


def saturation_band(act: Activation, threshold: float = SATURATION_THRESHOLD) -> tuple[float, float] | None:
    """``(c, t)`` such that a unit is saturated exactly where its output y has
    ``|y - c| > t``: where phi'(x) < threshold * phi'(0), phi' being largest
    at 0 and falling monotonically on each side for every bounded entry.

    Derived from phi and phi' (bisection to 1e-12 on x, then t = phi(x) - c,
    lowered by a relative 1e-6 so that a clipped output of hardtanh, which is
    exactly +-1, counts); None for unbounded activations, which do not saturate.
    """
    key = (act.name, threshold)
    if key not in _BANDS:
        band = None
        if act.bounded:
            d0 = float(act.dphi(np.array([0.0]))[0])
            lo, hi = 0.0, 1.0
            while float(act.dphi(np.array([hi]))[0]) >= threshold * d0 and hi < 1e6:
                lo, hi = hi, 2 * hi
            for _ in range(80):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if float(act.dphi(np.array([mid]))[0]) >= threshold * d0 else (lo, mid)
            c = float(act.phi(np.array([0.0]))[0])
            band = (c, (float(act.phi(np.array([hi]))[0]) - c) * (1 - 1e-6))
        _BANDS[key] = band
    return _BANDS[key]


def _check_elementwise(fn: Any, name: str) -> None:
    """Refuse what is not a deterministic elementwise function: theory and
    gains treat an activation as phi applied to each entry alone."""
    import torch

    if isinstance(fn, torch.nn.Module) and type(fn).__name__ == "PReLU":
        slopes = int(getattr(fn, "weight").numel())  # noqa: B009 - a Module attribute mypy types as Tensor | Module
        raise ValueError(f"{name} has {slopes} slopes (one per channel): no single activation; "
                         "use nn.PReLU() with one shared slope, or pass 'leaky_relu(SLOPE)'")
    x = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    try:
        with torch.no_grad():
            y1, y2, part = fn(x.clone()), fn(x.clone()), fn(x[:5].clone())
    except Exception as e:
        raise ValueError(f"{name} cannot be evaluated as an elementwise activation: {type(e).__name__}: {e}") from e
    if not (isinstance(y1, torch.Tensor) and y1.shape == x.shape):
        raise ValueError(f"{name} does not map each entry to one entry (shape {tuple(x.shape)} became "
                         f"{tuple(getattr(y1, 'shape', ()))}): not an elementwise activation")
    if not torch.equal(y1, y2):
        raise ValueError(f"{name} gives different outputs on the same input (random, e.g. RReLU in training "
                         "mode): no fixed activation to compute a gain for; call .eval() or pass a name")
    if not torch.allclose(part, y1[:5], rtol=1e-12, atol=1e-12):
        raise ValueError(f"{name} is not elementwise (each output depends on other entries, e.g. softmax or "
                         "a normalisation): theory and gains need phi applied entry by entry")


def _from_torch_callable(fn: Any, name: str) -> Activation:
    """Wrap a torch module or function: phi in float64, phi' by autograd."""
    import torch

    _check_elementwise(fn, name)

    def phi(x: Array) -> Array:
        with torch.no_grad():
            return fn(torch.as_tensor(np.asarray(x, dtype=float))).numpy().copy()

    def dphi(x: Array) -> Array:
        t = torch.as_tensor(np.asarray(x, dtype=float)).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(t).sum(), t)
        return g.numpy().copy()

    return Activation(name, phi, dphi, kinks=detect_kinks(dphi), torch_callable=fn)


def resolve(act: Any, param: float | None = None) -> Activation:
    """Turn what a user passed into an :class:`Activation`.

    Accepts an :class:`Activation`, a registry name, a ``torch.nn`` activation
    module (known classes map to exact registry entries; others are evaluated
    through torch), or a plain callable on numpy arrays (torch functions such
    as ``torch.tanh`` also work).
    """
    if isinstance(act, Activation):
        return act
    if isinstance(act, str):
        return get(act, param)
    if act is None:
        raise ValueError("activation is None; pass a name such as 'tanh', a module or a callable")
    if not callable(act):
        raise ValueError(f"cannot interpret {act!r} as an activation: expected a name, "
                         "an Activation, an nn.Module or a callable")
    mod = type(act).__module__ or ""
    if mod.startswith("torch"):
        known = from_module(act)
        if known is not None:
            return known
        return _from_torch_callable(act, type(act).__name__)
    # Plain callables: try numpy first, fall back to torch for torch-only functions.
    try:
        out = act(np.linspace(-1.0, 1.0, 3))
        np.asarray(out, dtype=float)
    except Exception:
        return _from_torch_callable(act, getattr(act, "__name__", "callable"))
    return from_callable(act)
