"""Signal-propagation theory for any activation (numpy/scipy only, never torch).

Exact Gaussian expectations by kink-aware quadrature; the mean-field maps of
Poole et al. (2016) and Schoenholz et al. (2017); Jacobian spectra of
Pennington et al. (2017); layer-by-layer predictions for concrete stacks.
"""

from .critical import CriticalPoint, critical_point
from .depth import depth_scales, trainable_depth
from .gaussian import expect, expect2
from .line import critical_sigma_w2
from .maps import (
    FixedPointError,
    NoCriticalPointError,
    chi1,
    cmap,
    covmap,
    fixed_point,
    gaussian_moments,
    qmap,
)
from .phase import PhaseDiagram, phase_diagram
from .propagate import Propagation, propagate
from .spectrum import JacobianSpectrum, jacobian_density, jacobian_spectrum
from .summary import summarize

__all__ = [
    "CriticalPoint",
    "FixedPointError",
    "JacobianSpectrum",
    "NoCriticalPointError",
    "PhaseDiagram",
    "Propagation",
    "chi1",
    "cmap",
    "covmap",
    "critical_point",
    "critical_sigma_w2",
    "depth_scales",
    "expect",
    "expect2",
    "fixed_point",
    "gaussian_moments",
    "jacobian_density",
    "jacobian_spectrum",
    "phase_diagram",
    "propagate",
    "qmap",
    "summarize",
    "trainable_depth",
]
