"""Steps with a second pass beside the loss's: a Hessian-vector product after
``backward(create_graph=True)``, a penalty's forward before the training
forward, a Jacobian penalty through ``torch.func`` after it.  The sample
must be of the loss's forward and backward: its rows, its output gradient,
its verdict.  Oracle: the gradient at the model's output from autograd.
Also what an outside test of such loops found: a replay that advanced the
forward's own generators, two backwards through one forward, a user's hook
on the output.  Each test fails on the code before its fix (session 24)."""

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import signalprop as sp


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g)


def _output_grad_rms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """RMS of d(mean squared error)/d(output) at the model's weights now, from autograd."""
    out = model(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(((out - y) ** 2).mean(), out)
    return float(g.pow(2).mean().sqrt())


def test_a_hessian_vector_product_after_the_loss_backward_is_not_the_sample():
    """AdaHessian's step: ``loss.backward(create_graph=True)``, then
    ``autograd.grad(grads, params, v)``.  The product's backward runs through
    the sampled rows after the loss's, and was read as theirs: every row and
    the output gradient 20x the loss's (0.037 against 0.0016 at the first
    layer).  The loss's backward filled .grad with a graph; a backward after
    it that fills none is through those gradients, not the loss's."""
    model, (x, y) = _net(), _data()
    want = _output_grad_rms(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True")
        with sp.monitor(model, every=5, optimizer=opt) as mon:
            for _ in range(10):
                opt.zero_grad()
                loss = ((model(x) - y) ** 2).mean()
                loss.backward(create_graph=True)
                params = list(model.parameters())
                v = [torch.ones_like(p) for p in params]
                torch.autograd.grad([p.grad for p in params], params, v)
                for p in params:
                    p.grad = p.grad.detach()  # the reference cycle torch warns about
                mon.step(loss)
                opt.step()
    first = mon.history[0]
    assert first.verdict == "healthy" and mon.alerts == []
    # the last row's output is the model's: its gradient is the loss's (float32 reductions: 1e-5)
    assert first.layers[-1].grad_rms == pytest.approx(want, rel=1e-5)
    assert first.output_grad_rms == pytest.approx(want, rel=1e-5)


def test_a_penalty_forward_before_the_training_forward_gets_the_samples_output_gradient():
    """An activation penalty's forward (weighted 1e-3) ran before the
    training forward.  The sample measured the training forward's rows but
    took the output gradient of the step's first call, the penalty's, 6,000x
    smaller: "exploding" on a healthy 5-layer net.  The output gradient is
    now the measured call's."""
    model, (x, y) = _net(), _data()
    g = torch.Generator().manual_seed(2)
    probe = torch.randn(32, 16, generator=g)
    out = model(x).detach().requires_grad_(True)
    (dout,) = torch.autograd.grad(((out - y) ** 2).mean(), out)  # the penalty's forward is another call
    want = float(dout.pow(2).mean().sqrt())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with sp.monitor(model, every=5, optimizer=opt) as mon:
        for _ in range(10):
            opt.zero_grad()
            reg = 1e-3 * model(probe).pow(2).mean()
            loss = ((model(x) - y) ** 2).mean() + reg
            loss.backward()
            mon.step(loss)
            opt.step()
    assert [h.verdict for h in mon.history] == ["healthy", "healthy"]
    assert mon.alerts == []
    assert mon.history[0].output_grad_rms == pytest.approx(want, rel=1e-5)
    assert mon.history[0].layers[-1].grad_rms == pytest.approx(want, rel=1e-5)


def test_a_jacobian_penalty_through_torch_func_after_the_forward_keeps_the_sample():
    """A Jacobian penalty (``vmap(jacrev(functional_call(model, ...)))``)
    after the training forward: the model's call inside the transform was
    taken for the step's training forward, replaced the recorded one, and
    measured nothing -- every sample lost, with a warning that the forward
    ran inside torch.func.  Calls inside a transform are neither sampled
    instead nor kept for a replay; training is unchanged by the monitor."""

    def train(monitored: bool) -> tuple[list[float], nn.Module, object]:
        model, (x, y) = _net(), _data()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        mon = sp.monitor(model, every=5, optimizer=opt) if monitored else None
        losses = []
        for _ in range(10):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            params = dict(model.named_parameters())
            jac = vmap(jacrev(lambda xi, params=params: functional_call(model, params, (xi,))))(x[:4])
            loss = loss + 1e-3 * jac.pow(2).sum()
            loss.backward()
            if mon is not None:
                mon.step(loss)
            opt.step()
            losses.append(loss.item())
        if mon is not None:
            mon.close()
        return losses, model, mon

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "forward ran inside torch.func transforms" warning
        losses, model, mon = train(True)
    plain_losses, plain_model, _ = train(False)
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain_model.state_dict().values()))
    assert [(h.step, h.verdict) for h in mon.history] == [(0, "healthy"), (5, "healthy")]
    assert [r.shape for r in mon.history[0].layers] == [(32, 64), (32, 64), (32, 64), (32, 64), (32, 1)]
    # the output gradient is the training output's (the transform's call registered none of its own)
    assert mon.history[0].output_grad_rms == pytest.approx(_output_grad_rms(_net(), *_data()), rel=1e-5)


def test_a_jacobian_penalty_through_torch_func_before_the_forward_keeps_the_sample():
    """The penalty computed first: the transform's call of the model ended
    the recording armed for the step, the training forward after it was not
    recorded, and every sample was lost with a warning that the forward ran
    inside torch.func."""
    model, (x, y) = _net(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sp.monitor(model, every=5, optimizer=opt) as mon:
            for _ in range(6):
                opt.zero_grad()
                params = dict(model.named_parameters())
                jac = vmap(jacrev(lambda xi, params=params: functional_call(model, params, (xi,))))(x[:4])
                loss = ((model(x) - y) ** 2).mean() + 1e-3 * jac.pow(2).sum()
                loss.backward()
                mon.step(loss)
                opt.step()
    assert [(h.step, h.verdict, len(h.layers)) for h in mon.history] == [(0, "healthy", 5), (5, "healthy", 5)]
    assert mon.history[0].output_grad_rms == pytest.approx(_output_grad_rms(_net(), x, y), rel=1e-5)


class _Noisy(nn.Module):
    """Draws from a generator of its own, Python's and NumPy's global ones (noise injection, a LayerDrop coin)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 32), nn.Linear(32, 3)
        self.gen = torch.Generator().manual_seed(123)
        self.rng = np.random.default_rng(7)

    def forward(self, x):
        h = torch.tanh(self.l1(x)) + 0.1 * torch.randn(32, 32, generator=self.gen)
        h = h * (0.5 + random.random()) * float(0.5 + np.random.rand()) * float(0.5 + self.rng.random())
        return self.l2(h)


def _noisy_run(monitored: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = _Noisy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = sp.monitor(model, every=100) if monitored else None
    losses = []
    for k in range(6):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if k == 2:
            loss = loss * float("nan")  # one bad step, which the loop's own guard skips
        opt.zero_grad()
        loss.backward()
        if mon is not None:
            mon.step(loss)
        if torch.isfinite(loss):
            opt.step()
        losses.append(loss.item())
    if mon is not None:
        assert any(a.kind == "non-finite" for a in mon.alerts)  # the replay ran
        mon.close()
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def test_the_nonfinite_replay_puts_back_every_generator_the_forward_draws_from():
    """The replay of a non-finite step runs the forward again: it put back
    torch's global generators only, so a forward that draws from a
    generator of its own (torch's or NumPy's), Python's ``random`` or NumPy's trained differently
    after a NaN step the loop skipped (losses 1.1513 -> 1.1602)."""
    plain_losses, plain_state = _noisy_run(False)
    losses, state = _noisy_run(True)
    assert [round(v, 12) for v in losses if v == v] == [round(v, 12) for v in plain_losses if v == v]
    assert all(torch.equal(state[k], plain_state[k]) for k in plain_state)


def test_check_puts_back_python_numpy_and_a_modules_own_generators():
    model, x = _Noisy(), torch.randn(32, 8)
    random.seed(1)
    np.random.seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), model.gen.get_state(), model.rng.bit_generator.state)
    sp.check(model, x)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(model.gen.get_state(), before[2])
    assert model.rng.bit_generator.state == before[3]


def test_two_backwards_through_the_sampled_forward_are_said_not_judged():
    """``l1.backward(retain_graph=True); l2.backward()``: each row's
    statistics were the last backward's gradient alone (7.9x below the sum
    that .grad holds), judged "healthy".  The sample is ``incomplete``, with
    the reason; one backward of the sum is measured as before."""
    for two in (True, False):
        model, (x, y) = _net(), _data()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with sp.monitor(model, every=5, optimizer=opt) as mon:
            for _ in range(6):
                opt.zero_grad()
                out = model(x)
                l1, l2 = ((out - y) ** 2).mean(), 0.5 * out.pow(2).mean()
                if two:
                    l1.backward(retain_graph=True)
                    l2.backward()
                else:
                    (l1 + l2).backward()
                mon.step(l1 + l2)
                opt.step()
        first = mon.history[0]
        if two:
            assert first.verdict == "incomplete" and "2 backward passes" in first.incomplete
        else:
            assert first.verdict == "healthy" and first.incomplete == ""
        assert mon.alerts == []


@pytest.mark.parametrize("loop", ["saliency", "zeroed between"])
def test_backwards_that_leave_grad_as_the_last_ones_are_still_judged(loop):
    """Two backwards through the sampled forward where ``.grad`` holds the
    last one's alone are no repeat: a saliency map's ``autograd.grad`` (it
    fills no .grad) before the loss's backward, and a GAN's two losses
    through one fake batch with ``zero_grad()`` between their backwards (an
    outside review found both made "incomplete" by the first version of the
    rule).  The rows are the loss's: the last row's gradient is dL/dy."""
    model, (x, y) = _net(), _data()
    want = _output_grad_rms(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with sp.monitor(model, every=5, optimizer=opt) as mon:
        for _ in range(6):
            opt.zero_grad()
            xin = x.clone().requires_grad_(True)
            out = model(xin)
            loss = ((out - y) ** 2).mean()
            if loop == "saliency":
                torch.autograd.grad(loss, xin, retain_graph=True)
            else:
                (-out.mean()).backward(retain_graph=True)  # another model's loss through these outputs
                opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    assert [h.verdict for h in mon.history] == ["healthy", "healthy"]
    assert mon.history[0].layers[-1].grad_rms == pytest.approx(want, rel=1e-5)


def test_a_gradient_penalty_backward_after_create_graph_is_a_second_backward():
    """``loss.backward(create_graph=True)`` and then a penalty on the
    gradients backpropagated into ``.grad`` too: .grad holds both (the last
    layer's weight gradient 6.8 against the loss's 0.10), the rows one.  Not
    a Hessian-vector product (which fills no .grad): two backwards, the
    sample ``incomplete``."""
    model, (x, y) = _net(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True")
        with sp.monitor(model, every=5, optimizer=opt) as mon:
            for _ in range(2):
                opt.zero_grad()
                loss = ((model(x) - y) ** 2).mean()
                loss.backward(create_graph=True)
                (10 * sum(p.grad.pow(2).sum() for p in model.parameters())).backward()
                for p in model.parameters():
                    p.grad = p.grad.detach()
                mon.step(loss)
                opt.step()
    assert mon.history[0].verdict == "incomplete" and "2 backward passes" in mon.history[0].incomplete


def test_the_output_gradient_is_read_after_a_users_hook_on_the_output():
    """A tensor hook of the user's on the model's output (``out.register_hook(lambda g: g * 10)``):
    the rows read the gradient after it, the output gradient was read before it -- the last row's
    relative gradient 10 for the same tensor.  Both after it now."""
    model, (x, y) = _net(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with sp.monitor(model, every=5, optimizer=opt) as mon:
        for _ in range(2):
            opt.zero_grad()
            out = model(x)
            out.register_hook(lambda g: g * 10)
            loss = ((out - y) ** 2).mean()
            loss.backward()
            mon.step(loss)
            opt.step()
    first = mon.history[0]
    assert first.output_grad_rms == pytest.approx(10 * _output_grad_rms(_net(), x, y), rel=1e-5)
    assert first.layers[-1].relative_grad_rms == pytest.approx(1.0, rel=1e-6)


def _resume_run(model, opt, start, stop, state=None):
    mon = sp.monitor(model, every=5, optimizer=opt)
    if state is not None:
        mon.load_state_dict(state)
    for s in range(start, stop):
        g = torch.Generator().manual_seed(1000 + s)
        x = torch.randn(32, 8, generator=g)
        loss = (model(x) - torch.sin(x.sum(1, keepdim=True)).repeat(1, 2)).square().mean()
        opt.zero_grad()
        loss.backward()
        mon.step(loss)
        opt.step()
    return mon


def _grown_head() -> tuple[nn.Module, torch.optim.Optimizer]:
    """An MLP whose read-out starts 1000x small: its updates grow ~400x over 200 steps, gradually."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        model[5].weight.mul_(1e-3)
        model[5].bias.zero_()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_a_resumed_monitor_compares_updates_with_the_last_samples():
    """An outside test of checkpoints: a monitor resumed from
    ``state_dict()`` at step 150 alerted ``update-spike`` at step 151 (23.8x
    the median of its last samples) where the same run without the break
    said nothing: the state kept the 3 baseline samples only (steps 0-10),
    against which a layer whose update grew gradually since is a spike.  It
    keeps the last samples the rules compare with too."""
    model, opt = _grown_head()
    whole = _resume_run(model, opt, 0, 200)
    model2, opt2 = _grown_head()
    first = _resume_run(model2, opt2, 0, 150)
    state = first.state_dict()
    first.close()
    rng = torch.get_rng_state()
    model3, opt3 = _grown_head()
    model3.load_state_dict(model2.state_dict())
    opt3.load_state_dict(opt2.state_dict())
    torch.set_rng_state(rng)
    resumed = _resume_run(model3, opt3, 150, 200, state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model3.state_dict().values()))
    after = [(a.step, a.kind, a.layer) for a in whole.alerts if a.step >= 150]
    assert [(a.step, a.kind, a.layer) for a in resumed.alerts if a.step >= 150] == after
    assert [h.step for h in resumed.history][:3] == [0, 5, 10] and resumed.history[3].step == 110
    whole.close()  # (armed for their next sample: their recorders' global hooks would outlive the test)
    resumed.close()
