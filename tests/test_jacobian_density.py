"""theory.jacobian_density: the same x gives the same value whatever else is
asked; against the Fuss-Catalan closed form, real networks' spectra, and its
own mass on grids that reach far past the support on both sides."""

import math

import numpy as np
import pytest
import torch

from signalprop import activations
from signalprop import theory as T

# tanh at the lab's critical point (Pennington experiment: q* = 0.025, centre off), ReLU at (2, 0)
_TANH = T.critical_point("tanh", q_star=0.025, center=False)
PARAMS = {"tanh": (_TANH.sigma_w2, _TANH.sigma_b2), "relu": (2.0, 0.0)}
CASES = [(a, w, d) for a in ("tanh", "relu") for w in ("orthogonal", "gaussian") for d in (8, 32)]
CONTINUOUS_MASS = {"tanh": 1.0, "relu": 0.5}  # ReLU: D^2's zero share, 1/2, is a point mass at 0


def _density(act, weights, depth, x, eta=1e-3):
    sw2, sb2 = PARAMS[act]
    return T.jacobian_density(act, sw2, sb2, depth, np.asarray(x, dtype=float), weights, eta=eta)


@pytest.mark.parametrize("act,weights,depth", CASES)
def test_a_points_density_does_not_depend_on_the_other_points_asked(act, weights, depth):
    """Alone, in any order, inside grids far below and far above the support
    (the two grids that lost the mass): bit-for-bit the same value."""
    named = np.array([1.0, 0.5, 1.2, 1e-8, 1e-25, 40.0, 3e3, 0.9])
    grids = [(np.logspace(-12, 2.39, 50), 1e-4), (np.linspace(1e-8, 1800, 451), 1e-3)]
    for grid, eta in [(named, 1e-3)] + grids:
        together = _density(act, weights, depth, grid, eta)
        perm = np.random.default_rng(0).permutation(grid.size)
        np.testing.assert_array_equal(_density(act, weights, depth, grid[perm], eta), together[perm])
        np.testing.assert_array_equal(_density(act, weights, depth, grid[::-1], eta), together[::-1])
        for i in range(0, grid.size, max(1, grid.size // 6)):  # a sample alone: each builds its own solver
            assert _density(act, weights, depth, grid[i:i + 1], eta)[0] == together[i], grid[i]
    assert np.all(np.isfinite(together)) and np.all(together >= 0)


def test_the_lab_point_alone_is_inside_the_bulk():
    """tanh, orthogonal, depth 8 at x = 1 (the bulk's middle): the old solver gave
    eta / pi = 3.2e-4 (all mass at 0) alone and 0 beside 0.5 and 1.2; a
    dense grid through the bulk gives 1.81 at 1 (linear interpolation)."""
    grid = np.linspace(0.2, 1.5, 2601)
    dense = float(np.interp(1.0, grid, _density("tanh", "orthogonal", 8, grid)))
    alone = float(_density("tanh", "orthogonal", 8, [1.0])[0])
    beside = _density("tanh", "orthogonal", 8, [0.5, 1.0, 1.2])[1]
    assert alone == beside == pytest.approx(dense, rel=1e-5) and alone > 1.5


def _fuss_catalan(s, phi):
    """Haagerup & Moller (2013): the Fuss-Catalan law (the product of s free
    square Wisharts with unit variance) in the parametric form x(phi), rho(phi),
    0 < phi < pi / (s + 1)."""
    x = np.sin((s + 1) * phi) ** (s + 1) / (np.sin(phi) * np.sin(s * phi) ** s)
    rho = np.sin(phi) ** 2 * np.sin(s * phi) ** (s - 1) / (math.pi * np.sin((s + 1) * phi) ** s)
    return x, rho


@pytest.mark.parametrize("depth", [2, 8, 32])
def test_linear_gaussian_density_is_the_fuss_catalan_law(depth):
    """phi = identity, Gaussian weights of variance 1/n: J J^T is a product of
    free Wisharts.  The closed form's own moments are checked first (mass 1,
    mean 1, second moment s + 1, by scipy quad in phi).  Smoothing eta = 1e-6
    moves the density by ~eta relative away from the edges; measured 2e-5 at
    worst (the largest x, nearest the right edge), so rtol 1e-4."""
    from scipy import integrate

    def moment(k):
        def f(p):
            x, rho = _fuss_catalan(depth, p)
            s = depth  # d ln x / d phi, from the closed form
            dlnx = (s + 1) ** 2 / math.tan((s + 1) * p) - 1 / math.tan(p) - s * s / math.tan(s * p)
            return -rho * x ** (k + 1) * dlnx
        return integrate.quad(f, 0.0, math.pi / (depth + 1), limit=500)[0]

    assert [moment(k) for k in (0, 1, 2)] == pytest.approx([1, 1, depth + 1], rel=1e-6)
    x, rho = _fuss_catalan(depth, np.linspace(0.05, math.pi / (depth + 1) - 0.02, 7))
    np.testing.assert_allclose(T.jacobian_density("linear", 1.0, 0.0, depth, x, "gaussian", eta=1e-6), rho,
                               rtol=1e-4)


@pytest.mark.parametrize("depth", [1, 4, 64])
def test_linear_orthogonal_density_is_the_smoothed_point_mass(depth):
    """phi = identity, orthogonal weights of gain 1 (the only critical linear
    net): J J^T = I, one eigenvalue, so the density is the smoothing kernel
    itself, (eta x / pi) / ((x - 1)^2 + (eta x)^2), to rounding."""
    lam, eta = 1.0, 1e-3
    x = lam * np.array([1e-3, 0.9, 0.99, 0.999, 1.0, 1.001, 1.01, 1.1, 1e3])
    kernel = eta * x / math.pi / ((x - lam) ** 2 + (eta * x) ** 2)
    np.testing.assert_allclose(T.jacobian_density("linear", 1.0, 0.0, depth, x, "orthogonal", eta=eta), kernel,
                               rtol=1e-9)


# Where the support is: grids that cover it run from `low` (tanh orthogonal: a gap below ~0.2; the rest:
# mass below 1e-120 is 2.3e-4 at most, tanh Gaussian at depth 32) up to 1e4 (past every right edge),
# with a linear part fine enough for the edges' square-root shape (trapezoid error ~ h^1.5).
_COVER = {("tanh", "orthogonal"): (1e-8, (0.1, 3.0)), ("tanh", "gaussian"): (1e-120, (1e-3, 150.0)),
          ("relu", "orthogonal"): (1e-120, (1e-3, 150.0)), ("relu", "gaussian"): (1e-120, (1e-3, 150.0))}


@pytest.mark.parametrize("act,weights,depth", CASES)
def test_mass_on_a_grid_covering_the_support(act, weights, depth):
    """Trapezoid rule over a log grid (40 per decade) joined to a linear one
    through the bulk (3,000 points), the density asked for in five interleaved
    parts (each itself a coarser grid over the whole range).  eta = 1e-5: the
    Lorentzian's 1 / x tail adds (eta / pi) (ln(b / lam) - 1) per eigenvalue
    lam, at most 1.1e-3 for lam = 1e-120, b = 1e4, ~1e-4 for the bulk of the
    mass; measured within 4.5e-4 of 1 (tanh) or 1/2 (ReLU, whose zero
    eigenvalues are a point mass left out) in all eight cases, so 1e-3."""
    low, (a, b) = _COVER[(act, weights)]
    grid = np.union1d(np.geomspace(low, 1e4, int(40 * math.log10(1e4 / low))), np.linspace(a, b, 3000))
    dens = np.empty_like(grid)
    for i in range(5):
        dens[i::5] = _density(act, weights, depth, grid[i::5], eta=1e-5)
    assert np.trapezoid(dens, grid) == pytest.approx(CONTINUOUS_MASS[act], abs=1e-3)


def test_mass_leaked_by_the_smoothing_is_as_documented():
    """At eta = 1e-3 on [1e-8, 1800] (the grid that kept 0.25% of the mass): the
    docstring's first-order leak (eta / pi) (ln(1800 / lam) - 1) lies between
    2.0e-3 and 2.5e-3 for lam in the bulk [0.3, 1.3]."""
    grid = np.union1d(np.geomspace(1e-8, 1800, 1200), np.linspace(0.1, 3.0, 3000))
    mass = np.trapezoid(_density("tanh", "orthogonal", 8, grid), grid)
    leak = [1e-3 / math.pi * (math.log(1800 / lam) - 1) for lam in (1.3, 0.3)]
    assert 1 + leak[0] - 1e-4 < mass < 1 + leak[1] + 1e-4


def _sq_singular_values(act, weights, depth, width, seed):
    """One network at the fixed point: eigenvalues of J J^T, J = D_L W_L ... D_1 W_1."""
    sw2, sb2 = PARAMS[act]
    a = activations.get(act)
    q = T.fixed_point(act, sw2, sb2) if act == "tanh" else 1.0
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(width, generator=g, dtype=torch.float64) * math.sqrt((q - sb2) / sw2)
    jac = torch.eye(width, dtype=torch.float64)
    for _ in range(depth):
        if weights == "gaussian":
            w = torch.randn(width, width, generator=g, dtype=torch.float64) * math.sqrt(sw2 / width)
        else:
            qm, r = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
            w = qm * torch.sgn(torch.diagonal(r)) * math.sqrt(sw2)
        h = w @ x + torch.randn(width, generator=g, dtype=torch.float64) * math.sqrt(sb2)
        jac = (torch.as_tensor(a.dphi(h.numpy()))[:, None] * w) @ jac
        x = a.torch_fn()(h)
    return np.sort(torch.linalg.svdvals(jac).numpy() ** 2)


@pytest.mark.parametrize("act,weights,depth", CASES)
def test_density_against_the_spectrum_of_real_networks(act, weights, depth):
    """One width-400 network per case: the largest gap between the fraction of
    its eigenvalues above x and the density's mass above x, for x from 1e-8
    of the largest eigenvalue up (below that a float64 product of 32 layers
    is rounding).  400 eigenvalues of one matrix repel, so they sit closer to
    the limit than 400 independent draws (5% critical distance 0.068);
    measured <= 0.024 over the eight cases (seed 0), so 0.06."""
    ev = _sq_singular_values(act, weights, depth, 400, seed=0)
    grid = np.geomspace(ev[-1] * 1e-8, ev[-1] * 10, 3000)
    dens = _density(act, weights, depth, grid, eta=1e-4)
    above = np.concatenate([np.cumsum((0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))[::-1])[::-1], [0.0]])
    measured = 1.0 - np.searchsorted(ev, grid, side="right") / ev.size
    assert float(np.max(np.abs(above - measured))) < 0.06


def test_density_rejects_points_it_has_no_value_for():
    with pytest.raises(ValueError, match="x must be finite and > 0"):
        _density("tanh", "orthogonal", 8, [1.0, 0.0])
    with pytest.raises(ValueError, match="x must be finite and > 0"):
        _density("tanh", "orthogonal", 8, [np.inf])
    with pytest.raises(ValueError, match="eta .* must be > 0"):
        _density("tanh", "orthogonal", 8, [1.0], eta=0.0)
    assert _density("tanh", "orthogonal", 8, np.empty(0)).shape == (0,)
    assert _density("tanh", "orthogonal", 8, np.ones((2, 3))).shape == (2, 3)
