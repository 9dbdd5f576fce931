"""signalprop.monitor: bit-identical training, the step and module of a planted
NaN, alerts before divergence, hooks removed, AGC against the paper's formula."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.clip import agc_, agc_reference_


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(0.2),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model, steps, mon=None, accumulate=1, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = _data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        for part in range(accumulate):
            sl = slice(part * len(x) // accumulate, (part + 1) * len(x) // accumulate)
            loss = F.cross_entropy(model(x[sl]), y[sl]) / accumulate
            loss.backward()
        if mon is not None:
            mon.step(loss)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("every,accumulate", [(1, 1), (3, 1), (2, 2)])
def test_training_is_bit_identical_with_and_without_the_monitor(every, accumulate):
    """Dropout draws from the global RNG and BatchNorm updates buffers in
    train mode: any draw, write or mode change by the monitor would show."""
    a, b = _net(), _net()
    torch.manual_seed(123)
    _train(a, 12, accumulate=accumulate)
    rng_plain = torch.get_rng_state()
    torch.manual_seed(123)
    with sp.monitor(b, every=every) as mon:
        _train(b, 12, mon, accumulate=accumulate)
    rng_monitored = torch.get_rng_state()
    assert len(mon.history) == len(range(0, 12, every))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    for x, y in zip(a.buffers(), b.buffers()):
        assert torch.equal(x, y)
    # the global generator advanced exactly as in the unmonitored run (Dropout drew the same numbers)
    assert torch.equal(rng_plain, rng_monitored)


def test_hooks_are_gone_after_close():
    m = _net()
    mon = sp.monitor(m, every=1)
    _train(m, 2, mon)
    mon.close()
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, mod
    from torch.nn.modules import module as M

    assert not M._global_forward_hooks and not M._global_forward_pre_hooks  # the recorder's are global
    with pytest.raises(RuntimeError, match="closed"):
        mon.step(torch.tensor(1.0))


def test_sampled_steps_measure_the_first_training_forward_only():
    """With gradient accumulation (two forwards) and an evaluation pass under
    no_grad before the training forward, a sampled step has one row per
    module call of one training forward, with gradients."""
    m = _net()
    x, y = _data()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with sp.monitor(m, every=1) as mon:
        for _ in range(2):
            with torch.no_grad():
                m(x)
            opt.zero_grad()
            for half in (x[:32], x[32:]):
                F.cross_entropy(m(half), y[:32]).backward()
            mon.step()
            opt.step()
    h = mon.history[-1]
    assert [layer.name for layer in h.layers] == ["0", "1", "2", "3", "4", "5", "6"]
    assert all(layer.grad_rms is not None and layer.shape[0] == 32 for layer in h.layers)


class _LogOf(nn.Module):
    def forward(self, x):
        return torch.log(x + 10.0)  # NaN where x < -10


class _SqrtOf(nn.Module):
    def forward(self, x):
        return torch.sqrt(x * x + 0.0)  # finite forward; infinite derivative where x == 0


def _planted(kind):
    torch.manual_seed(0)
    mid = _LogOf() if kind == "forward" else _SqrtOf()
    return nn.Sequential(nn.Linear(4, 16, bias=False), nn.LeakyReLU(0.1), nn.Linear(16, 16, bias=False), mid,
                         nn.Linear(16, 1))


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_planted_nan_is_named_with_its_step_and_module(phase):
    """At step 7 (not a sampled step: every=50) the batch makes module '3'
    produce NaN (log of values below 0) or, in the backward variant, an
    infinite derivative (sqrt at exactly 0, from an all-zero batch through
    bias-free layers).  The alert names step 7, module '3' and the phase.
    (log(x + 10) of a batch scaled by 1e3: pre-activations of order -1e2.)"""
    m = _planted(phase)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with sp.monitor(m, every=50, grad_every=1) as mon:
        for step in range(10):
            x = torch.randn(16, 4, generator=g)
            if step == 7:
                x = x * 1e3 if phase == "forward" else torch.zeros_like(x)
            loss = m(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            if step == 7:
                break
            opt.step()
    nf = [a for a in mon.alerts if a.kind == "non-finite"]
    assert len(nf) == 1
    a = nf[0]
    assert (a.step, a.layer, a.phase) == (7, "3", phase), a
    assert "step 7" in a.message


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target)


def test_a_diverging_run_alerts_before_its_first_nonfinite_loss():
    """A 6-layer ReLU MLP (He init) on digits with SGD, momentum 0.9, at
    learning rate 0.3 diverges within 300 steps (step 70 on one machine, 90
    on another: the trajectory is chaotic, so only the property is asserted).
    The first loss or gradient alert comes at least 10 steps before the first
    non-finite loss; the same net at learning rate 0.03 trains for 300 steps
    without any alert."""
    x, y = _digits()

    def run(lr):
        torch.manual_seed(0)
        layers = [nn.Linear(64, 128), nn.ReLU()]
        for _ in range(4):
            layers += [nn.Linear(128, 128), nn.ReLU()]
        m = nn.Sequential(*layers, nn.Linear(128, 10))
        sp.init.apply_(m, "kaiming_normal", generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        first_bad = None
        with sp.monitor(m, every=20) as mon:
            for step in range(300):
                idx = torch.randint(0, len(x), (64,), generator=g)
                loss = F.cross_entropy(m(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                mon.step(loss)
                opt.step()
                if not math.isfinite(loss.item()):
                    first_bad = step
                    break
        return first_bad, mon.alerts

    bad, alerts = run(0.3)
    assert bad is not None and alerts
    assert alerts[0].step <= bad - 10, alerts[0]
    # the gradient overflows one step before the loss does: that step is named
    assert any(a.kind == "non-finite" and a.step in (bad - 1, bad) for a in alerts)
    ok_bad, ok_alerts = run(0.03)
    assert ok_bad is None and ok_alerts == [], ok_alerts


@pytest.mark.parametrize("every", [1, 3])
def test_update_ratio_matches_the_sgd_step(every):
    """Plain SGD changes w by lr * g: the ratio recorded for a sample is
    ||lr g|| / ||w|| of each module for the optimizer step after it (taken
    on the step after the sample, read on the next; tensors this small are
    read whole, in float64, so to 1e-9); with every=1 each sample gets the
    next step's."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(10, 6, dtype=torch.float64)
    with sp.monitor(m, every=every) as mon:
        expected = {}
        for step in range(3):
            loss = m(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if step == 1:
                for name in ("0", "2"):
                    mod = m.get_submodule(name)
                    g2 = sum(float((0.1 * p.grad).pow(2).sum()) for p in mod.parameters())
                    w2 = sum(float(p.detach().pow(2).sum()) for p in mod.parameters())
                    expected[name] = math.sqrt(g2 / w2)
            mon.step(loss)
            # the update is taken on the step after a sample, not on the sample itself, and read on
            # the next (with every=1, step 2 also takes it again for sample 1)
            assert (mon._updates.snapshot is not None) == (step == 1 or (step == 2 and every == 1))
            opt.step()
    got = dict(mon.history[0].update_ratios)
    assert set(got) == set(expected)
    for name, v in expected.items():
        assert got[name] == pytest.approx(v, rel=1e-9)


def test_each_samples_update_is_exact_also_after_a_weight_is_replaced():
    """Every sample's ratio is ||lr g|| / ||w|| of the step after it (plain
    SGD, float64, to 1e-9: these tensors are read whole, in float64), and a
    weight replaced by one of another shape before a sample's update is
    taken is measured as the new tensor."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    expected = {}
    with sp.monitor(m, every=3) as mon:
        for step in range(13):
            if step == 7:  # a wider output layer (a parameter of another shape) before sample 6's update is taken
                m[2] = nn.Linear(5, 3).double()
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            loss = m(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if step % 3 == 1:  # the step after a sample: its update is the sample's
                for name in ("0", "2"):
                    mod = m.get_submodule(name)
                    g2 = sum(float((0.1 * p.grad).pow(2).sum()) for p in mod.parameters())
                    w2 = sum(float(p.detach().pow(2).sum()) for p in mod.parameters())
                    expected[(step - 1, name)] = math.sqrt(g2 / w2)
            mon.step(loss)
            opt.step()
    assert [h.step for h in mon.history if h.update_ratios] == [0, 3, 6, 9]  # 12's update is never taken
    for h in mon.history[:4]:
        got = dict(h.update_ratios)
        for name in ("0", "2"):
            assert got[name] == pytest.approx(expected[(h.step, name)], rel=1e-9), (h.step, name)


def test_cpu_gradient_reads_fall_on_the_sampled_steps():
    """On the CPU the gradient norms are read every few steps; the default
    interval divides ``every`` when it can (4 to 6), so the sampled steps,
    which read them anyway, are among the reads."""
    from signalprop.monitor.core import grad_interval

    assert [grad_interval(e) for e in (1, 4, 7, 10, 12, 18, 25, 30, 50, 100)] == [4, 4, 4, 5, 4, 6, 5, 5, 5, 4]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(10, 6)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with sp.monitor(m, every=10) as mon:
        for _ in range(21):
            loss = m(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    assert mon.grad_every == 5
    assert [k for k, g in zip(mon.steps, mon.grad_norms) if g is not None] == [0, 5, 10, 15, 20]


def test_autocast_and_report_outputs(tmp_path):
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x, y = _data()
    with sp.monitor(m, every=2) as mon:
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    r = mon.report()
    assert len(r.history) == 2 and r.steps == (0, 1, 2, 3)
    assert r.history[0].layers[0].forward_second_moment > 0
    p = r.save_html(tmp_path / "mon.html")
    assert "class='sp-figure'" in p.read_text()
    import json

    d = json.loads(r.to_json(tmp_path / "mon.json"))
    assert d["every"] == 2 and len(d["history"]) == 2
    assert "step" in str(r)


def test_bad_arguments_are_clear_errors():
    m = _net()
    with pytest.raises(ValueError, match="every"):
        sp.monitor(m, every=0)
    with pytest.raises(ValueError, match="agc"):
        sp.monitor(m, agc=-1)
    with pytest.raises(TypeError, match="nn.Module"):
        sp.monitor("model")
    with sp.monitor(m) as mon:
        F.cross_entropy(m(_data()[0]), _data()[1]).backward()
        with pytest.raises(ValueError, match="scalar loss"):
            mon.step(torch.ones(2))


# -- adaptive gradient clipping ------------------------------------------------

def _unitwise_numpy(a):
    a = np.asarray(a, dtype=np.float64)
    if a.ndim <= 1:
        return np.sqrt((a**2).sum())
    return np.sqrt((a**2).reshape(a.shape[0], -1).sum(1)).reshape((-1,) + (1,) * (a.ndim - 1))


@pytest.mark.parametrize("clipping,eps", [(0.05, 1e-3), (1e-4, 1e-3)])
def test_agc_equals_the_papers_formula(clipping, eps):
    """Against the formula written out in numpy (float64), on Linear, Conv2d,
    biases and a LayerNorm, with gradients scaled so that some units clip and
    others do not; agc_ (fused) and agc_reference_ (per tensor) both, and the
    two bit for bit.  clipping * eps = 1e-7 takes the fused function's exact
    per-tensor branch (its min(., 1) form equals the paper's only from 1e-6)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LayerNorm(8 * 4 * 4), nn.Linear(128, 10)).double()
    for p in m.parameters():
        p.grad = torch.randn_like(p) * torch.logspace(-4, 1, p.shape[0], dtype=p.dtype).reshape(
            (-1,) + (1,) * (p.dim() - 1))
    want = []
    for p in m.parameters():
        w, g = p.detach().numpy(), p.grad.numpy()
        max_norm = np.maximum(_unitwise_numpy(w), eps) * clipping
        gn = _unitwise_numpy(g)
        want.append(np.where(gn > max_norm, g * max_norm / np.maximum(gn, 1e-6), g))
    grads = [p.grad.clone() for p in m.parameters()]
    agc_(m.parameters(), clipping=clipping, eps=eps)
    fused = [p.grad.clone() for p in m.parameters()]
    for p, g in zip(m.parameters(), grads):
        p.grad = g.clone()
    agc_reference_(m.parameters(), clipping=clipping, eps=eps)
    clipped_some = False
    for w, a, b, g in zip(want, fused, [p.grad for p in m.parameters()], grads):
        np.testing.assert_allclose(a.numpy(), w, rtol=1e-12, atol=0)
        np.testing.assert_allclose(b.numpy(), w, rtol=1e-12, atol=0)
        assert torch.equal(a, b)
        clipped_some |= not np.allclose(w, g.numpy())
    assert clipped_some


@pytest.mark.parametrize("clipping,eps", [(0.05, 1e-3), (1e-4, 1e-3)])
def test_agc_of_a_sparse_gradient_equals_the_dense_formula(clipping, eps):
    """An nn.Embedding(sparse=True) gradient (uncoalesced: a token met twice
    is two entries of one row) is clipped as its dense equivalent is by
    agc_reference_ (float64, to 1e-12), stays sparse, and some rows clip
    while others do not; a 3-D parameter's sparse gradient with two sparse
    dimensions (units spanning index rows) is clipped as the dense one too.
    The monitor's agc= on such a model measures every step (before, the
    sparse norm raised inside mon.step and no step was measured)."""
    torch.manual_seed(0)
    e = nn.Embedding(20, 6, sparse=True).double()
    with torch.no_grad():
        e.weight.mul_(torch.logspace(-3, 1, 20, dtype=torch.float64).view(-1, 1))
    ids = torch.tensor([[1, 3, 3, 7], [7, 12, 19, 1]])
    (e(ids) * torch.randn(2, 4, 6, dtype=torch.float64)).sum().backward()
    assert e.weight.grad.is_sparse and not e.weight.grad.is_coalesced()
    dense = e.weight.grad.to_dense()
    agc_([e.weight], clipping=clipping, eps=eps)
    assert e.weight.grad.is_sparse
    ref = nn.Parameter(e.weight.detach().clone())
    ref.grad = dense.clone()
    agc_reference_([ref], clipping=clipping, eps=eps)
    torch.testing.assert_close(e.weight.grad.to_dense(), ref.grad, rtol=1e-12, atol=0)
    assert not torch.equal(ref.grad, dense) and not torch.equal(ref.grad[1], torch.zeros(6, dtype=torch.float64))
    w3 = nn.Parameter(torch.randn(4, 3, 5, dtype=torch.float64))
    g3 = torch.randn(4, 3, 5, dtype=torch.float64) * 10
    g3[1] = 0
    w3.grad = g3.to_sparse(2)
    r3 = nn.Parameter(w3.detach().clone())
    r3.grad = g3.clone()
    agc_([w3], clipping=clipping, eps=eps)
    agc_reference_([r3], clipping=clipping, eps=eps)
    assert w3.grad.is_sparse
    torch.testing.assert_close(w3.grad.to_dense(), r3.grad, rtol=1e-12, atol=0)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.out = nn.Embedding(50, 8, sparse=True), nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.e(x).mean(1))

    m = Bag()
    opts = [torch.optim.SparseAdam(list(m.e.parameters()), lr=1e-2), torch.optim.SGD(m.out.parameters(), lr=0.1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sp.monitor(m, every=2, agc=0.01) as mon:
            for _ in range(4):
                loss = m(torch.randint(0, 50, (8, 5))).pow(2).mean()
                for o in opts:
                    o.zero_grad()
                loss.backward()
                mon.step(loss)
                for o in opts:
                    o.step()
    assert mon.steps == [0, 1, 2, 3] and len(mon.history) == 2


def test_monitor_agc_clips_before_the_optimizer():
    m = _net()
    x, y = _data()
    with sp.monitor(m, every=10, agc=1e-4) as mon:
        F.cross_entropy(m(x), y).backward()
        raw = [p.grad.clone() for p in m.parameters()]
        mon.step()
    # with clipping 1e-4 every unit's gradient is at most 1e-4 x its weight norm (floored at 1e-3)
    from signalprop.clip import unitwise_norm

    for p in m.parameters():
        limit = unitwise_norm(p.detach()).clamp_min(1e-3) * 1e-4
        assert (unitwise_norm(p.grad) <= limit * (1 + 1e-5)).all()
    assert sum(not torch.equal(p.grad, g) for p, g in zip(m.parameters(), raw)) >= 4


def test_lab_monitor_quick_run(tmp_path):
    """`lab run monitor --quick`: the ReLU MLP at learning rate 0.3 diverges,
    an alert comes first, AGC (0.01) keeps the same run finite; files saved."""
    from signalprop.lab.registry import run_experiment

    res = run_experiment("monitor", tmp_path, quick=True)
    run = res["runs"]["mlp"]
    bad, fixed = run["diverging"], run["agc"]
    assert bad["first_nonfinite"] is not None and bad["first_alert"] is not None
    assert bad["first_alert"] < bad["first_nonfinite"]
    assert fixed["first_nonfinite"] is None and math.isfinite(fixed["losses"][-1])
    assert (tmp_path / "monitor.png").stat().st_size > 10_000
    assert (tmp_path / "monitor-mlp.html").exists() and (tmp_path / "results.json").exists()


class _Writer:
    """Records what a SummaryWriter would be asked to write."""

    def __init__(self):
        self.scalars, self.texts = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


def test_writer_gets_stable_tags_per_layer_and_alerts():
    m = _net()
    w = _Writer()
    x, y = _data()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with sp.monitor(m, every=2, writer=w, grad_every=1) as mon:
        for _ in range(4):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    tags = {t for t, _, _ in w.scalars}
    assert {"signalprop/loss", "signalprop/grad_norm", "signalprop/grad_rms/0", "signalprop/saturation/2",
            "signalprop/forward_second_moment/6", "signalprop/update_ratio/0"} <= tags
    assert sorted({s for t, _, s in w.scalars if t == "signalprop/grad_rms/0"}) == [0, 2]
    assert sorted(s for t, _, s in w.scalars if t == "signalprop/loss") == [0, 1, 2, 3]
    assert w.texts == []


def test_close_releases_the_model_and_keeps_the_history():
    """A closed monitor kept to read its history holds no reference to the
    model (nor to a process group): under DDP a lingering one kept the
    group alive into interpreter exit, where its threads aborted."""
    import gc
    import weakref

    m = _net()
    x, y = _data(16)
    with sp.monitor(m, every=1) as mon:
        for _ in range(2):
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            mon.step(loss)
            m.zero_grad()
    refs = [weakref.ref(m), weakref.ref(m[0])]  # the model and a module with weights (whose update was measured)
    del m, loss  # (the last loss's graph holds the sampled rows' gradient hooks, and through them their modules)
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert len(mon.history) == 2 and mon.report().model


def test_update_ratio_judged_only_for_weights_at_initialisation_scale():
    """A layer that starts at zero (adaLN-Zero, ControlNet's zero convolutions)
    and a LayerScale at 1e-6 are rewritten by their first updates by design:
    their update/weight ratio is near 1 on the step after the sample, yet no
    update-too-large alert names them; an initialised layer stepped at 0.1 of
    its norm or more does get one (same run, its own learning rate)."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.zero = nn.Linear(8, 8)
            nn.init.zeros_(self.zero.weight)
            nn.init.zeros_(self.zero.bias)
            self.out = nn.Linear(8, 8)
            self.gamma = nn.Parameter(torch.full((8,), 1e-6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.a(x))
            return self.zero(h) + self.gamma * h + self.out(h)

    torch.manual_seed(0)
    m = Net()
    x, t = torch.randn(32, 8), torch.randn(32, 8)
    opt = torch.optim.SGD([{"params": m.out.parameters(), "lr": 5.0},
                           {"params": [*m.a.parameters(), *m.zero.parameters(), m.gamma], "lr": 0.1}])
    with sp.monitor(m, every=2) as mon:
        for _ in range(5):
            loss = (m(x) - t).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    ratios = dict(mon.history[0].update_ratios)
    assert ratios["zero"] > 0.5 and ratios[""] > 0.5 and ratios["out"] > 0.1, ratios  # the premise
    assert dict(mon.history[1].update_ratios)["out"] > 0.1
    # the run's first optimizer step is not judged too large (Adam's moves every entry by the learning rate);
    # the rate the run keeps is, at the next sample's update
    assert [(a.kind, a.layer, a.step) for a in mon.alerts] == [("update-too-large", "out", 3)]


def test_established_scale():
    from signalprop.monitor.alerts import established

    for init in (nn.init.xavier_uniform_, nn.init.kaiming_normal_, lambda w: nn.init.normal_(w, std=0.02)):
        w = init(torch.empty(512, 768))
        assert established([w], [float(w.norm())])
    w = torch.full((512, 768), 1e-5)
    assert not established([w], [float(w.norm())])
    # a Linear's bias is not judged (its matrix is); a LayerNorm at (1, 0) has no matrix and a zero bias
    assert established([torch.ones(4, 4), torch.zeros(4)], [4.0, 0.0])
    assert not established([torch.ones(4), torch.zeros(4)], [2.0, 0.0])


def test_established_reads_a_transposed_convolutions_real_fan_in():
    """A ConvTranspose2d(64, 4, 3) weight is stored (64, 4, 3, 3): its fan-in
    is 64 * 9 = 576 (an output entry sums 64 channels x 9 taps), not the
    tensor rule's 4 * 9 = 36.  Weights at 0.2 / sqrt(576) RMS -- the scale
    of an initialization for that fan-in -- are established by its wiring
    and would not be by the tensor rule (threshold 0.1 / sqrt(36))."""
    from signalprop.layers import param_fan_ins
    from signalprop.monitor.alerts import established

    m = nn.ConvTranspose2d(64, 4, 3)
    fi = param_fan_ins(m)
    assert fi == {"weight": 576, "bias": 1}
    with torch.no_grad():
        m.weight.normal_(0, 0.2 / math.sqrt(576), generator=torch.Generator().manual_seed(0))
    norms = [float(m.weight.detach().norm()), float(m.bias.detach().norm())]
    assert established([m.weight, m.bias], norms, [fi["weight"], fi["bias"]])
    assert not established([m.weight, m.bias], norms)


def test_the_monitors_trend_is_the_drift_alerts_limit(monkeypatch):
    """Monitor(trend=) sets the factor by which a layer's relative gradient
    RMS may move from its baseline before an alert (it used to stop at
    check's verdicts while the alerts kept a fixed 100)."""
    from signalprop.monitor import alerts as A

    seen = []
    real = A.sampled_alerts
    monkeypatch.setattr(A, "sampled_alerts", lambda cur, hist, drift=A.DRIFT: seen.append(drift) or real(cur, hist, drift))
    m = _net()
    with sp.monitor(m, every=1, trend=7.0) as mon:
        _train(m, 3, mon)
    assert seen and set(seen) == {7.0}

    from signalprop.records import evolve

    base = mon.history[0]
    grown = evolve(base, layers=tuple(evolve(layer, relative_grad_rms=(layer.relative_grad_rms or 1) * 20,
                                             grad_rms=(layer.grad_rms or 1) * 20) for layer in base.layers))
    assert [a.kind for a in real(grown, [base], drift=7.0)] == ["exploding"]
    assert [a.kind for a in real(grown, [base])] == []  # 20x is within the default 100x


def test_sampled_alerts_index_the_baseline_by_name():
    """The drift and creep rules look each row up in the baseline samples:
    a row present in only one of them, or called twice (its first call
    counts), is judged against that; the lookup is by name, not a scan of
    every row per row (6.1 s a sample on a 4,000-row model before)."""
    from signalprop.monitor.alerts import sampled_alerts
    from signalprop.records import LayerStats, MonitorStep, evolve

    def sample(k, rows):
        layers = tuple(LayerStats(i, name, "Linear", i, (), 0.0, 1.0, 1.0, 0.0, 1e-3, relative_grad_rms=g,
                                  saturation=sat) for i, (name, g, sat) in enumerate(rows))
        return MonitorStep(k, 1.0, "healthy", layers, (), 1.0)

    base = [sample(0, [("a", 1.0, 0.1), ("b", 1.0, 0.1)]), sample(5, [("a", 1.0, 0.1), ("a", 50.0, 0.9)]),
            sample(10, [("a", 1.0, 0.1)])]
    now = sample(20, [("a", 500.0, 0.95), ("b", 1.0, 0.1)])
    now = MonitorStep(20, 1.0, "healthy", tuple(evolve(la, grad_rms=la.grad_rms * la.relative_grad_rms)
                                                for la in now.layers), (), 1.0)  # (the gradient itself grew too)
    kinds = {(a.kind, a.layer) for a in sampled_alerts(now, base)}
    assert kinds == {("exploding", "a"), ("saturated", "a")}


def test_a_relative_gradient_that_grew_as_the_output_gradient_fell_is_not_exploding():
    """(Outside stress test) Healthy ViTs (AdamW 1e-3, 250-500 steps,
    sampled every 10) got "exploding" at the patch embedding or the first
    LayerNorm in 6 of 9 runs: the output's gradient fell 4-10x with the loss
    while attention routed 10-30x more to the first block, and the relative
    gradient read 60-160x its baseline.  The gradient itself must have grown
    past the limit too: 105x relative from a 10x growth of the gradient and a
    10x fall of the output's is learning; 105x from a 105x growth is not."""
    from signalprop.monitor.alerts import sampled_alerts
    from signalprop.records import LayerStats, MonitorStep

    def sample(k, rel, g):
        layer = LayerStats(0, "patch", "Linear", 1, (), 0.0, 1.0, 1.0, 0.0, g, relative_grad_rms=rel)
        return MonitorStep(k, 1.0, "healthy", (layer,), (), 1.0)

    base = [sample(k, 1.0, 1e-4) for k in (0, 10, 20)]
    assert sampled_alerts(sample(250, 105.0, 1e-3), base) == []
    assert [a.kind for a in sampled_alerts(sample(250, 105.0, 1.05e-2), base)] == ["exploding"]


def test_update_ratios_follow_freezing_and_replaced_parameters():
    """The modules whose update is measured are found again when a parameter
    is frozen or replaced (the list is kept between samples): a frozen layer
    drops out of the next sample's update ratios, a replaced weight's update
    is of the new tensor (plain SGD: ||lr g|| / ||w||, float64, to 1e-9)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    with sp.monitor(m, every=3) as mon:
        expected = None
        for step in range(9):
            if step == 3:
                m[0].weight.requires_grad_(False)
                m[0].bias.requires_grad_(False)
            if step == 6:
                m[2].weight = nn.Parameter(torch.randn(2, 5, dtype=torch.float64))
            opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
            loss = m(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if step == 7:
                g2 = sum(float((0.1 * p.grad).pow(2).sum()) for p in m[2].parameters())
                w2 = sum(float(p.detach().pow(2).sum()) for p in m[2].parameters())
                expected = math.sqrt(g2 / w2)
            mon.step(loss)
            opt.step()
    names = [{n for n, _ in h.update_ratios} for h in mon.history]
    assert names == [{"0", "2"}, {"2"}, {"2"}]
    assert dict(mon.history[2].update_ratios)["2"] == pytest.approx(expected, rel=1e-9)


def test_update_ratios_name_a_module_wrapped_after_the_monitor_started():
    """Wrapping a module (a checkpoint or compile wrapper, here a container)
    keeps its parameters but changes its name: the update of a sample taken
    after it is recorded under the name that sample's rows have (a list of
    trained modules kept by parameter identity would keep the old name)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(10, 6)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with sp.monitor(m, every=2) as mon:
        for step in range(7):  # the update of sample 4 is taken at step 5 and read at step 6
            if step == 2:  # after the update of sample 0 was taken (the modules were listed then)
                m[2] = nn.Sequential(m[2])
            loss = m(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    assert [n for n, _ in mon.history[2].update_ratios] == ["0", "2.0"]
    assert mon.history[2].layers[-1].name == "2.0" and mon.history[2].layers[-1].update_rms > 0


@pytest.mark.parametrize("when", [0, 3])
def test_a_parametrised_layers_update_is_its_own_not_a_second_modules(when):
    """``spectral_norm`` (torch.nn.utils.parametrizations) moves a Linear's
    trained weight into ``0.parametrizations.weight.original``.  That
    tensor's update is the Linear's: ``0`` is listed once, with the update
    of its weight and bias together (plain SGD, float64: ||lr g|| / ||w||
    to 1e-9 over ``original`` and the bias), whether the parametrisation
    was there from the start or registered mid-run (the bug listed the
    container as a second module and left ``0`` with its bias's update)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    expected = None
    with sp.monitor(m, every=2) as mon:
        for step in range(7):  # sample 4's update is step 5's optimizer step, read at step 6
            if step == when:
                torch.nn.utils.parametrizations.spectral_norm(m[0])
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            loss = m(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if step == 5:
                ps = [m[0].parametrizations.weight.original, m[0].bias]
                expected = math.sqrt(sum(float((0.1 * p.grad).pow(2).sum()) for p in ps)
                                     / sum(float(p.detach().pow(2).sum()) for p in ps))
            mon.step(loss)
            opt.step()
    measured = [h for h in mon.history if h.update_ratios]
    assert [h.step for h in measured] == [0, 2, 4]
    for h in measured:
        assert [n for n, _ in h.update_ratios] == ["0", "2"], h.step
    assert dict(measured[-1].update_ratios)["0"] == pytest.approx(expected, rel=1e-9)
    first = next(layer for layer in measured[-1].layers if layer.name == "0")
    assert first.update_rms > 0
