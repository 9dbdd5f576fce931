"""Exact properties, reproducibility, dtype/device preservation, edge cases and errors."""

import math

import pytest
import torch

import signalprop as sp
from conftest import DEVICES

ALL = [
    lambda t, g: sp.init.variance_scaling_(t, generator=g),
    lambda t, g: sp.init.xavier_normal_(t, generator=g),
    lambda t, g: sp.init.xavier_uniform_(t, generator=g),
    lambda t, g: sp.init.kaiming_normal_(t, generator=g),
    lambda t, g: sp.init.kaiming_uniform_(t, generator=g),
    lambda t, g: sp.init.lecun_normal_(t, generator=g),
    lambda t, g: sp.init.lecun_uniform_(t, generator=g),
    lambda t, g: sp.init.trunc_normal_(t, generator=g),
    lambda t, g: sp.init.scaled_trunc_normal_(t, generator=g),
    lambda t, g: sp.init.orthogonal_(t, generator=g),
    lambda t, g: sp.init.delta_orthogonal_(t, generator=g),
]


@pytest.mark.parametrize("shape", [(64, 64), (100, 30), (30, 100), (16, 8, 3, 3)])
@pytest.mark.parametrize("g", [1.0, 0.5, 2.0])
def test_orthogonal_exact(shape, g):
    w = sp.init.orthogonal_(torch.empty(shape, dtype=torch.float64), g,
                            generator=torch.Generator().manual_seed(0)).reshape(shape[0], -1)
    rows, cols = w.shape
    gram = w @ w.T if rows <= cols else w.T @ w
    assert torch.allclose(gram, g * g * torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 8, 3), (16, 16, 3, 3), (8, 4, 3, 5, 3), (8, 8, 4, 4)])
def test_delta_orthogonal_centre_tap(shape):
    w = sp.init.delta_orthogonal_(torch.empty(shape, dtype=torch.float64), 1.7,
                                  generator=torch.Generator().manual_seed(0))
    centre = tuple((k - 1) // 2 for k in shape[2:])
    tap = w[(slice(None), slice(None)) + centre]
    assert torch.allclose(tap.T @ tap, 1.7**2 * torch.eye(shape[1], dtype=torch.float64), atol=1e-6)
    rest = w.clone()
    rest[(slice(None), slice(None)) + centre] = 0
    assert torch.count_nonzero(rest) == 0


def test_delta_orthogonal_norm_preserving_conv():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False).double()
    sp.init.delta_orthogonal_(conv.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = conv(x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), atol=1e-10)


def test_delta_orthogonal_errors():
    with pytest.raises(ValueError, match=r"out_channels >= in_channels, got 4 < 8"):
        sp.init.delta_orthogonal_(torch.empty(4, 8, 3, 3))
    with pytest.raises(ValueError, match="Conv1d/2d/3d weight"):
        sp.init.delta_orthogonal_(torch.empty(4, 8))


@pytest.mark.parametrize("fn", range(len(ALL)))
def test_generator_reproducible(fn):
    a, b = torch.empty(16, 8, 3, 3), torch.empty(16, 8, 3, 3)
    ALL[fn](a, torch.Generator().manual_seed(7))
    ALL[fn](b, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    ALL[fn](b, torch.Generator().manual_seed(8))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("fn", range(len(ALL)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_dtype_and_device_kept(fn, dtype, device):
    t = torch.zeros(32, 16, 3, 3, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    out = ALL[fn](t, gen)
    assert out is t and t.dtype == dtype and t.device.type == device
    assert torch.isfinite(t).all() and t.float().std() > 0


@pytest.mark.parametrize("fn", range(len(ALL) - 1))
def test_zero_element_warns_and_does_nothing(fn):
    t = torch.empty(0, 5)
    with pytest.warns(UserWarning, match="zero-element tensors is a no-op"):
        ALL[fn](t, None)


def test_no_autograd_tracking():
    w = torch.nn.Parameter(torch.empty(10, 10))
    sp.init.xavier_normal_(w)
    assert w.grad_fn is None and w.requires_grad


def test_errors_name_value_and_allowed_set():
    t = torch.empty(4, 4)
    with pytest.raises(ValueError, match=r"mode must be one of \('fan_in', 'fan_out', 'fan_avg'\), got 'fan'"):
        sp.init.variance_scaling_(t, mode="fan")
    with pytest.raises(ValueError, match=r"distribution must be one of .*got 'gauss'"):
        sp.init.variance_scaling_(t, distribution="gauss")
    with pytest.raises(ValueError, match="scale must be a positive finite number, got -1"):
        sp.init.variance_scaling_(t, scale=-1)
    with pytest.raises(ValueError, match="floating tensor"):
        sp.init.xavier_normal_(torch.empty(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        sp.init.orthogonal_(torch.empty(4))
    with pytest.raises(ValueError, match="mode must be one of"):
        sp.init.gain("tanh", mode="sideways")
    with pytest.raises(ValueError, match="unknown activation 'tanhh'"):
        sp.init.gain("tanhh")


def test_uniform_variance_identity():
    """The seed: U(-a, a) has variance a^2/3 (signalprop's uniform_, n = 1e6, 5 SE)."""
    a = 0.37
    x = sp.init.uniform_(torch.empty(1_000_000, dtype=torch.float64), -a, a, generator=torch.Generator().manual_seed(0))
    assert abs(float(x.var()) / (a * a / 3) - 1) < 5 * math.sqrt(0.8 / x.numel())


def test_seed_algebra_by_simulation():
    """Linear layer with n_in != n_out and weight variance gamma^2:
    Var(out) ~= n_in gamma^2 Var(in), Var(d/d in) ~= n_out gamma^2 Var(d/d out).
    Tolerance 5%: 2000 samples x 100-400 units give relative SE < 0.5%."""
    g = torch.Generator().manual_seed(0)
    n_in, n_out, gamma2 = 400, 100, 0.02
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * math.sqrt(gamma2)
    x = (torch.randn(2000, n_in, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    y = x @ w.T
    cot = torch.randn(2000, n_out, generator=g, dtype=torch.float64) * 0.5
    y.backward(cot)
    assert float(y.detach().var()) == pytest.approx(n_in * gamma2 * 1.5**2, rel=0.05)
    assert float(x.grad.var()) == pytest.approx(n_out * gamma2 * 0.5**2, rel=0.05)
    # Xavier's variance sits between the two conditions' variances 1/n_in and 1/n_out.
    xv = float(sp.init.xavier_normal_(torch.empty(n_out, n_in, dtype=torch.float64),
                                      generator=g).var())
    assert 1 / n_in < xv < 1 / n_out
