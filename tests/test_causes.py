"""The fix a problem suggests follows its cause (issue 26): a residual
stream that grows with depth is fixed by scaling the branches, not by
rescaling every weight -- and following the advice does fix it."""

import torch
from torch import nn

import signalprop as sp


class Res(nn.Module):
    def __init__(self, blocks=100, width=64, marked=False):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        for b in self.blocks:
            for layer in b:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight)
            if marked:
                sp.init.mark_residual(b)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_a_growing_residual_stream_is_told_to_scale_its_branches():
    """100 Kaiming residual blocks, no normalisation: E[y^2] grows by ~1.5x a
    block; the advice names Fixup/SkipInit, and following it (the marked
    branches, scale_residual_) keeps the stream at its input's scale (Fixup
    zeroes each branch's last layer, so the stream is the input at first)."""
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    r = sp.check(Res(), x)
    assert r.verdict == "exploding"
    fix = r.problems[0].suggestion
    assert "residual branches" in fix and "scale_residual_" in fix and "Fixup" in fix
    torch.manual_seed(0)
    m = Res(marked=True)
    sp.init.scale_residual_(m, "fixup")
    fixed = sp.check(m, x)
    assert fixed.verdict != "exploding"
    assert max(layer.forward_second_moment for layer in fixed.layers) < 10 * float(x.square().mean())


def test_a_plain_deep_net_that_explodes_keeps_the_weight_scale_advice():
    """The control: no residual sums, so the weights' scale is the cause."""
    torch.manual_seed(0)
    layers = []
    for _ in range(30):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    m = nn.Sequential(*layers)
    for layer in m:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.4)
    r = sp.check(m, torch.randn(64, 64))
    assert r.verdict == "exploding" and "residual" not in r.problems[0].suggestion
    assert "rescale" in r.problems[0].suggestion
