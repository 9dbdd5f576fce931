"""Fans for every layer kind (with an empirical oracle) and gains for any activation."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special
from torch import nn

import signalprop as sp
from signalprop import activations
from signalprop.init import fans


def torch_fans(w):
    # torch's rule, written out (we do not import torch's private helper)
    rf = math.prod(w.shape[2:])
    return w.shape[1] * rf, w.shape[0] * rf


@pytest.mark.parametrize("module,name,expected", [
    (nn.Linear(10, 20), "weight", (10, 20)),
    (nn.Conv1d(4, 8, 3), "weight", (12, 24)),
    (nn.Conv2d(8, 16, 3, groups=4), "weight", (18, 36)),
    (nn.Conv2d(8, 24, (3, 5), groups=8), "weight", (15, 45)),  # depthwise, multiplier 3
    (nn.Conv3d(2, 4, 3), "weight", (54, 108)),
    (nn.ConvTranspose2d(8, 4, 4, stride=2), "weight", (32, 64)),
    (nn.ConvTranspose1d(6, 4, 3, groups=2), "weight", (9, 6)),
    (nn.Embedding(100, 16), "weight", (1, 1)),
    (nn.Bilinear(5, 7, 3), "weight", (35, 21)),
    (nn.LSTM(10, 20), "weight_ih_l0", (10, 20)),
    (nn.LSTM(10, 20), "weight_hh_l0", (20, 20)),
    (nn.GRU(10, 20, num_layers=2), "weight_ih_l1", (20, 20)),
    (nn.RNN(10, 20), "weight_hh_l0", (20, 20)),
    (nn.MultiheadAttention(16, 4), "in_proj_weight", (16, 16)),
    (nn.MultiheadAttention(16, 4, kdim=8, vdim=6), "k_proj_weight", (8, 16)),
])
def test_fans_per_layer_kind(module, name, expected):
    assert fans(module, name) == expected


def test_bare_tensor_rule():
    assert fans(torch.empty(20, 10)) == (10, 20)
    assert fans(torch.empty(16, 8, 3, 3)) == (72, 144)
    assert fans(torch.empty(7)) == (7, 7)
    assert fans(torch.empty(())) == (1, 1)


def test_where_torch_is_wrong():
    """Grouped convs: torch's fan_out is `groups` times too large; transposed
    convs: torch swaps the fans (and ignores stride and groups)."""
    conv = nn.Conv2d(8, 16, 3, groups=4)
    assert torch_fans(conv.weight)[1] == 4 * fans(conv)[1]
    assert torch_fans(conv.weight)[0] == fans(conv)[0]
    convt = nn.ConvTranspose2d(8, 4, 3)  # stride 1, groups 1: only the swap
    assert torch_fans(convt.weight) == fans(convt)[::-1]


def _empirical_fan_in(module, x):
    """Output variance with N(0,1) weights, zero bias and N(0,1) input = fan_in
    (interior positions only for convolutions, where no zero padding enters)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.normal_(generator=g)
            else:
                p.zero_()
        y = module(*x) if isinstance(x, tuple) else module(x)
    return y


def test_empirical_fans_grouped_and_transposed():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(8, 16, 3, groups=4).double()
    y = _empirical_fan_in(conv, torch.randn(64, 8, 12, 12, generator=g, dtype=torch.float64))
    assert float(y.var()) == pytest.approx(fans(conv)[0], rel=0.05)
    # Transposed, stride 2, kernel 4: interior outputs sum over in * (4/2)^2 taps.
    convt = nn.ConvTranspose2d(8, 4, 4, stride=2).double()
    y = _empirical_fan_in(convt, torch.randn(64, 8, 10, 10, generator=g, dtype=torch.float64))
    assert float(y[..., 4:-4, 4:-4].var()) == pytest.approx(fans(convt)[0], rel=0.05)
    assert torch_fans(convt.weight)[0] != fans(convt)[0]
    # fan_out of the grouped conv: gradient w.r.t. an interior input under a unit cotangent.
    conv2 = nn.Conv2d(8, 16, 3, groups=4, padding=1).double()
    _empirical_fan_in(conv2, torch.zeros(1, 8, 3, 3, dtype=torch.float64))
    x = torch.randn(64, 8, 12, 12, generator=g, dtype=torch.float64, requires_grad=True)
    out = conv2(x)
    out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64))
    assert float(x.grad[..., 2:-2, 2:-2].var()) == pytest.approx(fans(conv2)[1], rel=0.05)


def test_empirical_fans_bilinear():
    g = torch.Generator().manual_seed(2)
    bil = nn.Bilinear(5, 7, 30).double()
    x1 = torch.randn(4000, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4000, 7, generator=g, dtype=torch.float64)
    y = _empirical_fan_in(bil, (x1.detach(), x2))
    assert float(y.var()) == pytest.approx(fans(bil)[0], rel=0.05)
    out = bil(x1, x2)
    out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64))
    assert float(x1.grad.var()) == pytest.approx(fans(bil)[1], rel=0.05)


# ---- gains -----------------------------------------------------------------

def _quad(f):
    return integrate.quad(lambda z: f(np.array(z)) * np.exp(-z * z / 2) / math.sqrt(2 * math.pi),
                          -np.inf, np.inf, points=None, epsabs=1e-14, epsrel=1e-13, limit=400)[0]


def _quad_split(f, kinks):
    pts = sorted({0.0, *kinks})
    g = lambda z: float(f(np.array(z))) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    edges = [-np.inf, *pts, np.inf]
    return sum(integrate.quad(g, a, b, epsabs=1e-14, epsrel=1e-13, limit=400)[0]
               for a, b in zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("name", activations.names())
def test_gain_against_scipy_quad(name):
    a = activations.get(name)
    fwd = 1 / math.sqrt(_quad_split(lambda x: a.phi(x) ** 2, a.kinks))
    bwd = 1 / math.sqrt(_quad_split(lambda x: a.dphi(x) ** 2, a.kinks))
    assert sp.init.gain(name) == pytest.approx(fwd, abs=1e-10)
    assert sp.init.gain(name, "backward") == pytest.approx(bwd, abs=1e-10)


def test_gain_closed_forms():
    assert sp.init.gain("relu") == pytest.approx(math.sqrt(2), abs=1e-14)
    assert sp.init.gain("relu", "backward") == pytest.approx(math.sqrt(2), abs=1e-14)
    assert sp.init.gain("linear") == pytest.approx(1.0, abs=1e-14)
    assert sp.init.gain(nn.LeakyReLU(0.2)) == pytest.approx(math.sqrt(2 / 1.04), abs=1e-14)
    # erf: E[erf(z)^2] = (2/pi) arcsin(2/3)
    assert sp.init.gain("erf") == pytest.approx(1 / math.sqrt(2 / math.pi * math.asin(2 / 3)), abs=1e-12)
    # hardtanh: E[min(z^2, 1)] = (2 Phi(1) - 1) - 2 phi(1) + 2 (1 - Phi(1))
    phi1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
    m = (2 * special.ndtr(1) - 1) - 2 * phi1 + 2 * (1 - special.ndtr(1))
    assert sp.init.gain("hardtanh") == pytest.approx(1 / math.sqrt(m), abs=1e-12)
    assert sp.init.gain("selu") == pytest.approx(1.0, abs=1e-6)  # self-normalizing


def test_gain_differs_from_torch_table_as_documented():
    assert sp.init.gain("tanh") == pytest.approx(1.5925, abs=1e-4)
    assert sp.init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert sp.init.gain("sigmoid") == pytest.approx(1.8462, abs=1e-4)
    assert sp.init.calculate_gain("sigmoid") == 1.0


@pytest.mark.parametrize("act,ref", [
    (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"),
    (nn.Tanh(), "tanh"), (nn.ELU(), "elu"), (nn.Mish(), "mish"), (nn.Softplus(), "softplus"),
])
def test_gain_of_modules_equals_registry(act, ref):
    assert sp.init.gain(act) == pytest.approx(sp.init.gain(ref), abs=1e-12)


def test_gain_of_any_callable():
    # torch function (autograd derivative), numpy lambda (finite differences), unknown module
    assert sp.init.gain(torch.tanh) == pytest.approx(sp.init.gain("tanh"), abs=1e-12)
    assert sp.init.gain(torch.tanh, "backward") == pytest.approx(sp.init.gain("tanh", "backward"), abs=1e-10)
    assert sp.init.gain(lambda x: np.tanh(x), "backward") == pytest.approx(
        sp.init.gain("tanh", "backward"), abs=1e-8)
    assert sp.init.gain(nn.Hardswish()) == pytest.approx(
        1 / math.sqrt(_quad_split(lambda x: (x * np.clip(x + 3, 0, 6) / 6) ** 2, (-3.0, 3.0))), abs=1e-8)
