"""apply_ and torch_default_ over whole models."""

import math

import pytest
import torch
from torch import nn

import signalprop as sp


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x):
        return x * self.scale


def zoo():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(300, 200), nn.Tanh(), nn.Conv2d(8, 16, 3, groups=4), nn.ConvTranspose2d(16, 8, 4, stride=2),
        nn.LSTM(40, 50), nn.MultiheadAttention(64, 4), nn.LayerNorm(64), nn.BatchNorm1d(8),
        nn.Embedding(500, 32), nn.Bilinear(5, 7, 3), Custom(),
    )


@pytest.mark.parametrize("scheme", ["xavier_normal", "xavier_uniform", "kaiming_normal", "kaiming_uniform",
                                    "lecun_normal", "lecun_uniform", "orthogonal"])
def test_apply_sets_each_parameter_by_its_fans(scheme):
    m = zoo()
    s = sp.init.apply_(m, scheme, generator=torch.Generator().manual_seed(0))
    params = dict(m.named_parameters())
    for rec in s.params:
        t = params[rec.name].detach()
        if rec.distribution == "zeros":
            assert torch.count_nonzero(t) == 0
        elif rec.distribution == "ones":
            assert torch.all(t == 1)
        else:
            # mean square within 10% (>= 1,000 entries per block here, relative SE <= 5%) or exact
            blocks = t.chunk(int(rec.note.split()[0]), 0) if rec.note else (t,)
            for b in blocks:
                if b.numel() >= 1000:
                    assert float((b.double() ** 2).mean()) == pytest.approx(rec.std**2, rel=0.1), rec
    assert s.skipped == ("10.scale",)
    assert torch.equal(m[10].scale, torch.full((3,), 2.0))  # unknown module untouched


def test_apply_activation_gain_and_summary_table():
    m = nn.Sequential(nn.Linear(400, 300), nn.Tanh())
    s = sp.init.apply_(m, "kaiming_normal", activation="tanh", generator=torch.Generator().manual_seed(0))
    assert s.params[0].std == pytest.approx(sp.init.gain("tanh") / math.sqrt(400))
    text = str(s)
    assert "0.weight" in text and "fan_in" in text and "gain 1.59254" in text


def test_apply_per_gate_fans_lstm():
    lstm = nn.LSTM(10, 400)
    sp.init.apply_(lstm, "xavier_normal", generator=torch.Generator().manual_seed(0))
    # each of the 4 gate blocks of weight_hh has variance 2/(400+400), not 2/(400+1600)
    for block in lstm.weight_hh_l0.detach().chunk(4, 0):
        assert float(block.var()) == pytest.approx(1 / 400, rel=0.05)


def test_apply_orthogonal_rnn_blocks_are_orthogonal():
    rnn = nn.GRU(16, 32).double()
    sp.init.apply_(rnn, "orthogonal", generator=torch.Generator().manual_seed(0))
    for block in rnn.weight_hh_l0.detach().chunk(3, 0):
        assert torch.allclose(block @ block.T, torch.eye(32, dtype=torch.float64), atol=1e-6)


def test_apply_naive_normal_and_delta_orthogonal():
    m = nn.Sequential(nn.Linear(100, 100), nn.Conv2d(4, 8, 3))
    sp.init.apply_(m, "normal", generator=torch.Generator().manual_seed(0))
    assert float(m[0].weight.detach().std()) == pytest.approx(1.0, rel=0.05)
    sp.init.apply_(m, "normal(0.01)", generator=torch.Generator().manual_seed(0))
    assert float(m[0].weight.detach().std()) == pytest.approx(0.01, rel=0.05)
    sp.init.apply_(m, "delta_orthogonal")
    w = m[1].weight.detach()
    assert torch.count_nonzero(w[:, :, [0, 2]]) == 0 and torch.count_nonzero(w[:, :, 1, [0, 2]]) == 0


def test_bad_input_changes_nothing():
    m = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(8, 4, 3))  # second layer: in > out
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="unknown scheme 'glorot'; choose one of"):
        sp.init.apply_(m, "glorot")
    with pytest.raises(ValueError, match="1.weight: delta_orthogonal needs out_channels >= in_channels"):
        sp.init.apply_(m, "delta_orthogonal")
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_torch_default_reproduces_torch_constructors():
    for make in (lambda: nn.Linear(30, 20), lambda: nn.Conv2d(3, 8, 3), lambda: nn.ConvTranspose2d(8, 3, 4),
                 lambda: nn.Embedding(10, 4), lambda: nn.LSTM(5, 7), lambda: nn.Bilinear(3, 4, 5)):
        torch.manual_seed(3)
        ref = make()
        torch.manual_seed(3)
        ours = make()
        with torch.no_grad():
            for p in ours.parameters():
                p.zero_()
        torch.manual_seed(3)
        # same draws in the same order from the global generator as the constructor
        sp.init.torch_default_(ours)
        for (n, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
            assert torch.equal(a, b), (make, n)
