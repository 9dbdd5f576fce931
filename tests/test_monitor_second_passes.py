"""Steps with a second pass beside the loss's: a Hessian-vector product after
``backward(create_graph=True)``, a penalty's forward before the training
forward, a Jacobian penalty through ``torch.func`` after it.  The sample
must be of the loss's forward and backward: its rows, its output gradient,
its verdict.  Oracle: the gradient at the model's output from autograd.
Each test fails on the code before its fix (session 24)."""

import warnings

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
            jac = vmap(jacrev(lambda xi: functional_call(model, params, (xi,))))(x[:4])
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
