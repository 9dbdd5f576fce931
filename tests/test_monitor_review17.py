"""Review 17 of the monitor: ``skip=`` with a loop that skips a step itself,
sparse gradients, and layers that get no gradient before the first one that
does.  Each test failed on the version before its fix."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import signalprop as sp
import signalprop.monitor.core as core
from _faults import NanBackward
from _loops import corrupted, train_steps


def _data(step, n=32):
    g = torch.Generator().manual_seed(1700 + step)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _train(model, opt, mon, steps):
    """``steps`` plain steps on :func:`_data`, ``mon.step`` between the backward and the optimizer's step."""
    for k in range(steps):
        x, y = _data(k)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        mon.step(loss)
        opt.step()


def _same(a, b):
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


# -- skip= and a step the loop did not take ------------------------------------------------------------


def _nan_loop(model, opt, mon=None, takes=lambda k, loss: math.isfinite(loss.item())):
    """Six steps, a NaN in step 2's batch; ``takes(k, loss)``: whether the loop
    takes step k's optimizer step (by default it guards against NaN itself)."""
    train_steps(model, opt, corrupted(_data, 6, 2, math.nan), mon, takes)


def test_a_skip_the_loop_took_itself_does_not_swallow_the_next_update():
    """skip=opt and a loop that skips the NaN step itself: the skip the NaN
    alert asked for is dropped at the next ``mon.step``, so the next, healthy
    update reaches the weights (the previous version swallowed it and listed
    the NaN step in ``skipped``): weights bit-identical to the loop alone,
    and nothing listed as skipped by the monitor."""
    a, b = _mlp(), _mlp()
    _nan_loop(a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9))
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    with sp.monitor(b, every=50, skip=opt_b) as mon:
        _nan_loop(b, opt_b, mon)
    assert [a.kind for a in mon.alerts if a.step == 2] == ["non-finite"]  # the skip was asked for
    assert mon.skipped == [] and mon.report().skipped == ()
    _same(a, b)


def test_a_gradscalers_own_skip_does_not_swallow_the_next_update():
    """skip=opt beside torch.amp.GradScaler: on an overflow step the scaler
    does not call ``opt.step()``; the monitor's skip for that step must not
    fall on the next finite step's update.  Weights bit-identical to the same
    loop without the monitor."""
    def train(model, opt, mon=None):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 21)  # the first steps overflow float16
        overflowed = []
        for k in range(8):
            x, y = _data(k, 64)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x * 3), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            overflowed.append(not all(torch.isfinite(p.grad).all() for p in model.parameters()))
            if mon is not None:
                mon.step(loss)
            scaler.step(opt)
            scaler.update()
        return overflowed

    a, b = _mlp(), _mlp()
    over_a = train(a, torch.optim.SGD(a.parameters(), lr=0.1))
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    with sp.monitor(b, every=50, skip=opt_b) as mon:
        over_b = train(b, opt_b, mon)
    assert over_a == over_b and over_a[0] and not all(over_a)  # an overflow, then finite steps
    assert any(a.kind == "non-finite" for a in mon.alerts)
    assert mon.skipped == []  # the scaler skipped those steps, not the monitor
    _same(a, b)


def test_skip_applies_to_the_alerting_steps_own_optimizer_step():
    """The loop takes the NaN step's optimizer step: the monitor skips that one
    (listed in ``skipped``) and no other."""
    a, b = _mlp(), _mlp()
    _nan_loop(a, torch.optim.SGD(a.parameters(), lr=0.1), takes=lambda k, loss: k != 2)  # skipped by hand
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    with sp.monitor(b, every=50, skip=opt_b) as mon:
        _nan_loop(b, opt_b, mon, takes=lambda k, loss: True)
    assert mon.skipped == [2]
    _same(a, b)


def test_skip_keeps_a_nan_gradient_from_a_finite_loss_out_of_the_weights():
    """A NaN made by the backward alone (the loss is finite) at step 3 on the
    CPU: the monitor read the gradients every 5th step there, so step 3's
    NaN went to the weights and was seen in step 4's loss, too late for
    ``skip=``.  With ``skip=`` every step's gradients are read: step 3's
    optimizer step is skipped and the weights stay finite (and equal to the
    loop skipping that step by hand)."""
    def loop(model, opt, mon, takes):
        for k in range(6):
            x, y = _data(k)
            out = model(x)
            loss = F.cross_entropy(NanBackward.apply(out) if k == 3 else out, y)
            opt.zero_grad()
            loss.backward()
            if mon is not None:
                mon.step(loss)
            if takes(k):
                opt.step()

    a, b = _mlp(), _mlp()
    loop(a, torch.optim.SGD(a.parameters(), lr=0.1), None, lambda k: k != 3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    with sp.monitor(b, every=50, skip=opt_b) as mon:
        loop(b, opt_b, mon, lambda k: True)
    assert mon.grad_every == 1 and mon.skipped == [3]
    assert all(torch.isfinite(p).all() for p in b.parameters())
    _same(a, b)


# -- sparse gradients ----------------------------------------------------------------------------------


class _Writer:
    """Takes what a SummaryWriter would be asked to write, histograms included."""

    def __init__(self):
        self.histograms = []

    def add_scalar(self, tag, value, step):
        pass

    def add_text(self, tag, text, step):
        pass

    def add_custom_scalars(self, layout):
        pass

    def add_histogram_raw(self, tag, min, max, num, sum, sum_squares, bucket_limits, bucket_counts, step):
        self.histograms.append((tag, num, step))


def test_sparse_gradients_are_measured_and_warn_nothing():
    """nn.Embedding(sparse=True) trained with SparseAdam: every step's loss and
    gradient norm are read (the previous version failed every step in
    linalg_vector_norm on a sparse tensor, warned each time and measured
    nothing); the norm is that of the dense gradient (duplicate indices
    summed), the embedding row's parameter gradient RMS too, and its gradient
    histogram is written."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Flatten(), nn.Linear(40, 4))
    o1 = torch.optim.SparseAdam(list(model[0].parameters()), lr=1e-2)
    o2 = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    writer = _Writer()
    ref, emb = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sp.monitor(model, every=3, grad_every=1, optimizer=o1, writer=writer) as mon:
            for k in range(7):
                g = torch.Generator().manual_seed(k)
                t, y = torch.randint(0, 50, (16, 5), generator=g), torch.randint(0, 4, (16,), generator=g)
                loss = F.cross_entropy(model(t), y)
                o1.zero_grad()
                o2.zero_grad()
                loss.backward()
                assert model[0].weight.grad.is_sparse and not model[0].weight.grad.is_coalesced()
                dense = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in model.parameters()]
                ref[k] = math.sqrt(sum(float(d.double().pow(2).sum()) for d in dense))
                emb[k] = float(dense[0].double().pow(2).mean().sqrt())
                mon.step(loss)
                o1.step()
                o2.step()
    assert all(v is not None and math.isfinite(v) for v in mon.losses)
    assert mon.grad_norms == pytest.approx([ref[k] for k in mon.steps], rel=1e-5)
    assert [h.step for h in mon.history] == [0, 3, 6]
    for h in mon.history:
        assert h.verdict != "incomplete" and h.layers[0].param_grad_rms == pytest.approx(emb[h.step], rel=1e-5)
    assert "update_lr_rms" in mon.history[0].layers[0].stats  # SparseAdam's update of the embedding, measured
    assert any(tag == "signalprop/grad/0.weight" for tag, _, _ in writer.histograms)


def test_a_failure_at_every_step_warns_once(monkeypatch):
    """A failure of the monitor's own that repeats at every step is one
    warning, not one per step (the step number was in the previous
    version's key); every step is still recorded, unmeasured."""
    def broken(*args, **kwargs):
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(core, "norms", broken)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="was not measured") as rec, sp.monitor(model, every=2, grad_every=1) as mon:
        _train(model, opt, mon, 5)
    assert len([w for w in rec if "signalprop" in str(w.message)]) == 1
    assert mon.steps == list(range(5)) and mon.losses == [None] * 5


# -- layers without gradients before the first with one -------------------------------------------------


class _FirstBlock(nn.Module):
    """Its first block checkpointed reentrantly (or frozen): the block's input does not require grad."""

    def __init__(self, reentrant=True, frozen=False):
        super().__init__()
        self.reentrant = reentrant
        self.block = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 4)
        if frozen:
            self.block.requires_grad_(False)

    def forward(self, x):
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


def _sampled(model, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own: "None of the inputs have requires_grad=True"
        with sp.monitor(model, every=1) as mon:
            _train(model, opt, mon, steps)
    return mon


def test_a_reentrant_first_block_is_incomplete_not_healthy():
    """Reentrant checkpointing of the first block, whose input does not require
    grad: the block's layers get no gradient at all, so the sample has no
    verdict and says which layers and why (the previous version looked only
    after the first layer with a gradient, and said "healthy")."""
    torch.manual_seed(0)
    mon = _sampled(_FirstBlock())
    assert len(mon.history) == 2
    for h in mon.history:
        assert h.verdict == "incomplete" and not h.problems
        assert "block.0, block.2" in h.incomplete and "no gradient" in h.incomplete
        assert "use_reentrant=False" in h.incomplete


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_frozen_first_block_is_not_missing_gradients(reentrant):
    """A frozen first block (requires_grad_(False)) whose input does not require
    grad needs no gradient: the sample is judged, reentrant or not."""
    torch.manual_seed(0)
    mon = _sampled(_FirstBlock(reentrant=reentrant, frozen=True))
    assert len(mon.history) == 2
    for h in mon.history:
        assert h.verdict != "incomplete" and not h.incomplete, h.incomplete


def test_a_lazy_model_is_refused_and_a_failed_start_leaves_no_hook(monkeypatch):
    """A lazy module before its first forward is named (it was torch's error
    from deep in the recorder), and a monitor whose start fails after its root
    hooks are on takes them off again (they stayed and kept saving every
    forward's inputs)."""
    from signalprop.monitor import core

    def hooks(m):
        return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())

    lazy = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(4))
    before = hooks(lazy)  # the lazy modules' own initialising hooks
    with pytest.raises(ValueError, match=r"0 \(LazyLinear\) is lazy and not initialised yet"):
        sp.monitor(lazy)
    assert hooks(lazy) == before
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def fail(self):
        raise RuntimeError("arming failed")

    monkeypatch.setattr(core.Monitor, "_arm", fail)
    with pytest.raises(RuntimeError, match="arming failed"):
        sp.monitor(m)
    assert hooks(m) == 0


def test_a_gradient_gone_to_zero_is_said_so():
    from signalprop.monitor.alerts import _fell

    assert _fell(math.inf) == "fell to exactly 0" and _fell(400.0) == "fell 400x"


def _finetune(lr, steps=60):
    """A small regression MLP pre-trained at lr 0.05 (unmonitored), then trained on under the monitor at ``lr``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4096, 32, generator=g)
    Y = torch.sin(X[:, :4].sum(1, keepdim=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(300):
        i = torch.randint(0, 4096, (128,), generator=g)
        loss = F.mse_loss(model(X[i]), Y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    nonfinite = None
    with sp.monitor(model) as mon:
        for step in range(steps):
            i = torch.randint(0, 4096, (128,), generator=g)
            loss = F.mse_loss(model(X[i]), Y[i])
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            if not math.isfinite(loss.item()):
                nonfinite = step
                break
            opt.step()
    return mon, nonfinite


def test_a_run_diverging_from_its_first_steps_is_warned_ahead():
    """Fine-tuning at 10x the rate: the loss grows geometrically from the
    start (0.02 to 1e35 in 20 steps here), with no progress for the
    un-learning rule to see given back; it was warned only once the weights
    were non-finite.  The property, not the step: the loss-spike alert comes
    10 or more steps before the first non-finite loss.  The control, the
    pre-training rate, raises nothing."""
    mon, nonfinite = _finetune(0.5)
    assert nonfinite is not None
    first = next(a for a in mon.alerts if a.kind == "loss-spike")
    assert "where this run started" in first.message and nonfinite - first.step >= 10, (first.step, nonfinite)
    mon, nonfinite = _finetune(0.05)
    assert nonfinite is None and not [a for a in mon.alerts if a.kind in ("loss-spike", "update-growth")]


def test_a_catapult_or_a_slow_rise_is_not_an_explosion():
    from signalprop.monitor.divergence import loss_explosion

    def first(series):
        return next((i for i in range(len(series)) if loss_explosion(series[:i], series[i])), None)

    catapult = [2.3, 2.2, 2.0, 1.5, 1.0, 0.5, 0.3, 0.9, 1.6, 2.0, 1.2, 0.4, 0.2]  # back to its start, no further
    slow = [0.1 * 1.2 ** i for i in range(40)]  # 1.2x a step: 1,500x in 40 steps, never 1.5x a step
    spikes = [0.1, 0.1, 0.1, 5.0, 0.1, 0.1, 9.0, 0.1, 0.1, 0.1]  # single bad batches: the median of 3 ignores them
    assert first(catapult) is None and first(slow) is None and first(spikes) is None
    assert first([0.02 * 3 ** i for i in range(12)]) == 5  # 3x a step: the first step with 4 levels over 10x the start


def test_a_layer_added_after_the_monitor_started_is_watched():
    """A new head and its own parameter group added at step 3: the gradient
    norm left it out, and a NaN in its gradient at step 5 went unseen (with
    skip= it reached the weights).  The known optimizer's groups growing
    makes the monitor read the model's parameters anew."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the NaN step's replay message
        mon = sp.monitor(model, every=100, grad_every=1, skip=opt)
        for step in range(7):
            if step == 3:
                model.append(nn.Linear(4, 4))
                opt.add_param_group({"params": list(model[3].parameters())})
            loss = F.cross_entropy(model(torch.randn(32, 16, generator=gen)), torch.randint(0, 4, (32,), generator=gen))
            opt.zero_grad()
            loss.backward()
            if step == 5:
                model[3].weight.grad[0, 0] = float("nan")
            true = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
            new = mon.step(loss)
            if step == 4:
                assert mon.grad_norms[-1] == pytest.approx(true, rel=1e-5)
            if step == 5:
                assert [(a.kind, a.layer) for a in new] == [("non-finite", "3")]
            opt.step()
        mon.close()
    assert torch.isfinite(model[3].weight).all()  # skip= kept the NaN gradient from the new weights


def test_a_watched_model_can_be_saved_and_copied_without_taking_the_monitor_along():
    """torch.save(model) raised (the hooks pickled the monitor), and a
    deepcopy (an EMA or teacher copy) carried a second monitor bound to the
    copy that no one closed, saving every forward's inputs."""
    import copy
    import io

    from signalprop.probe.recorder import _inert

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    mon = sp.monitor(model, every=2)
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(32, 16, generator=gen)), torch.randint(0, 4, (32,), generator=gen))
        opt.zero_grad()
        loss.backward()
        mon.step(loss)
        opt.step()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ema = copy.deepcopy(model)
    x = torch.randn(8, 16, generator=gen)
    for twin in (loaded, ema):
        assert torch.equal(twin(x), model(x))
        hooks = [*twin._forward_pre_hooks.values(), *twin._forward_hooks.values()]
        assert hooks and all(h is _inert for h in hooks)  # the copy's stand-ins do nothing
        twin(x).sum().backward()
    mon.close()
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_a_resumed_monitor_judges_the_loss_as_the_uninterrupted_one():
    """The un-learning rule's best level comes from the last 256 steps, but
    state_dict kept the first 16 and the last 32 losses: a run resumed at
    step 150 missed the loss-spike the uninterrupted one raised (at 161 then;
    at 163 now that the rule wants 3 alarming steps in a row)."""
    import json

    def loss_at(k):  # learns from 2 to 0.5 by step 60, drifts to 0.9, then jumps to 1.6 (73% given back)
        if k < 16:
            return 2.0
        if k < 60:
            return 2.0 - 1.5 * (k - 16) / 44
        if k < 120:
            return 0.5 + 0.4 * (k - 60) / 60
        return 0.9 if k < 160 else 1.6

    model = nn.Linear(4, 1)

    def run(mon, ks):
        out = []
        for k in ks:
            y = model(torch.ones(2, 4)).sum()
            y.backward()
            out += mon.step(torch.tensor(loss_at(k)) + 0 * y.detach())
        return out

    full = sp.monitor(model, every=1000, grad_every=1)
    uninterrupted = [(a.step, a.kind) for a in run(full, range(170)) if a.step >= 150]
    full.close()
    first = sp.monitor(model, every=1000, grad_every=1)
    run(first, range(150))
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = sp.monitor(model, every=1000, grad_every=1)
    resumed.load_state_dict(state)
    assert [(a.step, a.kind) for a in run(resumed, range(150, 170))] == uninterrupted == [(163, "loss-spike")]


def test_a_squared_error_that_overflows_is_not_blamed_on_a_log_of_zero():
    """Outputs of ~3e19 are finite, their squares are not: the mean squared
    error turns inf.  It was blamed on "log of 0, division by 0" with the fix
    log(p + eps); now on the output's size, and no numpy warning leaks from
    the replay's theory column on the infinite values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "invalid value encountered" included
        warnings.filterwarnings("ignore", message=".*could not be replayed")
        with sp.monitor(model, every=50) as mon:
            for step in range(3):
                x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
                if step == 2:
                    x = x * 1e20
                loss = F.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                mon.step(loss)
                opt.step()
    a = mon.alerts[-1]
    assert a.kind == "non-finite" and a.layer == "(loss)" and "squares it" in a.message
    assert "log of 0" not in a.message and "log(p + eps)" not in a.suggestion


def test_an_optimizer_of_another_model_and_a_dump_path_that_is_a_file_are_refused(tmp_path):
    m, other = nn.Linear(4, 2), nn.Linear(4, 2)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="skip holds none of Linear's parameters"):
        sp.monitor(m, skip=opt)
    with pytest.raises(ValueError, match="optimizer holds none of Linear's parameters"):
        sp.monitor(m, optimizer=opt)
    f = tmp_path / "dump.txt"
    f.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        sp.monitor(m, dump_on_nonfinite=f)
    sp.monitor(m, skip=torch.optim.SGD(m.parameters(), lr=0.1), dump_on_nonfinite=tmp_path / "new").close()
    assert not m._forward_pre_hooks and not m._forward_hooks


# -- a KeyboardInterrupt inside a sampled forward --------------------------------------------------------


class _Interruptible(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.stop = False

    def forward(self, x, depth=0):
        h = torch.tanh(self.a(x)) if depth == 0 else x
        if self.stop:
            self.stop = False
            raise KeyboardInterrupt
        if depth == 1:  # a call of the model inside its own forward: still running, not interrupted
            return h
        h = h + self(h, depth=1)
        return self.b(h)


def test_a_forward_interrupted_by_ctrl_c_is_not_the_sample():
    """Ctrl-C inside the sampled forward (the loop catches it and goes on):
    torch runs no forward hook for a KeyboardInterrupt, so the previous
    version kept the interrupted pass's rows (without gradients) and
    recorded the loop's own calls after it (a metric's F.gelu) in the
    sample, with the functional-recording mode left on torch's stack.  Now
    the next call of the model drops them: the sample holds the training
    pass alone, every row with its gradient, one saved call for a replay,
    and no mode is left entered.  The model calls itself inside its forward
    (a nested call is still running, not interrupted): those rows stay."""
    torch.manual_seed(0)
    model = _Interruptible()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = sp.monitor(model, every=5)
    x, y = _data(0)
    model.stop = True
    with pytest.raises(KeyboardInterrupt):
        model(x)
    F.gelu(torch.randn(8))  # the loop's own code after catching the interrupt
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    assert len(mon._calls) == 1  # the step's call; not the interrupted one, nor the nested one
    mon.step(loss)
    h = mon.history[0]
    assert [layer.name for layer in h.layers] == ["a", "tanh", "b"]
    assert all(layer.grad_rms is not None and layer.grad_rms > 0 for layer in h.layers)
    assert h.verdict == "healthy"
    assert torch._C._len_torch_function_stack() == 0
    # interrupted again, and the loop ends there: close() leaves no mode entered
    for _ in range(4):
        mon.step(F.cross_entropy(model(x), y))
    model.stop = True
    with pytest.raises(KeyboardInterrupt):
        model(x)
    assert torch._C._len_torch_function_stack() == 1
    mon.close()
    assert torch._C._len_torch_function_stack() == 0


# -- a GAN: another loss's pass through the model before its own ----------------------------------------


def _gan(order, steps=6, every=2, set_to_none=True):
    """G and D with a monitor on D; each iteration D's step then G's, G's
    loss passing through D after D's ``mon.step``.  ``order``: "late" zeroes
    D's gradients just before D's backward (after D's forwards), "early" at
    the iteration's start (PyTorch's DCGAN example).  Returns D's monitor and
    per iteration the gradient RMS at D's output in each of D's own passes."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
    D = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    og, od = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    md = sp.monitor(D, every=every)
    seen = []
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        real, z = torch.randn(64, 16, generator=g), torch.randn(64, 8, generator=g)
        if order == "early":
            od.zero_grad(set_to_none=set_to_none)
        fake = G(z)
        d_real, d_fake = D(real), D(fake.detach())
        d_real.retain_grad()
        d_fake.retain_grad()
        ld = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        if order == "late":
            od.zero_grad(set_to_none=set_to_none)
        ld.backward()
        md.step(ld)
        od.step()
        seen.append([t.grad.pow(2).mean().sqrt().item() for t in (d_real, d_fake)])
        lg = F.softplus(-D(fake)).mean()
        og.zero_grad()
        lg.backward()
        og.step()
    md.close()
    return md, seen


@pytest.mark.parametrize("order", ["early", "late"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_gan_discriminators_sample_is_of_its_own_loss(order, set_to_none):
    """The previous version sampled D's first forward after its ``mon.step``
    -- the generator's pass through D, whose gradient D's optimizer never
    uses -- and reported it with D's loss.  Zeroed before D's forwards
    (early), that pass is replaced as soon as D's own forward begins; zeroed
    after them (late), the sample that caught it has no verdict and says
    why, and from the next step on the monitor samples each step's last
    forward.  Every sample with a verdict is one of D's own passes: its
    output row's gradient RMS equals that pass's (autograd, retain_grad).
    Zeroed in place (``set_to_none=False``) the reset is read off the
    gradient's entries: the early order's first sample after it has no
    verdict either."""
    md, seen = _gan(order, set_to_none=set_to_none)
    judged = [h for h in md.history if not h.incomplete]
    assert len(judged) >= 2
    for h in judged:
        assert any(h.layers[-1].grad_rms == pytest.approx(v, rel=1e-5) for v in seen[h.step]), h.step
    if order == "late" or not set_to_none:
        assert md.history[1].step == 2 and "zeroed" in md.history[1].incomplete
        assert [h.step for h in md.history] == [0, 2, 3, 4]
    else:
        assert not any(h.incomplete for h in md.history)


def test_after_ctrl_c_the_mode_stack_is_the_users():
    """After a KeyboardInterrupt in a sampled forward the recording mode is
    still on torch's stack (no hook ran).  Unrelated code run meanwhile (a
    notebook's next cell: another model, F.gelu, softmax) is not recorded;
    the retried call made inside a mode the user entered after it (``with
    torch.device("meta")``) takes the recording mode off from under the
    user's, which stays in force and leaves at its own ``with`` exit (the
    previous version popped the user's mode instead: new tensors were no
    longer made on meta)."""
    torch.manual_seed(0)
    model = _Interruptible()
    mon = sp.monitor(model, every=1)
    x, y = _data(0)
    model.stop = True
    with pytest.raises(KeyboardInterrupt):
        model(x)
    rows = len(mon._rec.rows)
    other = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    F.softmax(F.gelu(other(x)), -1).sum().backward()
    assert len(mon._rec.rows) == rows
    with torch.device("meta"):
        out = model(x)
        assert torch.zeros(1).device.type == "meta"
        assert torch._C._len_torch_function_stack() == 1
    assert torch._C._len_torch_function_stack() == 0
    loss = F.cross_entropy(out, y)
    loss.backward()
    mon.step(loss)
    assert mon.history[0].verdict == "healthy" and [r.name for r in mon.history[0].layers] == ["a", "tanh", "b"]
    mon.close()


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_whole_model_under_activation_checkpointing_is_measured(reentrant):
    """``checkpoint(model, x)`` around the root call: the backward recomputes
    the model's forward, a second call of the model.  The non-reentrant
    recomputation replaced the recorded forward (no gradient reached it:
    every sample "incomplete"); now the sample is the forward, its rows'
    gradients those of the same run without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    def run(ckpt):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = sp.monitor(model, every=2)
        for k in range(4):
            x, y = _data(k)
            x.requires_grad_(True)
            out = checkpoint(model, x, use_reentrant=reentrant) if ckpt else model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
        mon.close()
        return mon

    plain, ckpt = run(False), run(True)
    assert [h.verdict for h in ckpt.history] == ["healthy", "healthy"]
    for a, b in zip(plain.history, ckpt.history):
        assert [r.grad_rms for r in b.layers] == pytest.approx([r.grad_rms for r in a.layers], rel=1e-6)


@pytest.mark.parametrize("how", ["reassigned", "create_graph"])
def test_a_gradient_replaced_without_zeroing_is_not_a_reset(how):
    """Gradient accumulation whose ``.grad`` is replaced by a new tensor
    without being zeroed -- the loop averages it (``p.grad = p.grad / 2``),
    or ``backward(create_graph=True)`` accumulates out of place -- keeps its
    sample (a first version of the reset check took any new ``.grad`` object
    for a reset)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = sp.monitor(model, every=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True")
        for k in range(4):
            opt.zero_grad()
            for j in range(2):
                x, y = _data(2 * k + j)
                F.cross_entropy(model(x), y).backward(create_graph=how == "create_graph")
            if how == "reassigned":
                for p in model.parameters():
                    p.grad = p.grad / 2
            mon.step(None)
            opt.step()
    mon.close()
    for p in model.parameters():
        p.grad = None  # create_graph's reference cycle
    assert [h.verdict for h in mon.history] == ["healthy", "healthy"]
