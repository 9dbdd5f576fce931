"""Distribution tests: KS against the exact law (fixed seeds), sample variance
against the formula, and two-sample tests against torch.nn.init.

Thresholds: with fixed seeds each test is deterministic; p > 1e-3 is the
KS acceptance level (a correct sampler fails it with probability 1e-3 per
seed, so a fixed passing seed stays passing), and sample variances must be
within 5 standard errors (relative SE of a variance estimate: sqrt(2/n) for
normal samples, sqrt(0.8/n) for uniform ones).
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import signalprop as sp
from signalprop.init import fans

SHAPES = [(300, 200), (200, 300), (64, 32, 3, 3), (48, 16, 5)]
P_MIN = 1e-3


def _draw(fn, shape, seed=0, **kw):
    t = torch.empty(shape, dtype=torch.float64)
    fn(t, generator=torch.Generator().manual_seed(seed), **kw)
    return t.flatten().numpy()


def _var_ok(x, var, uniform=False):
    se = math.sqrt((0.8 if uniform else 2.0) / x.size)
    assert abs(x.var() / var - 1) < 5 * se, (x.var(), var)


@pytest.mark.parametrize("shape", SHAPES)
def test_xavier_normal_matches_seed_formula(shape):
    fi, fo = fans(torch.empty(shape))
    x = _draw(sp.init.xavier_normal_, shape, gain=1.3)
    var = 1.3**2 * 2 / (fi + fo)  # the digest's variance 2/(n_in+n_out), not its std
    assert stats.kstest(x, stats.norm(scale=math.sqrt(var)).cdf).pvalue > P_MIN
    _var_ok(x, var)


@pytest.mark.parametrize("shape", SHAPES)
def test_xavier_uniform_bound_and_variance(shape):
    fi, fo = fans(torch.empty(shape))
    a = 0.7 * math.sqrt(6 / (fi + fo))
    x = _draw(sp.init.xavier_uniform_, shape, gain=0.7)
    assert np.abs(x).max() <= a
    assert stats.kstest(x, stats.uniform(-a, 2 * a).cdf).pvalue > P_MIN
    _var_ok(x, a * a / 3, uniform=True)  # U(-a, a) has variance a^2/3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_kaiming(shape, mode):
    fi, fo = fans(torch.empty(shape))
    fan = fi if mode == "fan_in" else fo
    std = math.sqrt(2.0 / (1 + 0.1**2)) / math.sqrt(fan)
    x = _draw(sp.init.kaiming_normal_, shape, a=0.1, mode=mode)
    assert stats.kstest(x, stats.norm(scale=std).cdf).pvalue > P_MIN
    b = math.sqrt(3) * std
    u = _draw(sp.init.kaiming_uniform_, shape, a=0.1, mode=mode)
    assert stats.kstest(u, stats.uniform(-b, 2 * b).cdf).pvalue > P_MIN


@pytest.mark.parametrize("shape", SHAPES)
def test_lecun_normal_is_variance_corrected_truncated_normal(shape):
    fi, _ = fans(torch.empty(shape))
    x = _draw(sp.init.lecun_normal_, shape)
    s = math.sqrt(1 / fi) / 0.87962566103423978
    assert np.abs(x).max() <= 2 * s + 1e-12
    assert stats.kstest(x, stats.truncnorm(-2, 2, scale=s).cdf).pvalue > P_MIN
    _var_ok(x, 1 / fi)  # the *result* has variance 1/fan_in


def test_lecun_uniform():
    x = _draw(sp.init.lecun_uniform_, (300, 200))
    a = math.sqrt(3 / 200)
    assert stats.kstest(x, stats.uniform(-a, 2 * a).cdf).pvalue > P_MIN


@pytest.mark.parametrize("bound", [1.0, 2.0, 3.0])
def test_scaled_trunc_normal_result_has_requested_std(bound):
    x = _draw(sp.init.scaled_trunc_normal_, (400, 250), std=0.3, bound=bound)
    s = 0.3 / math.sqrt(stats.truncnorm.var(-bound, bound))
    assert stats.kstest(x, stats.truncnorm(-bound, bound, scale=s).cdf).pvalue > P_MIN
    _var_ok(x, 0.09)


def test_truncation_constant_matches_jax_tf():
    assert sp.init.truncation_std(2.0) == pytest.approx(0.87962566103423978, abs=1e-15)


@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
@pytest.mark.parametrize("dist", ["truncated_normal", "normal", "uniform", "orthogonal"])
@pytest.mark.parametrize("shape", [(300, 200), (64, 32, 3, 3)])
def test_variance_scaling_variance(mode, dist, shape):
    fi, fo = fans(torch.empty(shape))
    fan = {"fan_in": fi, "fan_out": fo, "fan_avg": (fi + fo) / 2}[mode]
    x = _draw(sp.init.variance_scaling_, shape, scale=2.5, mode=mode, distribution=dist)
    if dist == "orthogonal":  # entries of a scaled orthogonal matrix: mean square exact
        assert (x**2).mean() == pytest.approx(2.5 / fan, rel=1e-10)
    else:
        _var_ok(x, 2.5 / fan, uniform=dist == "uniform")


TORCH_PAIRS = [
    (lambda t, g: sp.init.xavier_normal_(t, 1.5, generator=g), lambda t, g: torch.nn.init.xavier_normal_(t, 1.5, generator=g)),
    (lambda t, g: sp.init.xavier_uniform_(t, 1.5, generator=g), lambda t, g: torch.nn.init.xavier_uniform_(t, 1.5, generator=g)),
    (lambda t, g: sp.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu", generator=g),
     lambda t, g: torch.nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu", generator=g)),
    (lambda t, g: sp.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g),
     lambda t, g: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)),
    (lambda t, g: sp.init.orthogonal_(t, 0.8, generator=g), lambda t, g: torch.nn.init.orthogonal_(t, 0.8, generator=g)),
    # torch's std is before truncation and its bounds are absolute.
    (lambda t, g: sp.init.scaled_trunc_normal_(t, std=0.5 * 0.87962566103423978, bound=2.0, generator=g),
     lambda t, g: torch.nn.init.trunc_normal_(t, std=0.5, a=-1.0, b=1.0, generator=g)),
    # and with torch's meaning under torch's name
    (lambda t, g: sp.init.trunc_normal_(t, mean=0.2, std=0.5, a=-0.3, b=1.1, generator=g),
     lambda t, g: torch.nn.init.trunc_normal_(t, mean=0.2, std=0.5, a=-0.3, b=1.1, generator=g)),
    (lambda t, g: sp.init.sparse_(t, 0.3, std=0.1, generator=g) if t.dim() == 2 else sp.init.normal_(t, 0, 0.1, g),
     lambda t, g: torch.nn.init.sparse_(t, 0.3, std=0.1, generator=g) if t.dim() == 2 else
     torch.nn.init.normal_(t, 0, 0.1, g)),
    (lambda t, g: sp.init.uniform_(t, -0.4, 0.9, generator=g), lambda t, g: torch.nn.init.uniform_(t, -0.4, 0.9, g)),
]


@pytest.mark.parametrize("pair", range(len(TORCH_PAIRS)))
@pytest.mark.parametrize("shape", [(256, 128), (32, 16, 3, 3)])
def test_two_sample_against_torch(pair, shape):
    ours, theirs = TORCH_PAIRS[pair]
    a, b = torch.empty(shape), torch.empty(shape)
    ours(a, torch.Generator().manual_seed(1))
    theirs(b, torch.Generator().manual_seed(2))
    assert stats.ks_2samp(a.flatten().numpy(), b.flatten().numpy()).pvalue > P_MIN


def test_calculate_gain_is_torch_table():
    """torch's documented values, written out (not read back from torch)."""
    for nl, p, want in [("linear", None, 1.0), ("conv2d", None, 1.0), ("sigmoid", None, 1.0), ("tanh", None, 5 / 3),
                        ("relu", None, math.sqrt(2)), ("leaky_relu", None, math.sqrt(2 / (1 + 0.01**2))),
                        ("leaky_relu", 0.2, math.sqrt(2 / (1 + 0.2**2))), ("selu", None, 0.75)]:
        assert sp.init.calculate_gain(nl, p) == pytest.approx(want, rel=1e-15)
    with pytest.raises(ValueError, match="Unsupported nonlinearity"):
        sp.init.calculate_gain("bogus")
