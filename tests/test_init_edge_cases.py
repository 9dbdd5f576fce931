"""Init edge cases that used to do the wrong thing silently."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import signalprop as sp


@pytest.mark.parametrize("module, message", [
    (nn.Softmax(dim=-1), "not elementwise"),
    (nn.RReLU(), "different outputs"),
    (nn.PReLU(num_parameters=4), "4 slopes"),
    (nn.GLU(), "elementwise"),
])
def test_gain_refuses_what_is_not_an_elementwise_function(module, message):
    with pytest.raises(ValueError, match=message):
        sp.init.gain(module)


def test_gain_of_prelu_uses_its_current_slope():
    m = nn.PReLU(init=0.3)
    slope = float(m.weight.detach())  # 0.3 in float32
    assert sp.init.gain(m) == pytest.approx(math.sqrt(2 / (1 + slope**2)), rel=1e-12)
    with torch.no_grad():
        m.weight.fill_(0.1)
    slope = float(m.weight.detach())
    assert sp.init.gain(m) == pytest.approx(math.sqrt(2 / (1 + slope**2)), rel=1e-12)
    assert sp.init.gain(nn.RReLU().eval()) > 1  # deterministic in eval mode: a leaky ReLU


@pytest.mark.parametrize("act", [nn.Hardswish, nn.ReLU6])
def test_critical_resolves_activations_the_table_does_not_name(act):
    """A 60-layer MLP of Hardswish/ReLU6 used to be initialised as if linear
    (it then vanished); resolved from the module's own function, it is
    critical: the gradient ratio first/last layer stays within 10x."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(60):
        layers += [nn.Linear(128, 128), act()]
    model = nn.Sequential(*layers)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    s = sp.init.critical_(model, x, generator=torch.Generator().manual_seed(0))
    assert not any("unknown activation" in n for n in s.notes)
    r = sp.check(model, x)
    assert r.verdict == "healthy"
    assert 0.1 < r.summary.first_last_grad_ratio < 10


def test_critical_says_when_an_activation_is_unknown():
    model = nn.Sequential(nn.Linear(16, 16), nn.Softmax(dim=-1), nn.Linear(16, 4))
    s = sp.init.critical_(model, torch.randn(32, 16))
    assert any("unknown activation(s) Softmax" in n for n in s.notes)
