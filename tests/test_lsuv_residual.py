"""LSUV in one pass, execution order; residual scaling (Fixup, SkipInit)."""

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop.lab.models import DeepMLP, ResMLP


@pytest.fixture(autouse=True)
def _seeded():
    """Inputs drawn with torch.randn below come from a fixed global seed."""
    torch.manual_seed(0)


def batch(n, d=64, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def layer_vars(model, x, per_channel=False):
    out = []
    hooks = [m.register_forward_hook(lambda mod, a, o: out.append(o.detach()))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [float(o.var(unbiased=False)) if not per_channel else o.var(dim=0, unbiased=False) for o in out]


def test_lsuv_two_passes_and_held_out_variance():
    """Calibrated on one batch of 1024, every layer's output variance on a
    held-out batch of 1024 is within tol = 0.1 of the target (the held-out
    sampling error of a layer variance is ~2% here)."""
    torch.manual_seed(0)
    m = DeepMLP(30, 128, "relu", 64, 10)
    s = sp.init.lsuv_(m, batch(1024), tol=0.1, generator=torch.Generator().manual_seed(0))
    assert s.forward_passes == 2
    assert [layer.note for layer in s.layers].count("rescaled, verified") == 31
    for v in layer_vars(m, batch(1024, seed=9)):
        assert abs(v - 1.0) <= 0.1


class Shuffled(nn.Module):
    """Registered b, a, c; executed a, b, c (registration order != execution order)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(64, 64)
        self.a = nn.Linear(64, 64)
        self.c = nn.Linear(64, 64)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x)))))


def test_lsuv_execution_order_and_modes():
    m = Shuffled()
    m.train()
    m.act.eval()
    s = sp.init.lsuv_(m, batch(512), target=2.0, tol=0.02)
    assert [layer.name for layer in s.layers] == ["a", "b", "c"]
    for v in layer_vars(m, batch(512)):
        assert v == pytest.approx(2.0, rel=0.02)
    assert m.training and not m.act.training


def test_lsuv_per_channel_mean_correction_inplace_and_buffers():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3))
    x = torch.randn(64, 3, 10, 10, generator=torch.Generator().manual_seed(0)) + 0.5
    running = m[1].running_mean.clone()
    s = sp.init.lsuv_(m, x, per_channel=True, mean_correction=True, tol=0.01)
    assert torch.equal(m[1].running_mean, running)  # buffers untouched
    with torch.no_grad():
        y = m[0](x)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(var, torch.ones(8), atol=0.01) and torch.allclose(mean, torch.zeros(8), atol=1e-4)
    assert s.forward_passes <= 3


def test_lsuv_restores_weights_on_failure():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            self.l(x)
            raise RuntimeError("boom")

    m = Boom()
    w = m.l.weight.clone()
    with pytest.raises(RuntimeError, match="boom"):
        sp.init.lsuv_(m, torch.randn(8, 4))
    assert torch.equal(m.l.weight, w)
    with pytest.raises(ValueError, match="need 0 < target < inf"):
        sp.init.lsuv_(m, torch.randn(8, 4), tol=2.0)


def test_fixup_thousand_blocks_keep_signal():
    torch.manual_seed(0)
    m = ResMLP(1000, 32, "relu", 64, 10)
    s = sp.init.apply_(m, "kaiming_normal", residual="fixup", generator=torch.Generator().manual_seed(0))
    assert "fixup: 1000 residual branches" in s.notes[0]
    b0 = m.blocks[0].branch
    assert torch.count_nonzero(b0[2].weight) == 0
    r = sp.check(m, batch(32))
    assert r.verdict == "healthy"
    # without the scaling the residual stream's variance doubles per block
    torch.manual_seed(0)
    bad = ResMLP(30, 32, "relu", 64, 10)
    sp.init.apply_(bad, "kaiming_normal", generator=torch.Generator().manual_seed(0))
    assert sp.check(bad, batch(32)).verdict == "exploding"


def test_fixup_scale_value_and_skipinit():
    m = nn.Sequential(*[sp.init.ScaledResidual(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
                        for _ in range(16)])
    sp.init.apply_(m, "kaiming_normal", generator=torch.Generator().manual_seed(0))
    w = m[0].branch[0].weight.detach().clone()
    sp.init.scale_residual_(m, "fixup")
    assert torch.allclose(m[0].branch[0].weight, w * 16 ** -0.5)  # L^(-1/(2m-2)), m = 2
    sp.init.scale_residual_(m, "skipinit")
    assert all(float(b.alpha.detach()) == 0.0 for b in m)
    with pytest.raises(ValueError, match="no residual branches found"):
        sp.init.apply_(nn.Sequential(nn.Linear(2, 2)), "kaiming_normal", residual="fixup")
    with pytest.raises(ValueError, match="residual must be one of"):
        sp.init.apply_(m, "kaiming_normal", residual="rezero")
