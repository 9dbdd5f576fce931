"""Models and loops from an outside stress test (session 23) that crashed
check or the monitor, or got a verdict the pass could not support: a
torch.jit.script'ed block, a NamedTuple batch, torch.func transforms inside
the forward, a loss of exactly 0, output logits that shrink.  Each test fails
on the code before its fix."""

import math
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

import signalprop as sp
from _loops import steps_with_losses


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 64)
        self.mid = torch.jit.script(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)))
        self.c = nn.Linear(64, 10)

    def forward(self, x):
        return self.c(self.mid(self.a(x)))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own
def test_a_scripted_block_is_one_row_and_the_model_comes_back():
    """A torch.jit.script'ed submodule raised a bare AttributeError (its
    children are held in a wrapper without ``get``).  Its compiled code is
    one computation no hook reaches inside: one row, whose gradient RMS is
    autograd's at its output (float64 oracle, 1e-6); the model comes back
    as it was, and the monitor samples it."""
    torch.manual_seed(0)
    m = _Scripted()
    x = torch.randn(64, 32)
    before = _state(m)
    r = sp.check(m, x)
    assert [(layer.name, layer.kind) for layer in r.layers] == [("a", "Linear"), ("mid", "RecursiveScriptModule"),
                                                              ("c", "Linear")]
    assert _same(before, _state(m)) and all(p.grad is None for p in m.parameters())
    # oracle: the gradient at mid's output under check's own seed is c's backward of it: read it off autograd
    h = m.mid(m.a(x)).detach().requires_grad_()
    y = m.c(h)
    g_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(r.summary.cotangent_seed))
    (g,) = torch.autograd.grad(y, h, g_out)
    assert r.layers[1].grad_rms == pytest.approx(float(g.double().pow(2).mean().sqrt()), rel=1e-5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sp.monitor(m, every=1) as mon:
            for _ in range(3):
                loss = m(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                mon.step(loss)
                opt.step()
    assert [h.verdict for h in mon.history] == ["healthy"] * 3 and len(mon.history[0].layers) == 3


class _Batch(NamedTuple):
    x: torch.Tensor
    mask: torch.Tensor


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 8)

    def forward(self, x, mask):
        return torch.tanh(self.l(x)) * mask


def test_a_named_tuple_batch_is_the_models_positional_arguments():
    """A NamedTuple batch raised a TypeError from check's own input handling
    (its type was called with one generator); it is the model's positional
    arguments, as a plain tuple is: the same report."""
    torch.manual_seed(0)
    m = _Masked()
    b = _Batch(torch.randn(16, 8), torch.ones(16, 8))
    r = sp.check(m, b)
    assert r.to_dict() == sp.check(m, tuple(b)).to_dict()
    assert r.verdict == "healthy" and len(r.layers) == 2
    assert sp.check(m, b, spectrum=True).spectrum is not None


class _VmapForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 32) / 4)
        self.w2 = nn.Parameter(torch.randn(32, 4) / 6)

    def forward(self, x):
        return torch.vmap(lambda xi: torch.tanh(xi @ self.w1) @ self.w2)(x)


def _train(model: nn.Module, steps: int, monitored: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    torch.manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    mon = sp.monitor(model, every=2) if monitored else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if mon is not None:
                mon.step(loss)
            opt.step()
    if mon is not None:
        mon.close()
    return _state(model), [str(w.message) for w in caught]


def test_vmap_inside_the_forward_neither_breaks_nor_changes_training():
    """torch.vmap inside the forward: the monitor's recording measured the
    transform's per-sample views by an in-place copy, which vmap refuses,
    and the RuntimeError was raised into the training loop at step 0.  Those
    calls are not measured now; the one warning says why no layer is, and
    training is bit-identical to the unmonitored run."""
    torch.manual_seed(0)
    a = _VmapForward()
    b = _VmapForward()
    b.load_state_dict(a.state_dict())
    plain, _ = _train(a, 6, False)
    watched, said = _train(b, 6, True)
    assert _same(plain, watched)
    assert len(said) == 1 and "torch.func" in said[0] and "training is unaffected" in said[0]


def _member() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


class _Ensemble(nn.Module):
    """torch's model-ensembling recipe: stacked parameters, vmap over functional_call."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        stacked, _ = stack_module_state([_member() for _ in range(n)])
        self.p = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v) for k, v in stacked.items()})
        self.keys_ = list(stacked)
        self.base = _member()

    def forward(self, x):
        p = {k: self.p[k.replace(".", "_")] for k in self.keys_}
        return torch.vmap(lambda pp, xx: functional_call(self.base, pp, (xx,)), in_dims=(0, None))(p, x)


def test_an_ensemble_under_vmap_gets_a_clear_error_from_check():
    """Every call of the ensemble runs inside vmap: check raised vmap's
    "inplace arithmetic" error, blamed on base.0.  With no row to measure it
    now says why, and the model comes back as it was."""
    torch.manual_seed(0)
    m = _Ensemble()
    before = _state(m)
    with pytest.raises(ValueError, match="torch.func transforms"):
        sp.check(m, torch.randn(32, 64))
    assert _same(before, _state(m)) and all(p.grad is None for p in m.parameters())


def test_a_loss_of_exactly_zero_has_no_backward_signal_to_judge():
    """The gradient at the output is exactly 0 (every example masked out):
    check called every layer "vanishing" against an output RMS it reported
    as 1.0, with an initialisation fix; the monitor said the same and
    alerted.  Now check's verdict is "incomplete" (the forward shows no
    problem), the output RMS 0 and no gradient judged or predicted; the
    monitor's sample is incomplete with the reason, and no alert comes."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    r = sp.check(m, x, loss_fn=lambda out: F.cross_entropy(out, y, reduction="none").mul(0.0).sum())
    assert (r.verdict, r.problems, r.summary.output_grad_rms) == ("incomplete", (), 0.0)
    assert all(layer.relative_grad_rms is None and layer.predicted_grad_rms is None for layer in r.layers)
    assert any("no backward signal" in n for n in r.summary.notes)
    assert sp.check(m, x, loss_fn=lambda out: F.cross_entropy(out, y)).verdict == "healthy"  # the control
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    with sp.monitor(m, every=5) as mon:
        for k in range(20):
            keep = torch.zeros(256) if k == 10 else torch.ones(256)
            loss = (F.cross_entropy(m(x), y, reduction="none") * keep).sum() / keep.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    verdicts = {h.step: h.verdict for h in mon.history}
    assert verdicts == {0: "healthy", 5: "healthy", 10: "incomplete", 15: "healthy"}
    assert "no backward signal" in next(h.incomplete for h in mon.history if h.step == 10)
    assert mon.alerts == []


class _TiedBigram(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 128) -> None:
        super().__init__()
        self.e = nn.Embedding(vocab, d)  # N(0, 1): the tied head's logits start at ||e||^2 ~ d
        self.mix = nn.Linear(d, d)
        self.o = nn.Linear(d, vocab, bias=False)
        self.o.weight = self.e.weight

    def forward(self, x):
        h = self.e(x)
        return self.o(h + self.mix(h))


def test_output_logits_that_shrink_as_the_loss_falls_are_not_divergence():
    """A tied-head bigram LM at N(0, 1) starts with logits of ~128 and a
    log-partition of ~130; AdamW shrinks them as the loss falls 128 -> 5.
    The log-partition fell 51 nats by step 10 and output-logit-divergence
    fired.  Divergence is a drift away from 0: none now (the growing case
    is tests/test_attention.py's)."""
    torch.manual_seed(0)
    vocab = 64
    model = _TiedBigram(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, vocab, (512, 17))
    data[:, 1:] = (data[:, :-1] * 7 + 3) % vocab
    losses = []
    with sp.monitor(model, every=10, optimizer=opt) as mon:
        for k in range(60):
            batch = data[torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(k))]
            loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, vocab), batch[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
            losses.append(loss.item())
    logz = [h.output_logits.log_partition for h in mon.history if h.output_logits is not None]
    assert logz[0] > 100 and logz[0] - min(logz) > 50  # the premise: it moved 50 nats, toward 0
    assert losses[-1] < 0.2 * losses[0] and all(math.isfinite(v) for v in losses)
    assert not [a for a in mon.alerts if a.kind == "output-logit-divergence"]


class _LoRALinear(nn.Module):
    """A hand-written LoRA adapter on a frozen Linear; ``detached``: the bug
    that cuts the adapter's branch out of the graph."""

    def __init__(self, base: nn.Linear, detached: bool = False, rank: int = 4) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.detached = detached
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        d = x @ self.A.t() @ self.B.t()
        return self.base(x) + (d.detach() if self.detached else d)


def _lora_notes(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    torch.manual_seed(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with sp.monitor(model, every=5) as mon:
        for _ in range(10):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    return [(h.verdict, h.notes) for h in mon.history]


def test_trainable_parameters_without_a_gradient_are_named():
    """A LoRA adapter whose branch is detached by a bug gets no gradient and
    does not train.  Inside a trainable MLP every sample was "healthy" with
    no word; with a second, working adapter as the only other trainable part
    the note said "every parameter it used is frozen", which was false (the
    working adapter's matrices got gradients, outside any row).  Now both say
    which trainable parameters got no gradient, and the second says where
    the ones that train are."""
    torch.manual_seed(0)
    middle = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), _LoRALinear(nn.Linear(64, 64), detached=True), nn.Tanh(),
                           nn.Linear(64, 4))
    for verdict, notes in _lora_notes(middle):
        assert verdict == "healthy" and len(notes) == 1
        assert notes[0].startswith("2 trainable parameters got no gradient in this step (2.A, 2.B)")
    two = nn.Sequential(_LoRALinear(nn.Linear(16, 64), detached=True), nn.Tanh(), _LoRALinear(nn.Linear(64, 4)))
    for _, notes in _lora_notes(two):
        assert not any("every parameter it used is frozen" in n for n in notes)
        assert any("2 trainable parameters got one (2.A, 2.B)" in n for n in notes)
        assert any(n.startswith("2 trainable parameters got no gradient in this step (0.A, 0.B)") for n in notes)
    working = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), _LoRALinear(nn.Linear(64, 64)), nn.Tanh(), nn.Linear(64, 4))
    assert all(notes == () for _, notes in _lora_notes(working))  # the control: nothing to say


class _SelfDistil(nn.Module):
    """BYOL/self-distillation style: the target is the online encoder's own
    output on another view, computed under no_grad inside the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.online = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
        self.pred = nn.Linear(8, 8)

    def forward(self, a, b):
        with torch.no_grad():
            target = self.online(b)
        return F.mse_loss(self.pred(self.online(a)), target)


def test_a_layer_also_called_under_no_grad_is_not_an_island():
    """A layer called under no_grad besides its training call -- a logging
    probe of ``model[0]`` before the step's forward, a self-distillation
    target -- made every sample "incomplete" ("ran without autograd inside
    the forward"), and the target's layers were called frozen.  Its gradient
    is measured by its training call's row: the samples are judged, and the
    note says what those extra rows are."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with sp.monitor(m, every=5) as mon:
        for _ in range(10):
            with torch.no_grad():
                m[0](x).norm()  # a probe of the first layer, for a log
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    assert [h.verdict for h in mon.history] == ["healthy", "healthy"]
    torch.manual_seed(0)
    s = _SelfDistil()
    opt = torch.optim.SGD(s.parameters(), lr=0.05)
    a = torch.randn(64, 16)
    with sp.monitor(s, every=5) as mon:
        for _ in range(10):
            loss = s(a, a + 0.1 * torch.randn(64, 16))
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    for h in mon.history:
        assert h.verdict == "healthy" and not h.incomplete
        assert len(h.notes) == 1 and "ran without autograd (online.0, online.1, online.2) besides" in h.notes[0]


def _too_small(model: nn.Module, opt: torch.optim.Optimizer, batches, steps: int, loss_of) -> list[int]:
    with sp.monitor(model, every=10, optimizer=opt) as mon:
        for k in range(steps):
            loss = loss_of(model, *batches(k))
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    return [a.step for a in mon.alerts if a.kind == "update-too-small"]


def test_weights_not_meant_to_move_are_not_too_small():
    """update-too-small fired at step 1 on a backbone the optimizer holds at
    rate 0 (linear probing through the optimizer), and at step ~290 on a
    noiseless regression whose loss had converged to 1e-12 (its weights stop
    by design).  Neither is a rate too small now; the control, the same
    regression trained at a rate of 1e-9, still is."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.0}, {"params": m[2].parameters(), "lr": 0.0},
                           {"params": m[4].parameters()}], lr=0.1, momentum=0.9)
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    assert _too_small(m, opt, lambda k: (x, y), 30, lambda mod, a, b: F.cross_entropy(mod(a), b)) == []

    def regression(lr: float) -> list[int]:
        torch.manual_seed(0)
        r = nn.Sequential(nn.Linear(32, 128), nn.Linear(128, 128), nn.Linear(128, 1))
        xs = torch.randn(4096, 32)
        ys = xs @ torch.randn(32, 1) / 4

        def batch(k):
            i = torch.randint(0, 4096, (128,), generator=torch.Generator().manual_seed(k))
            return xs[i], ys[i]
        return _too_small(r, torch.optim.SGD(r.parameters(), lr=lr, momentum=0.9), batch, 350,
                          lambda mod, a, b: F.mse_loss(mod(a), b))

    assert regression(0.03) == []  # converges to ~1e-13 by step 300 (the weights stop moving)
    assert regression(1e-9)  # the control: a rate far too small is still named


@pytest.mark.parametrize("case", ["zero loss", "loop skipped the step", "skip= skipped it", "control"])
def test_an_optimizer_step_with_nothing_to_do_is_not_too_small(case):
    """(Outside stress test) update-too-small at the step after a sample
    whose optimizer step had nothing to do: every example masked out (a loss
    of exactly 0, so no gradient), a step the loop itself did not take, and
    a step skip= skipped (already excused).  The monitor knows each (the
    loss it read; the optimizer it guards).  The control, a rate of 1e-9,
    is still named."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(m.parameters(), lr=1e-9 if case == "control" else 0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    with sp.monitor(m, every=5, skip=opt) as mon:
        for s in range(9):
            loss = F.cross_entropy(m(x), y) * (0.0 if s == 6 and case == "zero loss" else 1.0)
            if s == 6 and case == "skip= skipped it":
                loss = loss * float("nan")
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            if not (s == 6 and case == "loop skipped the step"):
                opt.step()
    small = [a.step for a in mon.alerts if a.kind == "update-too-small"]
    assert small == ([1] if case == "control" else []), small  # (said once: at the first sample's update)


@pytest.mark.parametrize("case", ["adam too large", "momentum too small"])
def test_a_step_without_gradient_still_judges_the_update_it_made(case):
    """(Outside review of the fix above) The exemption for a step with a
    loss of exactly 0 hid every update alert on it, while Adam's first
    moment and SGD's momentum still move the weights: every other batch
    masked out, Adam at 0.05 (update/weight 0.15-0.22) lost its
    update-too-large, SGD at 1e-7 with momentum its update-too-small.  Only
    weights that did not move at all are excused now."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = torch.optim.Adam(m.parameters(), lr=0.05) if case == "adam too large" else \
        torch.optim.SGD(m.parameters(), lr=1e-7, momentum=0.9)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with sp.monitor(m, every=2) as mon:
        for s in range(12):
            loss = F.cross_entropy(m(x), y) * (0.0 if s % 2 else 1.0)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    kinds = {a.kind for a in mon.alerts}
    assert ("update-too-large" if case == "adam too large" else "update-too-small") in kinds, kinds


class _OneExpertMoE(nn.Module):
    """Top-1 routing that sends every example to expert 0 (a collapsed
    router): experts 1-4 get no gradient and do not move."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(5))
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.experts[0](h)))


def test_experts_without_a_gradient_are_not_too_small():
    """Four of seven weight layers got no gradient (no example routed to
    them): their zero update made the median "barely moved" at step 1.
    Layers without a gradient that step are not meant to move."""
    torch.manual_seed(0)
    m = _OneExpertMoE()
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    assert _too_small(m, opt, lambda k: (x, y), 30, lambda mod, a, b: F.cross_entropy(mod(a), b)) == []


class _ScaledLinear(nn.Linear):
    """An equalized-learning-rate style layer: its forward multiplies the stored weight by 3."""

    def forward(self, x):
        return F.linear(x, self.weight * 3.0, self.bias)


def _theory_net(second: type[nn.Linear] = nn.Linear, between: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(256, 256), nn.Tanh(), second(256, 256)]
    mods += [nn.Identity()] if between else []
    mods += [nn.Tanh(), nn.Linear(256, 16)]
    return nn.Sequential(*mods)


def test_the_theory_column_is_empty_where_a_layer_is_not_what_its_class_computes():
    """The theory column read a Linear subclass that multiplies its weight
    in forward, or one whose output a user's forward hook scales, as W x + b
    and showed numbers up to 76x off the measurement.  It is empty there now
    (never a wrong number); an Identity placeholder between a Linear and its
    activation, which passes the signal on unchanged, no longer empties it:
    the same predictions as without the placeholder (to 1e-12)."""
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    plain = sp.check(_theory_net(), x)
    assert all(layer.predicted_second_moment is not None for layer in plain.layers)
    scaled = sp.check(_theory_net(_ScaledLinear), x)
    assert all(layer.predicted_second_moment is None for layer in scaled.layers)
    hooked = _theory_net()
    hooked[2].register_forward_hook(lambda mod, args, out: out * 5)
    assert all(layer.predicted_second_moment is None for layer in sp.check(hooked, x).layers)
    with_id = sp.check(_theory_net(between=True), x)
    got = [v for layer in with_id.layers if layer.kind != "Identity"
           for v in (layer.predicted_second_moment, layer.predicted_grad_rms)]
    want = [v for layer in plain.layers for v in (layer.predicted_second_moment, layer.predicted_grad_rms)]
    assert got == pytest.approx(want, rel=1e-12)


class _HookScaled(nn.Module):
    """A tensor hook in the forward scales the gradient at ``a``'s output by 1e-9."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 256)
        self.b = nn.Linear(256, 2)

    def forward(self, x):
        h = self.a(x)
        h.register_hook(lambda g: g * 1e-9)
        return self.b(torch.relu(h))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1e-9


class _FunctionScaled(_HookScaled):
    """The same scaling as an autograd.Function: the oracle."""

    def forward(self, x):
        return self.b(torch.relu(_ScaleGrad.apply(self.a(x))))


def test_a_tensor_hook_that_scales_a_gradient_is_seen():
    """check took small rows' gradients as the backward returned them, before
    a tensor hook the forward put on the output afterwards: the layer read
    "healthy" at 1e9 times its true gradient.  Such a row is read after the
    hook now: the same rows (to 1e-6) as the same scaling written as an
    autograd.Function, and "vanishing"."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    hooked = sp.check(_HookScaled(), x)
    torch.manual_seed(0)
    oracle = sp.check(_FunctionScaled(), x)
    assert hooked.verdict == oracle.verdict == "vanishing"
    assert [layer.grad_rms for layer in hooked.layers] == pytest.approx([layer.grad_rms for layer in oracle.layers],
                                                                        rel=1e-6)


class _MaskedLogProbs(nn.Module):
    def __init__(self, fill: float = -math.inf) -> None:
        super().__init__()
        self.l = nn.Linear(32, 10)
        self.ls = nn.LogSoftmax(-1)
        self.fill = fill

    def forward(self, x, mask):
        return self.ls(self.l(x).masked_fill(mask, self.fill))


def test_minus_infinity_as_a_mask_is_not_a_failure():
    """Action masking: logits set to -inf on the excluded classes, then a
    LogSoftmax module, which keeps them -inf; the loss reads the allowed
    classes only and every gradient is finite.  check said "non-finite"
    (the same masking without the LogSoftmax module was "healthy").  A row
    whose non-finite entries are all -inf, in a pass otherwise finite, is a
    mask now: the verdict is the finite entries', a note says so, and the
    row keeps its share.  The control, +inf as the fill, makes NaN there and
    is still non-finite."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    mask = torch.zeros(64, 10, dtype=torch.bool)
    mask[:, 5:] = True
    y = torch.randint(0, 5, (64,))
    r = sp.check(_MaskedLogProbs(), (x, mask), loss_fn=F.nll_loss, targets=y)
    assert (r.verdict, r.problems) == ("healthy", ())
    assert r.layers[-1].nonfinite_fraction == pytest.approx(0.5)
    assert any("-inf entries and nothing worse (ls" in n for n in r.summary.notes)
    bad = sp.check(_MaskedLogProbs(math.inf), (x, mask), loss_fn=F.nll_loss, targets=y)
    assert bad.verdict == "non-finite"


def test_a_share_hovering_about_its_limit_down_a_deep_net_is_one_problem():
    """A 300-layer ReLU MLP (width 64, Kaiming-normal, zero biases): the
    dead share of its ReLU rows drifts up to about 50% and hovers there, so
    rows past the limit alternate with rows under it.  Each run of them was
    a problem of its own (56 boxes, a 368-line report, one fix repeated).
    Rows of one role are one problem now, spanning the first to the last."""
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(32, 64)]
    for _ in range(300):
        mods += [nn.ReLU(), nn.Linear(64, 64)]
    m = nn.Sequential(*mods, nn.ReLU(), nn.Linear(64, 10))
    for mod in m:
        if isinstance(mod, nn.Linear):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            nn.init.zeros_(mod.bias)
    r = sp.check(m, torch.randn(64, 32))
    dead = [layer.index for layer in r.layers if layer.verdict == "dead"]
    assert len(dead) > 10 and {r.layers[i].kind for i in dead} == {"ReLU"}  # the premise: many, not adjacent
    assert any(b - a > 4 for a, b in zip(dead, dead[1:]))
    problems = [p for p in r.problems if p.kind == "dead"]
    assert len(problems) == 1 and (problems[0].first, problems[0].last) == (dead[0], dead[-1])
    assert problems[0].message.startswith(f"{len(dead)} ReLU layers")


class _GRULoop(nn.Module):
    """A GRUCell unrolled in a Python loop, the output read at the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(16, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x):
        h = torch.zeros(x.shape[1], 64)
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
        return self.out(h)


class _ListMLP(nn.Module):
    """An MLP of raw parameters: F.linear on a ParameterList, torch.tanh between."""

    def __init__(self, depth: int = 12, width: int = 64, std: float = 0.02) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.randn(width, width) * std) for _ in range(depth))

    def forward(self, x):
        for w in self.w:
            x = torch.tanh(F.linear(x, w))
        return x


def test_vanishing_in_a_cells_calls_or_raw_parameters_gets_a_fix_that_applies():
    """An unrolled GRUCell's vanishing gradient was "at cell" (which of the
    30 calls?) with the fix critical_(model, inputs), which leaves GRUCell
    untouched; an MLP of F.linear on a ParameterList got the same fix, which
    raises (no Linear or Conv layers).  The problem now names the calls and
    a fix for recurrent cells, or, where no layer is one signalprop.init
    sets, says how to scale the raw weights."""
    torch.manual_seed(0)
    r = sp.check(_GRULoop(), torch.randn(30, 8, 16))
    p = next(p for p in r.problems if p.kind == "vanishing")
    assert p.layer.startswith("cell (calls 1–") and "(calls 1–" in p.message
    assert "orthogonal" in p.suggestion and "critical_" not in p.suggestion
    torch.manual_seed(0)
    r = sp.check(_ListMLP(), torch.randn(32, 64))
    p = next(p for p in r.problems if p.kind == "vanishing")
    assert "critical_" not in p.suggestion and "outside Linear/Conv modules" in p.suggestion


def test_a_physics_informed_loss_is_sampled_at_its_own_backward():
    """A PINN: the loss holds du/dt, a torch.autograd.grad(create_graph=True)
    through the model, and a second forward at the boundary.  That
    derivative's backward reached the sampled rows first: the monitor took
    it for the loss's, found the witness's .grad empty, said the gradients
    were zeroed (a GAN's pattern), switched to the boundary forward and
    alerted "vanishing" on a run that trains.  A create_graph backward fills
    no .grad to watch, and the loss's backward, arriving later, replaces
    its gradients: the last row's is dL/du, read off autograd (1e-6)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t = torch.linspace(0, 2, 64).unsqueeze(1).requires_grad_(True)
    losses, first = [], None
    with sp.monitor(model, every=10, optimizer=opt) as mon:
        for k in range(40):
            u = model(t)
            du = torch.autograd.grad(u.sum(), t, create_graph=True)[0]
            loss = (du + u).pow(2).mean() + (model(torch.zeros(1, 1)) - 1).pow(2).mean()
            opt.zero_grad()  # after the forward, as the README's loop has it
            loss.backward()
            mon.step(loss)
            opt.step()
            losses.append(loss.item())
            if k == 0:
                first = float((2 * (du + u) / 64).detach().pow(2).mean().sqrt())
    assert losses[-1] < 0.5 * losses[0]
    assert [(h.step, h.verdict, h.layers[0].shape) for h in mon.history] == \
        [(k, "healthy", (64, 32)) for k in (0, 10, 20, 30)]
    assert mon.alerts == []
    assert mon.history[0].layers[-1].grad_rms == pytest.approx(first, rel=1e-6)


class _SharedReLU(nn.Module):
    """A deep ReLU MLP whose one activation module is called at every layer."""

    def __init__(self, depth: int = 60) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(depth))
        self.act = nn.ReLU()
        for lin in [self.inp, *self.layers]:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        with torch.no_grad():
            for lin in self.layers:
                lin.bias[:40] = -3.0  # 40 of 64 units pushed toward dead

    def forward(self, x):
        x = self.inp(x)
        for lin in self.layers:
            x = self.act(lin(x))
        return x


def test_one_activation_called_at_every_layer_is_one_problem_too():
    """(Review) Grouping by role put each call of a shared ReLU module in a
    group of its own (a module's k-th call has role ``...@k``): one problem
    per dead call.  Its calls are one role: one problem, naming the calls."""
    torch.manual_seed(0)
    r = sp.check(_SharedReLU(), torch.randn(256, 32))
    dead = [p for p in r.problems if p.kind == "dead"]
    assert len([layer for layer in r.layers if layer.verdict == "dead"]) > 5  # the premise
    assert len(dead) == 1 and dead[0].layer.startswith("act (calls ")


def test_a_float16_overflow_to_minus_infinity_is_not_a_mask():
    """(Review) A float16 layer whose outputs overflow to -inf from finite
    inputs, then a ReLU that zeroes them: every gradient stays finite, and
    the -inf-as-mask rule called it "healthy".  A row that makes -inf from
    finite inputs is a failure: non-finite, at that layer."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        m[0].weight.mul_(30)
        m[2].weight[:8] = -m[2].weight[:8].abs() * 3000
    m = m.half()
    x = torch.randn(128, 32).half()
    r = sp.check(m, x)
    assert r.verdict == "non-finite" and r.problems[0].layer == "2"


def test_a_stateless_param_group_does_not_keep_adams_first_moment_filling():
    """(Review) A frozen backbone kept in its own Adam group has no state:
    its step count stayed 0 and update-too-large was never judged for any
    group.  A group without state takes no step to fill: the rate the rest
    keeps is judged once their first moment has filled."""
    def alerts(frozen_group: bool) -> list[int]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        m[0].requires_grad_(False)
        rest = list(m[2].parameters()) + list(m[4].parameters())
        groups = [{"params": list(m[0].parameters()), "lr": 1e-5}, {"params": rest}] if frozen_group else rest
        opt = torch.optim.Adam(groups, lr=3.0)
        x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
        with sp.monitor(m, every=5, optimizer=opt) as mon:
            for _ in range(30):
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                mon.step(loss)
                opt.step()
        return [a.step for a in mon.alerts if a.kind == "update-too-large"]

    assert alerts(True) == alerts(False) != []


class _HookThenInplace(_HookScaled):
    """The 1e-9 hook on a's output, then an in-place ReLU on that output."""

    def forward(self, x):
        h = self.a(x)
        h.register_hook(lambda g: g * 1e-9)
        return self.b(torch.relu_(h))


def test_a_tensor_hook_before_an_in_place_op_is_seen_too():
    """(Review) An in-place op after the hook clears the tensor's hook dict
    but not the node's: the hook was missed again, 1e9x off.  A row whose
    output was written since it was recorded is read after the node's hooks."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    r = sp.check(_HookThenInplace(), x)
    torch.manual_seed(0)
    oracle = sp.check(_FunctionScaled(), x)
    assert r.verdict == "vanishing"
    assert r.layers[0].grad_rms == pytest.approx(oracle.layers[0].grad_rms, rel=1e-6)


def test_a_loss_scale_where_squares_turn_subnormal_reads_the_exact_rms():
    """(Review) Below a largest entry of 1.08e-19 every float32 square is
    subnormal or 0: at a loss scaled by 10^-18.72 the first layer's RMS read
    9x low with no exact pass (a little further down it reads 0, which did
    send the pass to the exact one).  Such rows go to the exact pass now: the
    relative gradients are the unscaled loss's (1e-5)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                      nn.Linear(256, 10))
    x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
    ref = sp.check(m, x, loss_fn=F.cross_entropy, targets=y)
    r = sp.check(m, x, loss_fn=lambda o, t: F.cross_entropy(o, t) * 10 ** -18.72, targets=y)
    assert [a.relative_grad_rms for a in r.layers] == pytest.approx([b.relative_grad_rms for b in ref.layers],
                                                                   rel=1e-5)


class _MyLinear(nn.Linear):
    """A Linear subclass without a forward of its own: signalprop.init sets it."""


class _BackwardHooked(nn.Sequential):
    pass


def test_fixes_and_theory_follow_what_layers_are_not_their_names():
    """(Review) A model of Linear subclasses was told its weights are "used
    outside Linear/Conv modules", though critical_ sets them; the theory
    column ignored a module backward hook that scales the gradient.  The
    fix is chosen by isinstance, and the column is empty under such a hook."""
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(30):
        mods += [_MyLinear(32, 32), nn.Sigmoid()]
    r = sp.check(nn.Sequential(*mods), torch.randn(64, 32))
    p = next(p for p in r.problems if p.kind == "vanishing")
    assert "critical_" in p.suggestion and "outside Linear/Conv" not in p.suggestion
    m = _theory_net()
    m[2].register_full_backward_pre_hook(lambda mod, go: (go[0] * 1e-6,))
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    assert all(layer.predicted_grad_rms is None for layer in sp.check(m, x).layers)


def test_check_names_trainable_parameters_its_backward_does_not_reach():
    """A collapsed router sends every example to expert 0: experts 1-4 get
    no gradient and would not train, and check said nothing (they are not
    called, so they have no row).  The note names them, as the monitor's does."""
    torch.manual_seed(0)
    m = _OneExpertMoE()
    r = sp.check(m, torch.randn(64, 16))
    notes = [n for n in r.summary.notes if "trainable parameters got no gradient" in n]
    assert len(notes) == 1 and notes[0].startswith("8 trainable parameters got no gradient (experts.1.weight, "
                                                   "experts.1.bias, experts.2.weight, ...)")
    assert not any("trainable parameters got no gradient" in n  # the control: every parameter used
                   for n in sp.check(nn.Sequential(nn.Linear(16, 8), nn.Tanh()), torch.randn(64, 16)).summary.notes)


class _MaskFill(nn.Module):
    """A module that fills a mask itself: -inf where ``mask`` is set."""

    def forward(self, x, mask):
        return torch.where(mask, torch.full_like(x, -math.inf), x)


class _MaskedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(32, 10)
        self.fill = _MaskFill()
        self.ls = nn.LogSoftmax(-1)

    def forward(self, x, mask):
        return self.ls(self.fill(self.l(x), mask))


def test_a_mask_filled_by_a_module_of_its_own_is_a_mask():
    """(Second review) The float16-overflow rule ("a row that makes -inf from
    finite inputs is a failure") called a float32 module that fills the mask
    itself "non-finite".  Only a low-precision row making -inf from finite
    inputs has overflowed; this one is a mask, as inline masking is."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    mask = torch.zeros(64, 10, dtype=torch.bool)
    mask[:, 5:] = True
    y = torch.randint(0, 5, (64,))
    r = sp.check(_MaskedHead(), (x, mask), loss_fn=F.nll_loss, targets=y)
    assert (r.verdict, r.problems) == ("healthy", ())
    assert any("-inf entries and nothing worse (fill, ls:" in n for n in r.summary.notes)


def test_an_adam_group_added_mid_run_is_filling_at_its_first_step():
    """(Second review) A body unfrozen at step 20 through add_param_group: its
    first Adam step moves every entry by the learning rate, and the
    stateless-group rule made that update-too-large.  A group without state
    whose parameters have gradients is at its first step: not judged."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    head, body = list(m[4].parameters()), list(m[0].parameters()) + list(m[2].parameters())
    for p in body:
        p.requires_grad_(False)
    opt = torch.optim.Adam(head, lr=1e-2)
    ratios = {}
    with sp.monitor(m, every=1, optimizer=opt) as mon:
        for k in range(26):
            if k == 20:
                for p in body:
                    p.requires_grad_(True)
                opt.add_param_group({"params": body})
            g = torch.Generator().manual_seed(k)
            x = torch.randn(128, 32, generator=g)
            loss = F.cross_entropy(m(x), x[:, :10].argmax(1))
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    ratios = {h.step: dict(h.update_ratios) for h in mon.history if h.update_ratios}
    assert ratios[20]["2"] > 0.1  # the premise: the body's first step is that large
    assert not [a for a in mon.alerts if a.kind == "update-too-large"]


class _TwoStacks(nn.Module):
    """An encoder and a decoder stack sharing one ReLU module; only the first
    and last three layers are pushed dead (bias -3 on 56 of 64 units)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(14))
        self.act = nn.ReLU()
        for k, lin in enumerate(self.layers):
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
            if k < 3 or k >= 11:
                with torch.no_grad():
                    lin.bias[:56] = -3.0

    def forward(self, x):
        for lin in self.layers:
            x = self.act(lin(x))
        return x


def test_one_activation_shared_by_two_stacks_far_apart_is_two_problems():
    """(Second review) Grouping a module's calls as one role merged dead calls
    of an encoder and of a decoder, healthy in between, into one problem.
    Calls of a role are one problem only when close, or when the calls
    between hover near the limit too."""
    torch.manual_seed(0)
    r = sp.check(_TwoStacks(), torch.randn(256, 64))
    dead = [p for p in r.problems if p.kind == "dead"]
    between = [layer.dead_fraction for layer in r.layers if layer.kind == "ReLU"][3:11]
    assert max(between) < 0.5 and min(between) < 0.25  # the premise: the calls between are healthy
    assert len(dead) == 2 and dead[0].last < dead[1].first


def test_a_layer_unfrozen_into_a_trained_group_is_at_its_own_first_adam_steps():
    """(Outside stress test) Gradual unfreezing: a layer unfrozen at step 30
    in the Adam group whose other layers have trained 30 steps has no state
    of its own, so its first steps move every entry by about the rate, as
    the run's first steps do (excused there: the first moment is filling).
    The count was the group's most advanced parameter's, and the layer was
    alerted update-too-large at a ratio of 0.19 that its own group (or
    training from step 0, 0.13) is not alerted at.  Each parameter's own
    count decides now."""
    def alerts(own_group: bool) -> list[tuple[int, str]]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        m[2].requires_grad_(False)
        rest = [p for n, p in m.named_parameters() if not n.startswith("2.")]
        groups = [{"params": rest}, {"params": list(m[2].parameters())}] if own_group else list(m.parameters())
        opt = torch.optim.Adam(groups, lr=7e-3)
        w = torch.randn(32, 10)
        with sp.monitor(m, every=1, optimizer=opt) as mon:
            for s in range(36):
                if s == 30:
                    m[2].requires_grad_(True)
                x = torch.randn(64, 32)
                loss = F.cross_entropy(m(x), (x @ w).argmax(1))
                opt.zero_grad()
                loss.backward()
                mon.step(loss)
                opt.step()
        ratios = [dict(h.update_ratios).get("2") for h in mon.history]
        assert ratios[30] is not None and ratios[30] > 0.1  # the premise: its first step is above the bound
        return [(a.step, a.layer) for a in mon.alerts if a.kind == "update-too-large"]

    assert alerts(own_group=False) == alerts(own_group=True) == []


class _EmptyBlock(nn.Module):
    """An optional feature block with no features in this configuration: an ``nn.Linear(0, 3)``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: initializing a zero-element tensor is a no-op
            self.extra = nn.Linear(0, 3)

    def forward(self, x, feats):
        return self.body(x) + self.extra(feats)


def test_an_empty_parameter_under_adam_leaves_the_update_measured():
    """(Outside stress test) Adam's second-moment lag took the largest entry
    of every parameter's ratio, and an empty one raised (amax of no entries)
    on every step after a sample: its update ratios, update statistics and
    alerts were lost, with a warning that the step was not measured.  An
    empty parameter has no entry to compare and is left out of the lag."""
    torch.manual_seed(0)
    m = _EmptyBlock()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    with sp.monitor(m, every=2, optimizer=opt) as mon:  # a warning of the monitor's is an error here
        for _ in range(6):
            x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
            loss = F.cross_entropy(m(x, torch.randn(32, 0)), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    measured = [h.step for h in mon.history if dict(h.update_ratios).get("body") is not None]
    assert measured == [0, 2]  # (the last sample's update comes after the run's end)


def test_a_failure_measuring_the_update_loses_the_update_not_the_steps_alerts(monkeypatch):
    """(Outside stress test) The weights' snapshot for a sample's update is
    taken on the step after it, between the step's loss and its alerts: a
    failure there (the empty parameter above was one) dropped that step's
    alerts and its skip decision.  Now it costs the update only, with one
    warning: a corrupted batch on the step after a sample is still called a
    batch spike."""
    import signalprop.monitor.update as U

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(U, "adam_lag", broken)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    # learning, then one bad batch at step 41: the step after the sample at 40, where its update is taken
    losses = [2.3 * 0.97 ** k for k in range(41)] + [50.0]
    with pytest.warns(RuntimeWarning, match="update after the sample at step 0 was not measured"), \
            sp.monitor(m, every=20, optimizer=opt) as mon:
        steps_with_losses(m, opt, mon, losses, x, y)
    assert (41, "batch-spike") in [(a.step, a.kind) for a in mon.alerts]
