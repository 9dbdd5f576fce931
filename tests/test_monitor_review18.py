"""Review 18 of the monitor (a helper fine-tuning small HF models as
practitioners do): the output a model called with ``labels=`` stands for,
compiled submodules, parameters of non-leaf modules, zero-initialised
layers, and the blame for an overflowing forward.  Each test failed on the
version before its fix."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp


def _llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).train()


def test_a_model_called_with_labels_is_judged_by_its_logits():
    """HF models called with ``labels=`` return their loss first; the
    monitor took that 0-d loss for the output, whose gradient is 1, so every
    relative gradient was the raw one (a healthy converging run read
    "vanishing").  Now the reference is the logits: the sample equals that of
    the same step with the loss computed outside the model from ``.logits``."""
    x = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    samples = {}
    for how in ("labels", "external"):
        m = _llama()
        with sp.monitor(m, every=1) as mon:
            if how == "labels":
                loss = m(input_ids=x, labels=x).loss
            else:
                logits = m(input_ids=x).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, 100), x[:, 1:].reshape(-1))
            loss.backward()
            mon.step(loss)
        samples[how] = mon.history[0]
    a, b = samples["labels"], samples["external"]
    assert a.output_grad_rms == pytest.approx(b.output_grad_rms, rel=1e-6)
    assert a.output_grad_rms < 0.01  # the logits' gradient, not the loss's own (1.0)
    for ra, rb in zip(a.layers, b.layers, strict=True):
        if rb.relative_grad_rms is None:
            assert ra.relative_grad_rms is None
        else:
            assert ra.relative_grad_rms == pytest.approx(rb.relative_grad_rms, rel=1e-6), ra.name
    assert a.verdict == b.verdict == "healthy"


def test_model_output_prefers_logits_then_a_tensor_over_a_scalar():
    from signalprop.probe.recorder import model_output

    loss, logits, hidden = torch.tensor(2.0), torch.randn(2, 3, 5), torch.randn(2, 3, 4)
    assert model_output({"loss": loss, "hidden": hidden, "logits": logits}) is logits
    assert model_output((loss, hidden)) is hidden
    assert model_output([loss]) is loss
    assert model_output(torch.arange(3)) is None


def test_finite_weights_whose_norm_overflows_are_not_called_non_finite():
    """Weights of ~1e20 are finite, but their sum of squares passes float32's
    range: the previous version read the infinite norm as "the weights
    themselves are non-finite (an earlier optimizer step overflowed them)".
    The forward that overflows is named instead."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    with sp.monitor(m, every=50) as mon:
        for k in range(3):
            if k == 2:
                with torch.no_grad():
                    m[2].weight.mul_(1e20)
                    m[3].weight.mul_(1e20)
            x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
            mon.step(loss)
            opt.step()
    bad = [a for a in mon.alerts if a.kind == "non-finite"]
    assert len(bad) == 1 and bad[0].step == 2
    assert "weights themselves" not in bad[0].message and bad[0].layer == "3"
    assert bad[0].phase == "forward" and not math.isfinite(mon.losses[2])


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))  # a functional activation: the recorder's mode is on around it


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.mlp = _MLP()
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.mlp(self.norm(h))
        return self.out(F.gelu(h))


# dynamo reads .grad of non-leaf tensors while it traces (its own warning, unmonitored runs too)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_a_compiled_submodule_is_one_row_and_training_goes_on():
    """``torch.compile`` on one submodule whose forward calls F.gelu: the
    monitor's hooks inside it were traced by dynamo, which raised into the
    training loop at step 0.  Now the compiled module is one row (named by
    its own class), measured from its output, its inside left alone and run
    without the recording mode; the run trains as it does unmonitored, bit
    for bit, and ``check`` reads it the same way."""
    def run(monitored):
        torch.manual_seed(0)
        m = _Blocks()
        m.mlp = torch.compile(m.mlp, backend="aot_eager")
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        mon = sp.monitor(m, every=2) if monitored else None
        for k in range(4):
            g = torch.Generator().manual_seed(k)
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 2, (32,), generator=g)
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            if mon is not None:
                mon.step(loss)
            opt.step()
        if mon is not None:
            mon.close()
        return m, mon

    plain, _ = run(False)
    watched, mon = run(True)
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    h = mon.history[0]
    assert h.verdict == "healthy"
    rows = {r.name: r for r in h.layers}
    assert rows["mlp"].kind == "_MLP" and rows["mlp"].grad_rms > 0
    assert not any(n.startswith("mlp.") for n in rows)
    report = sp.check(watched, torch.randn(16, 8))
    assert "mlp" in [r.name for r in report.layers]


class _LoRA(nn.Module):
    """A frozen base layer plus a low-rank update B(A(x)), B zero-initialised (PEFT's default)."""

    def __init__(self, base, r=4):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + 2.0 * self.lora_B(self.lora_A(x))


def test_an_exact_zero_before_a_zero_initialised_layer_is_not_vanishing():
    """LoRA's B starts at 0, so the gradient reaching A's output is exactly 0
    until B moves -- by design.  The first sample read "vanishing: exactly 0
    (it underflows)" (the frozen base gives no earlier row a gradient);
    now it is healthy, in check too, while the same rows with no all-zero
    layer after them (B's weights read as non-zero) stay vanishing."""
    torch.manual_seed(0)
    model = nn.Sequential(_LoRA(nn.Linear(16, 32)), nn.Tanh(), _LoRA(nn.Linear(32, 4)))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with sp.monitor(model, every=1) as mon:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        mon.step(loss)
    h = mon.history[0]
    rows = {r.name: r for r in h.layers}
    assert rows["0.lora_A"].grad_rms == 0 and rows["2.lora_A"].grad_rms == 0
    assert h.verdict == "healthy", [p.message for p in h.problems]
    assert sp.check(model, x, loss_fn=lambda out: F.cross_entropy(out, y)).verdict == "healthy"
    from signalprop.probe.diagnose import diagnose
    from signalprop.records import evolve

    # the same rows without the zero layer after them: an exact 0 nothing explains
    layers = [evolve(r, grad_to_weight=1.0) if r.name.endswith("lora_B") else r for r in h.layers]
    assert diagnose(layers, None, (1e-6, 1e3), 100.0)[0] == "vanishing"


class _ParamLoRA(nn.Module):
    """An adapter held as parameters of the wrapper itself (not as layers): the wrapper is not a row."""

    def __init__(self, base, r=4):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.randn(base.out_features, r) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.A.t() @ self.B.t()


class _Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.block = nn.Sequential(_ParamLoRA(nn.Linear(16, 16)), nn.Tanh(), _ParamLoRA(nn.Linear(16, 16)))
        self.head = nn.Linear(16, 4)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
@pytest.mark.parametrize("reentrant", [True, False])
def test_adapters_held_by_a_wrapper_that_got_no_gradient_are_incomplete(reentrant):
    """Reentrant checkpointing of a block whose input does not require grad
    runs it without autograd: its adapters -- parameters of the wrapper
    modules, which are not rows (rows are leaf modules) -- got no gradient
    and do not train, yet the sample was "healthy" on the head's row alone.
    Now "incomplete", naming the wrappers; non-reentrant checkpointing trains
    them and stays healthy."""
    torch.manual_seed(0)
    model = _Checkpointed(reentrant)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    with sp.monitor(model, every=1) as mon:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        mon.step(loss)
    got = [p.grad is not None for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
    h = mon.history[0]
    if reentrant:
        assert not any(got)
        assert h.verdict == "incomplete" and "block.0, block.2" in h.incomplete
    else:
        assert all(got) and h.verdict == "healthy"


# -- check on the same fine-tuning patterns (a helper's review of check) --------------------------------


class _FakeQuant(nn.Module):
    def forward(self, x):
        return torch.round(x * 16) / 16  # no straight-through estimator: its derivative is 0


def test_a_zero_layer_excuses_only_the_exact_zeros_that_feed_it():
    """An exact-0 gradient is excused only on the run of rows right before
    the all-zero module; a rounding step that cuts every gradient before it
    stays vanishing when a zero-initialised LoRA head sits further on (a
    first version excused every exact 0 before any zero module)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), _FakeQuant(), nn.Linear(64, 48), nn.Tanh(),
                          _LoRA(nn.Linear(48, 10)))
    report = sp.check(model, torch.randn(128, 32))
    assert report.verdict == "vanishing" and report.layers[0].grad_rms == 0
    assert "zero derivative" in report.problems[0].message
    assert {r.name: r for r in report.layers}["5.lora_A"].grad_rms == 0
    assert report.problems[0].layer == "0 .. 1"  # the rows the rounding cuts, not the adapter's


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_check_reads_a_compiled_zero_head_and_checkpointed_blocks_as_the_plain_model():
    """A compiled module with all-zero weights reads as the plain one does
    (its row had no parameter statistics: a false "vanishing"), and a model
    whose blocks run under non-reentrant activation checkpointing in train
    mode gets the rows of the plain model, not the backward's recomputation
    as extra rows (18 more on a 2-layer HF model)."""
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    def make(wrap):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Sequential(nn.Linear(32, 32), nn.Tanh()), nn.Linear(32, 4))
        nn.init.zeros_(m[3].weight)
        nn.init.zeros_(m[3].bias)
        if wrap == "compiled":
            m[3] = torch.compile(m[3], backend="aot_eager")
        if wrap == "checkpointed":
            m[2] = Ckpt(m[2])
        return m.train()

    x = torch.randn(64, 16)
    plain = sp.check(make(None), x)
    compiled = sp.check(make("compiled"), x)
    assert plain.verdict == compiled.verdict == "healthy"
    ck = sp.check(make("checkpointed"), x)
    assert [r.grad_rms for r in ck.layers] == pytest.approx([r.grad_rms for r in plain.layers], rel=1e-6)


def test_check_with_labels_reads_the_logits_and_refuses_what_it_cannot_use():
    """``labels=`` in the inputs: the report equals the one without them (the
    output is the logits, not the 0-d loss, whose gradient made every
    relative gradient the raw one).  ``targets`` without ``loss_fn``, a model
    on the meta device, and reentrant checkpointing in train mode are
    refused with what to do (they were ignored, or torch's own message)."""
    m = _llama()
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with_labels = sp.check(m, {"input_ids": x, "labels": x})
    without = sp.check(m, {"input_ids": x})
    assert [r.relative_grad_rms for r in with_labels.layers] == [r.relative_grad_rms for r in without.layers]
    with pytest.raises(ValueError, match="pass loss_fn as well"):
        sp.check(nn.Linear(4, 2), torch.randn(3, 4), targets=torch.zeros(3))
    with torch.device("meta"):
        lazy = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="meta device"):
        sp.check(lazy, torch.randn(3, 4))
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    from signalprop.probe.inputs import ModelError

    with pytest.raises(ModelError, match="reentrant activation checkpointing"):
        sp.check(m.train(), {"input_ids": x})


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class _Sub(_Net):
    def forward(self, x):
        return super().forward(x)


class _Delegates(_Net):
    def forward(self, x, scale=1.0):
        return _Net.forward(self, x) * scale


@pytest.mark.parametrize("cls", [_Sub, _Delegates])
def test_a_forward_that_reaches_its_base_classs_keeps_its_functional_rows(cls):
    """A subclass whose forward calls ``super().forward()`` (or the base's by
    name) lost the F.gelu its base calls: only the class's own forward was
    read for activation calls (a subclassed Llama attention lost its
    attention rows, and q/k x30 read healthy)."""
    torch.manual_seed(0)
    r = sp.check(cls(), torch.randn(8, 16))
    assert [(row.name, row.kind) for row in r.layers] == [("a", "Linear"), ("gelu", "F.gelu"), ("b", "Linear")]
