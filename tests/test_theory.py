"""signalprop.theory against closed forms, scipy quadrature, published values
and Monte Carlo over real finite networks."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import integrate

from signalprop import activations
from signalprop import theory as T


def test_theory_does_not_import_torch():
    code = "import sys, signalprop.theory as t; t.critical_sigma_w2('tanh', 0.05); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _quad(f, q, kinks):
    s = math.sqrt(q)
    g = lambda z: float(f(np.array(s * z))) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    edges = [-np.inf, *sorted({0.0, *(k / s for k in kinks)}), np.inf]
    return sum(integrate.quad(g, a, b, epsabs=1e-15, epsrel=1e-13, limit=500)[0]
               for a, b in zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("name", activations.names())
@pytest.mark.parametrize("q", [0.1, 1.0, 4.0, 25.0])
def test_quadrature_against_scipy_quad(name, q):
    a = activations.get(name)
    for f in (a.phi, lambda x: a.phi(x) ** 2, lambda x: a.dphi(x) ** 2):
        assert float(T.expect(f, q, a.kinks)) == pytest.approx(_quad(f, q, a.kinks), abs=1e-9)


def test_bivariate_against_closed_form_and_dblquad():
    relu = activations.get("relu")
    for q1, q2, c in [(1.0, 1.0, 0.5), (2.0, 0.5, -0.3), (1.5, 3.0, 0.9)]:
        th = math.acos(c)  # arc-cosine kernel, Cho & Saul (2009)
        exact = math.sqrt(q1 * q2) / (2 * math.pi) * (math.sin(th) + (math.pi - th) * math.cos(th))
        assert float(T.expect2(relu.phi, relu.phi, q1, q2, c, relu.kinks, relu.kinks)) == pytest.approx(exact, abs=1e-10)
    q1, q2, c = 2.0, 0.5, 0.6
    f = lambda z2, z1: (math.tanh(math.sqrt(q1) * z1) * math.tanh(math.sqrt(q2) * (c * z1 + math.sqrt(1 - c * c) * z2))  # noqa: E731
                        * math.exp(-(z1 * z1 + z2 * z2) / 2) / (2 * math.pi))
    ref = integrate.dblquad(f, -10, 10, -10, 10, epsabs=1e-12)[0]
    assert float(T.expect2(np.tanh, np.tanh, q1, q2, c)) == pytest.approx(ref, abs=1e-9)


def test_closed_forms():
    for q in (0.3, 1.0, 7.0):
        assert T.qmap("relu", q, 1.7, 0.2) == pytest.approx(0.5 * 1.7 * q + 0.2, abs=1e-13)
    assert T.critical_sigma_w2("relu", 0.0) == pytest.approx(2.0, abs=1e-10)
    # chi1 of tanh is flat (1 + O(eps^2)) near sigma_w2 = 1, so the root is conditioned to ~1e-7.
    assert T.critical_sigma_w2("tanh", 0.0) == pytest.approx(1.0, abs=1e-6)
    for w in (0.5, 1.0, 3.0):
        assert T.chi1("linear", w, 0.1, q=1.3) == pytest.approx(w, abs=1e-13)
    assert T.fixed_point("relu", 1.5, 0.1) == pytest.approx(0.1 / (1 - 0.75), rel=1e-10)
    assert T.fixed_point("tanh", 0.5, 0.0) == 0.0  # ordered phase, no bias: the signal collapses


def test_published_tanh_critical_point():
    # Schoenholz et al. (2017), Fig. 1: tanh at sigma_b2 = 0.05 is critical at sigma_w2 ~= 1.76.
    assert T.critical_sigma_w2("tanh", 0.05) == pytest.approx(1.76, abs=0.01)
    w = T.critical_sigma_w2("tanh", 0.05)
    assert T.chi1("tanh", w, 0.05) == pytest.approx(1.0, abs=1e-9)


def test_arbitrary_callable_matches_registry():
    w = T.critical_sigma_w2(lambda x: np.tanh(x), 0.05)
    assert w == pytest.approx(T.critical_sigma_w2("tanh", 0.05), abs=1e-8)


def test_errors_are_explained():
    with pytest.raises(T.NoCriticalPointError, match="q diverges with sigma_b2=0.1"):
        T.critical_sigma_w2("relu", 0.1)
    with pytest.raises(T.NoCriticalPointError, match="does not cross 1"):
        T.critical_sigma_w2("linear", 0.0, lo=0.01, hi=0.5)
    with pytest.raises(T.FixedPointError, match="q diverges for relu at sigma_w2=3"):
        T.fixed_point("relu", 3.0, 0.1)
    with pytest.raises(ValueError, match="need sigma_w2 > 0"):
        T.fixed_point("tanh", -1.0, 0.0)


def test_cmap_fixed_point_and_depth_scale_by_iteration():
    """xi_c against an independent estimate: iterate the c-map and fit the
    geometric rate at which |c_l - c*| shrinks (chi_c = e^{-1/xi_c})."""
    for w, b in [(1.2, 0.05), (2.5, 0.05), (1.9, 0.3)]:
        assert T.cmap("tanh", 1.0, w, b) == pytest.approx(1.0, abs=1e-8)  # 2-D rule: ~1e-9
        xi_q, xi_c = T.depth_scales("tanh", w, b)
        cs = [0.3]
        for _ in range(400):
            cs.append(T.cmap("tanh", cs[-1], w, b))
        cstar = cs[-1]
        d = np.abs(np.array(cs[:60]) - cstar)
        d = d[d > 1e-9]
        rate = np.exp(np.polyfit(np.arange(len(d))[-20:], np.log(d[-20:]), 1)[0])
        assert -1 / math.log(rate) == pytest.approx(xi_c, rel=0.02)
        assert xi_q > 0
    assert T.trainable_depth("tanh", 2.5, 0.05) == pytest.approx(6 * T.depth_scales("tanh", 2.5, 0.05)[1])


def test_phase_diagram_critical_line_and_shapes():
    w, b = np.linspace(0.5, 4, 60), np.array([0.0, 0.05, 0.2])
    pd = T.phase_diagram("tanh", w, b)
    assert pd.xi_c.shape == (3, 60)
    for i, sb in enumerate(b):
        assert pd.critical_sigma_w2[i] == pytest.approx(T.critical_sigma_w2("tanh", sb), abs=0.02)
    j = int(np.argmin(np.abs(w - 2.5)))
    assert pd.xi_c[1, j] == pytest.approx(T.depth_scales("tanh", w[j], 0.05)[1], rel=1e-3)


# ---- Monte Carlo over real finite networks ---------------------------------

def _simulate(widths, act, sw2, sb2, q0, c0, seed, batch=2):
    """One random net; returns per-layer E[h^2], corr(h_a, h_b), E[(dL/dh)^2]."""
    g = torch.Generator().manual_seed(seed)
    fn = activations.get(act).torch_fn()
    n0 = widths[0]
    z = torch.randn(batch, n0, generator=g, dtype=torch.float64)
    z2 = torch.randn(batch, n0, generator=g, dtype=torch.float64)
    x = math.sqrt(q0) * torch.cat([z, c0 * z + math.sqrt(1 - c0 * c0) * z2])  # pairs (i, batch+i)
    hs = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * math.sqrt(sw2 / n_in)
        bias = torch.randn(n_out, generator=g, dtype=torch.float64) * math.sqrt(sb2)
        h = (x @ W.T + bias).requires_grad_(True)
        hs.append(h)
        x = fn(h)
    cot = torch.randn(x.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(x, hs, cot)
    q = np.array([float((h.detach() ** 2).mean()) for h in hs])
    c = np.array([float(torch.nn.functional.cosine_similarity(h[:batch], h[batch:], dim=1).mean()) for h in
                  (h.detach() for h in hs)])
    gr = np.array([float((gg**2).mean()) for gg in grads])
    return q, c, gr


def _q_tolerance(p, act, sw2, sb2, n, nets):
    """4 standard errors of the measured per-layer second moment.  The weights
    of one layer scale q by a chi-square factor of relative sd sqrt(2/n); that
    noise is carried on through the q-map's slope chi_q, so
    var_l = (2/n) sum_k prod_{k<m<=l} chi_q(m)^2, divided by the number of nets."""
    eps = 1e-6
    slope = np.array([(T.qmap(act, q + eps, sw2, sb2) - T.qmap(act, q - eps, sw2, sb2)) / (2 * eps) for q in p.q])
    var = np.zeros(len(p.q))
    acc = 0.0
    for layer in range(len(p.q)):
        acc = acc * (slope[layer - 1] ** 2 if layer else 0.0) + 2.0 / n
        var[layer] = acc
    return 4 * np.sqrt(var / nets)


@pytest.mark.parametrize("act,sw2,sb2", [("tanh", 1.5, 0.05), ("tanh", 2.5, 0.1), ("relu", 2.0, 0.0), ("relu", 1.8, 0.1)])
def test_monte_carlo_forward_and_correlation(act, sw2, sb2):
    """Width 1000, 20 layers, 6 nets x 4 input pairs.  Second moments within 4
    standard errors of finite-width noise (see _q_tolerance; 3-8% here, up to
    12% for critical ReLU, whose q does a random walk); correlations within 0.04."""
    n, nets = 1000, 6
    widths = [n] * 21
    sims = [_simulate(widths, act, sw2, sb2, 1.0, 0.4, seed, batch=4) for seed in range(nets)]
    q = np.mean([s[0] for s in sims], 0)
    c = np.mean([s[1] for s in sims], 0)
    p = T.propagate(widths, act, sw2, sb2, q0=1.0, c0=0.4)
    tol = _q_tolerance(p, act, sw2, sb2, n, nets)
    assert np.all(np.abs(q / p.q - 1) < tol), (q / p.q - 1, tol)
    np.testing.assert_allclose(c, p.c, atol=0.04)


@pytest.mark.parametrize("act,sw2,sb2", [("tanh", 1.76, 0.05), ("relu", 2.0, 0.0)])
def test_monte_carlo_backward_non_square(act, sw2, sb2):
    """Gradient second moments through a non-square stack (n_in != n_out):
    the seed's n_out gamma^2 per layer. 10% tolerance (3 nets x 8 inputs)."""
    widths = [600, 1500, 800, 1200, 1000, 700, 1400, 900, 1100, 1000, 1300]
    sims = [_simulate(widths, act, sw2, sb2, 1.0, 0.0, seed, batch=4) for seed in range(3)]
    gr = np.mean([s[2] for s in sims], 0)
    p = T.propagate(widths, act, sw2, sb2, q0=1.0)
    np.testing.assert_allclose(gr, p.grad_pre, rtol=0.10)
    assert p.grad_post[-1] == 1.0


def _jacobian_moments(act, sw2, sb2, q, depth, width, weights, seed):
    g = torch.Generator().manual_seed(seed)
    a = activations.get(act)
    fn = a.torch_fn()
    # input scaled so that the first pre-activation is already at q
    x = torch.randn(width, generator=g, dtype=torch.float64) * math.sqrt((q - sb2) / sw2)
    J = torch.eye(width, dtype=torch.float64)
    for _ in range(depth):
        if weights == "gaussian":
            W = torch.randn(width, width, generator=g, dtype=torch.float64) * math.sqrt(sw2 / width)
        else:
            Q, R = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
            W = Q * torch.sgn(torch.diagonal(R)) * math.sqrt(sw2)
        h = W @ x + torch.randn(width, generator=g, dtype=torch.float64) * math.sqrt(sb2)
        d = torch.as_tensor(a.dphi(h.numpy()))
        J = (d[:, None] * W) @ J
        x = fn(h)
    ev = torch.linalg.svdvals(J) ** 2
    return float(ev.mean()), float(ev.var())


@pytest.mark.parametrize("act,sb2", [("linear", 0.0), ("relu", 0.0), ("hardtanh", 0.05)])
@pytest.mark.parametrize("weights", ["gaussian", "orthogonal"])
def test_jacobian_spectrum_against_simulation(act, sb2, weights):
    """L = 8, width 400, 8 nets.  Net-to-net spread measured at this size: sd
    ~0.13 of the eigenvalue mean and ~28% of the variance per net, so with 8
    nets the tolerances 15% and 30% are about 3 standard errors; 0.05 absolute
    where theory says 0 (finite-width corrections are O(L / n))."""
    sw2 = T.critical_sigma_w2(act, sb2) if act != "linear" else 1.0
    q = 1.0 if act in ("linear", "relu") else T.fixed_point(act, sw2, sb2)
    th = T.jacobian_spectrum(act, sw2, sb2, 8, weights, q=q)
    sims = [_jacobian_moments(act, sw2, sb2, q, 8, 400, weights, s) for s in range(8)]
    mean, var = np.mean(sims, 0)
    assert mean == pytest.approx(th.mean, rel=0.15)
    if th.variance == 0:
        assert var < 0.05
    else:
        assert var == pytest.approx(th.variance, rel=0.30)


def test_propagate_validation():
    with pytest.raises(ValueError, match="widths needs at least two"):
        T.propagate([10], "tanh", 1.0)
    with pytest.raises(ValueError, match="one entry per layer"):
        T.propagate([10, 10, 10], "tanh", [1.0, 1.0, 1.0])
