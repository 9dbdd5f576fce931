"""Vanishing through time inside a recurrent module (issue 26): nn.LSTM,
nn.GRU and nn.RNN are one row each, so the gradient's decay along the
sequence was averaged away.  The per-step gradient at the module's input is
compared with autograd's own x.grad (the oracle), and the verdict with the
mechanism: a forget-gate bias of -10 closes the cell state's path."""

import pytest
import torch
from torch import nn

import signalprop as sp


class LastStep(nn.Module):
    """A recurrent module over T steps, the output read at the last step only."""

    def __init__(self, cell="LSTM", forget_bias=None):
        super().__init__()
        self.rnn = getattr(nn, cell)(16, 32, batch_first=True)
        self.head = nn.Linear(32, 1)
        if forget_bias is not None:  # PyTorch's gate order: input, forget, cell, output
            with torch.no_grad():
                self.rnn.bias_ih_l0[32:64] = forget_bias / 2
                self.rnn.bias_hh_l0[32:64] = forget_bias / 2

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def _oracle(m, x):
    """Per time step, the RMS of d out / d x_t under the check's own cotangent."""
    from signalprop.probe.inputs import cotangent

    x = x.clone().requires_grad_(True)
    y = m(x)
    y.backward(cotangent(y))
    m.zero_grad(set_to_none=True)
    return x.grad.square().mean(dim=(0, 2)).sqrt()


@pytest.mark.parametrize("cell,forget_bias,fix", [("LSTM", -10.0, "forget-gate bias to 1"),
                                                  ("GRU", None, "orthogonal recurrent weights")])
def test_vanishing_through_time_is_found_and_measured(cell, forget_bias, fix):
    torch.manual_seed(0)
    m = LastStep(cell, forget_bias)
    x = torch.randn(8, 200, 16)
    r = sp.check(m, x)
    rms = _oracle(m, x)
    row = r.layers[0]
    assert row.kind == cell and row.time_steps == 200
    assert row.time_grad_ratio == pytest.approx(float(rms.min() / rms.max()), rel=1e-5, abs=1e-30)
    assert row.time_horizon == int((rms >= rms.max() * 1e-6).sum())
    assert row.time_horizon < 40  # the mechanism: a product of per-step factors below 1
    assert r.verdict == "vanishing"
    p = r.problems[0]
    assert p.layer == "rnn" and "through time" in p.message and fix in p.suggestion


def test_lstm_with_forget_bias_one_reaches_further():
    """Jozefowicz et al.'s fix, measured: the horizon more than doubles."""
    horizons = {}
    for fb in (-10.0, 1.0):
        torch.manual_seed(0)
        horizons[fb] = sp.check(LastStep("LSTM", fb), torch.randn(8, 200, 16)).layers[0].time_horizon
    assert horizons[1.0] > 2 * horizons[-10.0], horizons


def test_an_output_at_every_step_is_not_vanishing_through_time():
    """The control: with a gradient arriving at every step (check's default
    unit cotangent on the whole output sequence), each step's input gets its
    own step's gradient; no time-wise verdict."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.LSTM(16, 32, batch_first=True))
    r = sp.check(m, torch.randn(8, 200, 16))
    assert r.layers[0].time_grad_ratio > 1e-2 and r.verdict == "healthy"


class PackedLast(nn.Module):
    """An LSTM over a PackedSequence of sequences of different lengths, read
    out at each sequence's last step (how variable-length batches are fed)."""

    def __init__(self, forget_bias):
        super().__init__()
        self.rnn = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 1)
        with torch.no_grad():
            self.rnn.bias_ih_l0[32:64] = forget_bias / 2
            self.rnn.bias_hh_l0[32:64] = forget_bias / 2

    def forward(self, x, lengths):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        y, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        y, _ = pad_packed_sequence(y, batch_first=True)
        return self.head(y[torch.arange(x.shape[0]), lengths - 1])


def test_vanishing_through_time_on_a_packed_sequence():
    """A PackedSequence input was skipped (no per-step statistics, verdict
    healthy). Per step the RMS over the sequences still running at that step,
    against autograd's gradient at the padded input's valid positions."""
    from signalprop.probe.inputs import cotangent

    torch.manual_seed(0)
    lengths = torch.tensor([120, 97, 120, 64, 110, 33, 120, 80])
    x = torch.randn(8, 120, 16)
    for fb, vanishing in ((-10.0, True), (1.0, False)):
        torch.manual_seed(0)
        m = PackedLast(fb)
        r = sp.check(m, (x, lengths))
        xg = x.clone().requires_grad_(True)
        y = m(xg, lengths)
        y.backward(cotangent(y))
        valid = torch.arange(120)[None, :] < lengths[:, None]  # (batch, step)
        sq = (xg.grad.square().sum(2) * valid).sum(0)
        rms = (sq / (valid.sum(0) * 16)).sqrt()
        row = r.layers[0]
        assert row.kind == "LSTM" and row.time_steps == 120
        assert row.time_grad_ratio == pytest.approx(float(rms.min() / rms.max()), rel=1e-4, abs=1e-30)
        assert row.time_horizon == int((rms >= rms.max() * 1e-6).sum())
        assert (r.verdict == "vanishing" and "through time" in r.problems[0].message) == vanishing, r.verdict
