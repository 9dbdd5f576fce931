"""``signalprop.init`` as a drop-in for ``torch.nn.init``.

The properties PyTorch's own ``test/nn/test_init.py`` asserts, with ``init``
bound to ``signalprop.init``: Kolmogorov-Smirnov tests of each
distribution's parameters (p > 1e-4, PyTorch's threshold; with the fixed
seeds below every p-value is fixed, so the test is deterministic and fails
only if a distribution's parameters are wrong), exact properties (eye,
dirac, orthogonal, constant, sparse), the errors (ValueError for
unsupported shapes and gains) and the warnings (zero-element tensors,
deprecated names).  Also: every public function of torch.nn.init exists here
with a signature that accepts torch's keywords.
"""

from __future__ import annotations

import inspect
import math
import random
from functools import reduce
from operator import mul

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import signalprop.init as init

P = 1e-4


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(123)
    torch.manual_seed(123)


def _nd(dims: int, lo: int, hi: int) -> torch.Tensor:
    return torch.zeros([random.randint(lo, hi) for _ in range(dims)])


def _f(a: float, b: float) -> float:
    return (b - a) * random.random() + a


def _is_normal(t, mean, std) -> bool:
    return stats.kstest(t.reshape(-1).tolist(), "norm", args=(mean, std)).pvalue > P


def _is_uniform(t, a, b) -> bool:
    return stats.kstest(t.reshape(-1).tolist(), "uniform", args=(a, b - a)).pvalue > P


def _is_trunc_normal(t, mean, std, a, b) -> bool:
    z = ((t.reshape(-1).double() - mean) / std).tolist()
    return stats.kstest(z, "truncnorm", args=((a - mean) / std, (b - mean) / std)).pvalue > P


PUBLIC = list(torch.nn.init.__all__)  # torch 2.13: 15 functions and 11 deprecated aliases (eye and dirac too)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_torch_function_exists_and_takes_torchs_keywords(name):
    ours, theirs = getattr(init, name), getattr(torch.nn.init, name)
    want = [p for p in inspect.signature(theirs).parameters.values() if p.kind != p.VAR_KEYWORD]
    if not name.endswith("_") and name != "calculate_gain":  # a deprecated alias: forwards *args, **kwargs
        with pytest.warns(FutureWarning):
            ours(torch.empty(4, 4, *([3] if name == "dirac" else [])),
                 *([0.5] if name == "sparse" else [1.0] if name == "constant" else []))
        return
    got = inspect.signature(ours).parameters
    for p in want:
        assert p.name in got, f"{name} lacks torch's parameter {p.name!r}"
        if p.default is not p.empty:
            assert got[p.name].default == p.default, f"{name}({p.name}=...) default differs from torch's"


def test_tensor_keyword_like_torch():
    t = torch.empty(20, 30)
    for fn in ("uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
               "kaiming_normal_", "orthogonal_", "ones_", "zeros_", "eye_"):
        assert getattr(init, fn)(tensor=t) is t
    assert init.constant_(tensor=t, val=3.0) is t and bool((t == 3).all())
    assert init.sparse_(tensor=t, sparsity=0.1) is t


def test_calculate_gain_values_and_errors():
    for fn in ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose2d", "conv_transpose3d", "sigmoid"):
        assert init.calculate_gain(fn) == 1
    assert init.calculate_gain("tanh") == 5 / 3
    assert init.calculate_gain("relu") == math.sqrt(2)
    assert init.calculate_gain("leaky_relu") == pytest.approx(1.4141428569978354, abs=0)
    assert init.calculate_gain("leaky_relu", 10) == pytest.approx(0.14071950894605836, abs=0)
    assert init.calculate_gain("selu") == 0.75
    for param in (True, [1], {"a": "b"}):
        with pytest.raises(ValueError):
            init.calculate_gain("leaky_relu", param)
    with pytest.raises(ValueError):
        init.calculate_gain("qzxv")


@pytest.mark.parametrize("dims", [1, 2, 4])
def test_uniform_and_normal(dims):
    t = _nd(dims, 30, 50)
    a = _f(-3, 3)
    b = a + _f(1, 5)
    init.uniform_(t, a=a, b=b)
    assert _is_uniform(t, a, b)
    mean, std = _f(-3, 3), _f(1, 5)
    init.normal_(t, mean=mean, std=std)
    assert _is_normal(t, mean, std)


def test_trunc_normal_generator_matches_global_rng():
    gen = torch.Generator().manual_seed(42)
    a = init.trunc_normal_(torch.empty(5), generator=gen)
    torch.manual_seed(42)
    b = init.trunc_normal_(torch.empty(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dims", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trunc_normal_bounds_and_distribution(dims, dtype):
    t = torch.zeros([random.randint(30, 50) for _ in range(dims)], dtype=dtype)
    mean, std = random.uniform(-3, 3), random.uniform(0.01, 1)
    a, b = random.uniform(mean - 2 * std, mean), random.uniform(mean, mean + 2 * std)
    init.trunc_normal_(t, mean=mean, std=std, a=a, b=b)
    assert t.min().item() >= torch.tensor(a, dtype=dtype).item()
    assert t.max().item() <= torch.tensor(b, dtype=dtype).item()
    assert _is_trunc_normal(t, mean, std, a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_trunc_normal_low_precision_narrow_interval_unique_values(dtype):
    t = torch.empty(10000, dtype=dtype)
    init.trunc_normal_(t, mean=0.0, std=1.0, a=-2.0, b=2.0)
    assert t.min().item() >= -2 and t.max().item() <= 2 and torch.isfinite(t).all()
    assert _is_trunc_normal(t.float(), 0.0, 1.0, -2.0, 2.0)
    assert t.unique().numel() > {torch.float16: 3000, torch.bfloat16: 1000}.get(dtype, 5000)
    if dtype != torch.bfloat16:  # bf16 has only 65 values in [2, 3]: visibly stepped
        init.trunc_normal_(t, mean=0.0, std=1.0, a=2.0, b=3.0)
        assert t.min().item() >= 2 and t.max().item() <= 3
        assert _is_trunc_normal(t.float(), 0.0, 1.0, 2.0, 3.0)
    init.trunc_normal_(t, mean=0.0, std=0.1, a=-2.0, b=2.0)  # never rounded onto the bounds
    assert int((t == -2).sum()) == 0 and int((t == 2).sum()) == 0


def test_constant_ones_zeros_eye():
    for dims in (1, 2, 4):
        t = _nd(dims, 1, 5)
        v = _f(1, 10)
        init.constant_(t, v)
        assert torch.equal(t, t.clone().fill_(v))
        init.ones_(t)
        assert bool((t == 1).all())
        init.zeros_(t)
        assert bool((t == 0).all())
    t = _nd(2, 1, 5)
    init.eye_(t)
    assert torch.equal(t, torch.eye(*t.shape))
    for dims in (1, 3):
        with pytest.raises(ValueError):
            init.eye_(_nd(dims, 1, 3))


def test_dirac_properties_and_identity():
    for dims in (3, 4, 5):
        for groups in (1, 2, 3):
            a, c, d, e = (random.randint(1, 5) for _ in range(4))
            b = random.randint(1, 5 * groups)
            t = torch.randn((a * groups, b, c, d, e)[:dims])
            init.dirac_(t, groups)
            n = min(t.shape[0] // groups, t.shape[1]) * groups
            assert torch.nonzero(t).shape[0] == n and t.sum().item() == n
    for groups in (1, 3):
        x = torch.randn(8, 3, 5, 5)
        w = torch.cat([torch.zeros(9 // groups, 3, 3, 3)] * groups)
        init.dirac_(w, groups)
        y = F.conv2d(x, w)
        per = 9 // groups
        for g in range(groups):
            assert torch.equal(y[:, per * g:per * g + 3], x[:, :, 1:-1, 1:-1])
            assert torch.count_nonzero(y[:, per * g + 3:per * (g + 1)]) == 0
    for dims in (1, 2, 6):
        with pytest.raises(ValueError):
            init.dirac_(_nd(dims, 1, 3))


@pytest.mark.parametrize("fn", ["xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_"])
def test_fan_initializers_refuse_fewer_than_two_dims_and_warn_on_empty(fn):
    for dims in (0, 1):
        with pytest.raises(ValueError):
            getattr(init, fn)(_nd(dims, 1, 1))
    if fn.startswith("kaiming"):
        with pytest.warns(UserWarning, match="Initializing zero-element tensors is a no-op"):
            getattr(init, fn)(torch.empty(0, 1))


def _fans(t):
    fi, fo = t.size(1), t.size(0)
    if t.dim() > 2:
        fi *= t[0, 0].numel()
        fo *= t[0, 0].numel()
    return fi, fo


@pytest.mark.parametrize("dims", [2, 4])
@pytest.mark.parametrize("use_gain", [True, False])
def test_xavier(dims, use_gain):
    t = _nd(dims, 20, 25)
    gain = _f(0.1, 2) if use_gain else 1.0
    fi, fo = _fans(t)
    std = gain * math.sqrt(2.0 / (fi + fo))
    init.xavier_uniform_(t, gain=gain)
    assert _is_uniform(t, -std * math.sqrt(3), std * math.sqrt(3))
    init.xavier_normal_(t, gain=gain)
    assert _is_normal(t, 0, std)


@pytest.mark.parametrize("dims", [2, 4])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("use_a", [True, False])
def test_kaiming(dims, mode, use_a):
    t = _nd(dims, 20, 25)
    a = _f(0.1, 2) if use_a else 0
    n = _fans(t)[0 if mode == "fan_in" else 1]
    std = math.sqrt(2.0 / ((1 + a**2) * n))
    init.kaiming_uniform_(t, a=a, mode=mode)
    assert _is_uniform(t, -std * math.sqrt(3), std * math.sqrt(3))
    init.kaiming_normal_(t, a=a, mode=mode)
    assert _is_normal(t, 0, std)


def test_sparse():
    for dims in (1, 3):
        with pytest.raises(ValueError):
            init.sparse_(_nd(dims, 1, 3), _f(0.1, 0.9))
    for use_std in (True, False):
        t = _nd(2, 30, 35)
        sparsity = _f(0.1, 0.2)
        std = _f(0.01, 0.2) if use_std else 0.01
        init.sparse_(t, sparsity=sparsity, std=std) if use_std else init.sparse_(t, sparsity=sparsity)
        for c in range(t.shape[1]):
            assert int((t[:, c] == 0).sum()) >= math.ceil(sparsity * t.shape[0])
        assert _is_normal(t[t != 0], 0, std)


def test_orthogonal():
    for use_gain in (True, False):
        for size in ([3, 4], [4, 3], [20, 2, 3, 4], [2, 3, 4, 5]):
            t = torch.zeros(size)
            gain = _f(0.1, 2) if use_gain else 1.0
            init.orthogonal_(t, gain=gain)
            rows, cols = size[0], reduce(mul, size[1:])
            w = t.view(rows, cols)
            prod = w.t() @ w if rows > cols else w @ w.t()
            torch.testing.assert_close(prod, torch.eye(min(rows, cols)) * gain**2, atol=1e-6, rtol=0)


def test_deprecated_names_warn():
    with pytest.warns(FutureWarning, match="deprecated"):
        init.normal(torch.randn(3, 3))


def test_scaled_trunc_normal_keeps_the_result_std_meaning():
    g = torch.Generator().manual_seed(0)
    t = init.scaled_trunc_normal_(torch.empty(200, 200), std=0.5, bound=2.0, generator=g)
    # the result's std is 0.5 (the pre-truncation std is 0.5 / 0.8796): within 1% at 40,000 samples
    assert t.std().item() == pytest.approx(0.5, rel=0.01)
    assert t.abs().max().item() <= 2.0 * 0.5 / 0.87962566103423978 + 1e-6


def test_the_earlier_bound_form_still_means_what_it_meant():
    a = torch.empty(200, 200)
    with pytest.warns(FutureWarning, match="scaled_trunc_normal_"):
        init.trunc_normal_(a, std=0.5, bound=2.0, generator=torch.Generator().manual_seed(0))
    b = init.scaled_trunc_normal_(torch.empty(200, 200), std=0.5, bound=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
