"""Optimizer-aware signals (issue 27): the update RMS the optimizer applied,
Adam's second-moment lag (Wortsman et al. 2023b), update spikes, and
skip= on one bad batch."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from _loops import train_steps
from signalprop.monitor.optimizer import UPDATE_SPIKE

TEACHER = torch.randn(8, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _data(k, n=64):
    """A batch of a linear teacher's classes (learnable: the loss falls well below its start)."""
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
    return x, (x @ TEACHER).argmax(1)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def test_update_rms_and_adam_lag_match_an_independent_computation():
    """Oracle: the step after sample 0 (step 1) is taken by hand here -- the
    update RMS is ||w after - w before|| / sqrt(n) of each module, over the
    learning rate as well; Adam's lag is sqrt(mean(g^2 / v_hat)) with
    v_hat = (beta2 v + (1 - beta2) g^2) / (1 - beta2^t) formed from the
    optimizer's state *after* its step (torch's own v), eps^2 under the root.
    float64, so to 1e-9 (the lag's eps term is 1e-16 against v ~ 1e-4)."""
    m = _net()
    opt = torch.optim.AdamW(m.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    expected = {}
    with sp.monitor(m, every=10, optimizer=opt) as mon:
        for k in range(3):
            x, y = _data(k)
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            before = {n: p.detach().clone() for n, p in m.named_parameters()}
            opt.step()
            if k == 1:
                for name in ("0", "2"):
                    ps = [(n, p) for n, p in m.named_parameters() if n.startswith(name + ".")]
                    d2 = sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in ps)
                    numel = sum(p.numel() for _, p in ps)
                    q2, top = 0.0, 0.0
                    for _, p in ps:
                        st = opt.state[p]
                        v_hat = st["exp_avg_sq"] / (1 - 0.99 ** float(st["step"]))
                        q = p.grad.abs() / (v_hat + 1e-16).sqrt()
                        q2 += float(q.pow(2).sum())
                        top = max(top, float(q.max()))
                    expected[name] = (math.sqrt(d2 / numel), math.sqrt(q2 / numel), top)
    rows = {layer.name: layer for layer in mon.history[0].layers}
    for name, (rms, lag, top) in expected.items():
        assert rows[name].update_rms == pytest.approx(rms, rel=1e-9)
        assert rows[name].update_lr_rms == pytest.approx(rms / 0.01, rel=1e-9)
        assert rows[name].adam_lag_rms == pytest.approx(lag, rel=1e-9)
        assert rows[name].adam_lag_max == pytest.approx(top, rel=1e-9)
    assert rows["1"].update_rms is None  # Tanh has no parameters
    d = mon.history[0].to_dict()["layers"][0]
    assert {"update_rms", "update_lr_rms", "adam_lag_rms", "adam_lag_max"} <= set(d)


def test_sgd_has_an_update_rms_and_no_adam_lag_and_no_rate_without_the_optimizer():
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    with sp.monitor(m, every=10) as mon:  # the optimizer not given: no learning rate, no state read
        for k in range(3):
            x, y = _data(k)
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    row = mon.history[0].layers[0]
    assert row.update_rms > 0 and row.update_lr_rms is None and row.adam_lag_rms is None
    with pytest.raises(TypeError, match="optimizer takes a torch.optim.Optimizer"):
        sp.monitor(m, optimizer=object())


def _train(m, opt, mon, steps, boost_at=None, boost=1.0, corrupt_at=None):
    for k in range(steps):
        if k == boost_at:
            for g in opt.param_groups:
                g["lr"] *= boost
        x, y = _data(k)
        if k == corrupt_at:
            y = (y + 1) % 3  # every label wrong
            x = x * 4
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        mon.step(loss)
        opt.step()


def test_an_update_spike_is_alerted_relative_to_the_layers_own_updates():
    """SGD: the update of one step made 50x larger (its gradient scaled, as a
    spike in the loss landscape does; the learning rate unchanged) is alerted
    as update-spike at that step, naming a layer; the same run without it, and
    a 50x change of the learning rate itself (a schedule, when the monitor
    knows the optimizer), are not."""
    def run(scale_grad_at=None, boost_at=None):
        m = _net()
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        with sp.monitor(m, every=4, optimizer=opt) as mon:
            for k in range(60):
                if k == boost_at:
                    for g in opt.param_groups:
                        g["lr"] *= 50
                x, y = _data(k)
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                if k == scale_grad_at:
                    for p in m.parameters():
                        p.grad.mul_(50)
                mon.step(loss)
                opt.step()
        return [a for a in mon.alerts if a.kind == "update-spike"]

    spikes = run(scale_grad_at=41)  # step 41's update is measured for the sample at 40
    assert [a.step for a in spikes] == [41] and f"above {UPDATE_SPIKE:g}x" in spikes[0].message
    assert run() == []
    assert run(boost_at=41) == []


def test_skip_skips_one_bad_batch_and_says_so():
    """A healthy run meets one batch with every label wrong at step 60: the
    monitor calls it a batch-spike (not divergence), skip= keeps its gradient
    from the weights (bit-identical to skipping that step by hand), the
    alert says the step was skipped and the report lists it."""
    def batches():
        for k in range(80):
            x, y = _data(k)
            if k == 60:
                y = (y + 1) % 3
                x = x * 4
            yield x, y

    def train(m, opt, mon=None, skip_by_hand=None):
        train_steps(m, opt, batches(), mon, lambda k, loss: k != skip_by_hand)

    a, b = _net(), _net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    train(a, opt_a, skip_by_hand=60)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    with sp.monitor(b, every=10, skip=opt_b) as mon:
        train(b, opt_b, mon)
    assert mon.skipped == [60] and mon.report().skipped == (60,)
    (spike,) = [x for x in mon.alerts if x.step == 60]
    assert spike.kind == "batch-spike" and "skipped" in spike.message
    assert not [x for x in mon.alerts if x.kind in ("loss-spike", "non-finite")]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_adam_lag_of_a_large_tensor_is_read_at_a_stride_and_estimates_the_whole():
    """A 256 x 512 weight (131,072 entries) is read on every 8th entry
    (LAG_SAMPLE = 16,384): its RMS of g / sqrt(v_hat) is within 5% of the
    whole tensor's (a mean over 16k entries of a quantity near 1), and its
    max no larger than the whole's."""
    from signalprop.monitor.optimizer import LAG_SAMPLE, adam_lag
    from signalprop.probe.distributed import local

    torch.manual_seed(0)
    lin = nn.Linear(512, 256)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    x = torch.randn(64, 512)
    for _ in range(5):
        opt.zero_grad()
        lin(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    lin(x * 3).pow(2).mean().backward()  # a jump in the gradient: v lags behind it
    got = adam_lag(opt, [lin.weight], local)[0]
    st = opt.state[lin.weight]
    c = 1 - 0.999 ** (float(st["step"]) + 1)
    v_hat = (0.999 * st["exp_avg_sq"] + 0.001 * lin.weight.grad ** 2) / c
    q2 = lin.weight.grad ** 2 / (v_hat + 1e-16)
    assert lin.weight.numel() > 4 * LAG_SAMPLE
    assert float(got[0]) / math.sqrt(lin.weight.numel()) == pytest.approx(math.sqrt(float(q2.mean())), rel=0.05)
    assert float(got[0]) / math.sqrt(lin.weight.numel()) > 1.5  # the lag shows
    assert float(got[1]) <= math.sqrt(float(q2.max())) * (1 + 1e-6)


def test_adam_lag_of_a_complex_parameter_is_read_per_part():
    """torch's Adam steps a complex parameter as its real and imaginary parts,
    each with its own second moment: the lag is read the same way (it raised
    on the complex max before, and every step after a sample went
    unmeasured).  Oracle as above, on view_as_real of the gradient and of
    exp_avg_sq, the mean over the parts (float32: to 1e-5)."""

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.z = nn.Parameter(torch.randn(8, 4, dtype=torch.cfloat))

        def forward(self, x):
            return (x.to(torch.cfloat) @ self.z).abs()

    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.mix = nn.Linear(8, 8), Mix()

        def forward(self, x):
            return self.mix(self.a(x))

    torch.manual_seed(0)
    m = Complex()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(1)
    with sp.monitor(m, every=10, optimizer=opt) as mon:
        for k in range(3):
            loss = m(torch.randn(4, 8, generator=g)).sum()
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
            if k == 1:
                st = opt.state[m.mix.z]
                v_hat = torch.view_as_real(st["exp_avg_sq"]) / (1 - 0.99 ** float(st["step"]))
                q = torch.view_as_real(m.mix.z.grad).abs() / (v_hat + 1e-16).sqrt()
                lag = math.sqrt(float(q.pow(2).mean()))  # over the parts Adam steps: about 1 while v keeps up
    row = next(layer for layer in mon.history[0].layers if layer.name == "mix")
    assert row.update_rms > 0 and row.adam_lag_rms == pytest.approx(lag, rel=1e-5)
