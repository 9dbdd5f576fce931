"""A NaN/Inf made by a module's own forward code (not a submodule) is named
by that module and the phase (issue 26); the previous version blamed the
next leaf module (``3 (Linear)``)."""

import pytest
import torch
from torch import nn

import signalprop as sp


class Blk(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.lin, self.relu, self.op = nn.Linear(16, 16), nn.ReLU(), op

    def forward(self, x):
        h = self.relu(self.lin(x))
        return self.op(h)


def _model(op):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Blk(op), nn.Linear(16, 4))


@pytest.mark.parametrize("op", [lambda h: torch.log(h - 1.0), lambda h: torch.rsqrt(h)],
                         ids=["log-of-negatives", "rsqrt-of-zeros"])
def test_a_nan_made_in_a_parents_forward_is_named_by_that_parent(op):
    r = sp.check(_model(op), torch.randn(32, 8))
    p = r.problems[0]
    assert r.verdict == "non-finite"
    assert p.layer == "2" and "own forward code" in p.message and "after 2.relu" in p.message, p.message
    assert p.message.startswith("The forward signal turns non-finite in Blk #2's own forward code")


def test_a_nan_made_in_the_backward_of_a_parents_code_is_named_by_that_parent():
    """sqrt at 0 (ReLU zeros) in the block's own code: finite forward, an
    infinite derivative in the backward."""
    r = sp.check(_model(lambda h: torch.sqrt(h)), torch.randn(32, 8))
    p = r.problems[0]
    assert r.verdict == "non-finite" and p.layer == "2", p.message
    assert p.message.startswith("The backward pass turns a finite gradient non-finite in Blk #2"), p.message


class _After(nn.Module):
    """Layers, then an operation in the model's own code after the last one
    (an x-dependent term scaled by 0: inf * 0 = NaN where x * x overflows)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x) + (x * x).sum(1, keepdim=True) * 0


class _Wrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _After()

    def forward(self, x):
        return self.body(x) * 2


def _overflowing_input():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    x[0, 0] = 1e25  # finite; its square is not
    return x


@pytest.mark.parametrize("loss", [False, True], ids=["no-loss", "loss"])
def test_a_nan_made_after_the_last_layer_is_named_not_called_healthy(loss):
    """No row's output holds the NaN: the model's own code after its last
    layer made it.  The previous version called the model healthy without a
    loss (no statistic read the output) and, with one, blamed the loss's
    gradient; a NaN made in a submodule's code after its last layer names
    that submodule.  A -inf mask on the output (masked logits) stays no
    failure."""
    kw = {"loss_fn": torch.nn.functional.cross_entropy, "targets": torch.randint(0, 3, (64,))} if loss else {}
    r = sp.check(_After(), _overflowing_input(), **kw)
    p = r.problems[0]
    assert r.verdict == "non-finite" and p.layer == "(root)", (r.verdict, p.message)
    assert p.message.startswith("The forward signal turns non-finite in the model (_After)'s own forward code, "
                                "after net.2"), p.message
    p = sp.check(_Wrap(), _overflowing_input(), **kw).problems[0]
    assert p.layer == "body" and "in body's own forward code" in p.message, p.message

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(8, 3)

        def forward(self, x):
            return self.net(x).masked_fill(torch.arange(3) == 2, float("-inf"))

    assert sp.check(Masked(), torch.randn(16, 8)).verdict == "healthy"


def test_a_complex_output_conjugated_after_the_last_layer_is_read():
    """The output's largest entry is read where no row's output is the
    model's, of a complex output too: a lazily conjugated one (``z.conj()``,
    which ``view_as_real`` refuses) made check raise; a NaN in its imaginary
    part is named as in a real output."""

    class Conj(nn.Module):
        def __init__(self, nan=False):
            super().__init__()
            self.net, self.nan = nn.Linear(8, 6), nan

        def forward(self, x):
            y = self.net(x)
            z = torch.complex(y[:, :3], y[:, 3:] + (float("nan") if self.nan else 0.0) * (x[:, :3] > 5))
            return z.conj()

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    assert sp.check(Conj(), x).verdict == "healthy"
    x[0, :3] = 6.0
    r = sp.check(Conj(nan=True), x)
    assert r.verdict == "non-finite" and r.problems[0].layer == "(root)", (r.verdict, r.problems)


def test_the_monitor_names_a_nan_made_after_the_last_layer_in_the_forward():
    """The monitor's replay of the step says the same: the forward, the
    model's own code (it said the forward was finite and blamed the loss's
    gradient)."""
    m = _After()
    with sp.monitor(m, every=2) as mon:
        loss = torch.nn.functional.cross_entropy(m(_overflowing_input()), torch.randint(0, 3, (64,)))
        loss.backward()
        mon.step(loss)
    a = next(a for a in mon.alerts if a.kind == "non-finite")
    assert a.phase == "forward" and a.layer == "(root)" and "own forward code" in a.message, a.message


def test_a_nan_made_by_a_module_is_still_that_module():
    """The control: a NaN made by a leaf module (a log inside its own forward
    with no submodules) stays named by it."""

    class Log(nn.Module):
        def forward(self, x):
            return torch.log(x)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), Log(), nn.Linear(16, 4))
    r = sp.check(m, torch.randn(32, 8))
    assert r.problems[0].layer == "1" and "at Log #1." in r.problems[0].message


def test_a_model_that_sets_requires_grad_on_its_input_runs_as_it_does_without_check():
    """HF Wav2Vec2's feature encoder in train mode sets ``requires_grad`` on a
    view of its input; the plain forward and backward run, and so must check
    (it used to make the input a leaf that requires grad, which refuses that)."""

    class SetsFlag(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 8, 5)

        def forward(self, x):
            h = x[:, None]
            if self.training:
                h.requires_grad = True
            return self.conv(h)

    torch.manual_seed(0)
    m = SetsFlag()
    x = torch.randn(4, 64)
    m(x).sum().backward()  # the plain pass runs
    m.zero_grad(set_to_none=True)
    r = sp.check(m, x)
    assert r.verdict == "healthy" and r.layers[0].grad_rms > 0 and not x.requires_grad
    # the input, passed as it is, is still measured: a NaN/Inf in it is named as the input's (it was blamed on
    # the first convolution) and its statistics are in the report, without a gradient
    assert r.summary.input is not None and r.summary.input.grad_rms is None
    assert r.summary.input.second_moment == pytest.approx(float(x.pow(2).mean()), rel=1e-5)
    x[1, 7] = float("inf")
    r = sp.check(m, x)
    assert r.verdict == "non-finite" and r.problems[0].layer == "input"


def test_hf_wav2vec2_in_train_mode():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                      conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    m = transformers.Wav2Vec2Model(cfg).train()
    r = sp.check(m, torch.randn(2, 4000))
    assert r.layers and r.verdict in ("healthy", "vanishing", "exploding", "saturated", "dead")


@pytest.mark.parametrize("micro", [4, 1])
def test_with_gradient_accumulation_the_micro_batch_that_holds_the_bad_value_is_replayed(micro):
    """(Outside stress test) An inf in micro-batch 3 of 4, squashed by a tanh
    in the forward: every output and its gradient are finite, the parameter
    gradients not.  The replay took the step's first call, whose batch is
    clean, and blamed Linear #0's backward; the call whose inputs hold the
    inf is replayed now and the input is named, as with one batch."""
    torch.manual_seed(0)
    X, Y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    X[40, 0] = float("inf")
    m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with sp.monitor(m, every=10, skip=opt) as mon:
        opt.zero_grad()
        n = 64 // micro
        for i in range(micro):
            loss = nn.functional.cross_entropy(m(X[i * n:(i + 1) * n]), Y[i * n:(i + 1) * n]) / micro
            loss.backward()
        mon.step(loss)
        opt.step()
    a = mon.alerts[0]
    assert a.kind == "non-finite" and a.layer == "input" and a.phase == "forward", a
    assert mon.skipped == [0]


def test_an_additive_mask_passed_with_every_micro_batch_does_not_hide_the_bad_one():
    """(Outside review of the fix above) An additive -inf mask passed with
    every call made each call's inputs "non-finite", so the first, clean
    micro-batch was replayed and fc1's gradients blamed; -inf alone is a
    mask: the micro-batch with the +inf is replayed and the input named."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 6)

        def forward(self, x, mask):
            return self.fc2(torch.tanh(self.fc1(x))) + mask

    torch.manual_seed(0)
    m = M()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    mask = torch.zeros(16, 6)
    mask[:, 4:] = float("-inf")
    with sp.monitor(m, every=10, grad_every=1) as mon:
        for s in range(3):
            opt.zero_grad()
            for micro in range(3):
                x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
                if s == 2 and micro == 2:
                    x[0, 0] = float("inf")
                nn.functional.cross_entropy(m(x, mask), y).backward()
            mon.step()
            opt.step()
    assert [(a.step, a.layer) for a in mon.alerts] == [(2, "input")]
