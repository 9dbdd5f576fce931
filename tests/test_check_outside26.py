"""What an outside stress test of ``check`` on models it was not built on
found (session 26).  Each test fails on the code before its fix."""

import pytest
import torch
from torch import nn

import signalprop as sp


class _Mixer(nn.Module):
    def __init__(self, d: int, gain: float) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        nn.init.orthogonal_(self.proj.weight, gain)

    def forward(self, x):
        return self.proj(x)


class _SSM(_Mixer):
    pass


class _Attention(_Mixer):
    pass


class _HybridLayer(nn.Module):
    """A hybrid's layer (Jamba, Zamba): a Mamba-like or an attention mixer behind a norm (residual) or
    behind a Linear of its own (no residual)."""

    def __init__(self, d: int, kind: str, ssm_gain: float, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        if residual:
            self.norm = nn.LayerNorm(d)
        else:
            self.pre = nn.Linear(d, d, bias=False)
            nn.init.orthogonal_(self.pre.weight)
        if kind == "ssm":
            self.ssm = _SSM(d, ssm_gain)
        else:
            self.attn = _Attention(d, 1.0)

    def forward(self, x):
        h = self.norm(x) if self.residual else self.pre(x)
        h = self.ssm(h) if hasattr(self, "ssm") else self.attn(h)
        return x + h if self.residual else h


class _Hybrid(nn.Module):
    def __init__(self, n: int, ssm_gain: float, residual: bool, d: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_HybridLayer(d, "ssm" if i % 2 == 0 else "attn", ssm_gain, residual)
                                    for i in range(n))
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_alternating_block_types_are_no_depth_trend():
    """HF Jamba at its default init (Mamba and attention layers alternate,
    each behind an ``input_layernorm``) was "vanishing 1,000,000x" over 4
    layers: the norm before a Mamba mixer gets a gradient ~100x smaller than
    the one before attention, and the median of that sawtooth's steps was
    read as a trend.  Norms of blocks that compute different things are not
    one series."""
    torch.manual_seed(0)
    rep = sp.check(_Hybrid(6, 1e-2, residual=True), torch.randn(16, 64))
    norms = [r.relative_grad_rms for r in rep.layers if r.kind == "LayerNorm"]
    assert min(norms[1::2]) / max(norms[0::2]) > 30  # the sawtooth is there
    assert rep.verdict == "healthy", [p.message for p in rep.problems]


def test_a_trend_through_alike_blocks_of_a_hybrid_is_still_found():
    """Without residuals each pair of layers shrinks the gradient 10x (the
    Mamba-like mixer's gain 0.1): the Linear before each mixer, compared
    with the same Linear of blocks of its kind only, still shows it (a guard
    for the fix above)."""
    torch.manual_seed(0)
    rep = sp.check(_Hybrid(10, 0.1, residual=False), torch.randn(64, 64))
    assert rep.verdict == "vanishing"
    assert any("layers.*.pre" in p.message for p in rep.problems), [p.message for p in rep.problems]


class _CapturesOnFirstCall(nn.Module):
    """What HF transformers 5 does: the first forward registers output-capturing
    forward hooks on the layers and records that in a Python attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.captured: list[torch.Tensor] = []

    def forward(self, x):
        if not getattr(self, "_hooks_installed", False):
            for layer in self.layers:
                layer.register_forward_hook(lambda m, a, out: self.captured.append(out))
            self._hooks_installed = True
        for layer in self.layers:
            x = layer(x)
        return x


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_a_forward_registers_are_removed_with_the_attribute_that_records_them():
    """check put the attribute back but left the hooks: the next forward
    registered a second set, and every check one more (HF's DPT, LLaMA, ...)."""
    torch.manual_seed(0)
    m = _CapturesOnFirstCall()
    x = torch.randn(4, 8)
    sp.check(m, x)
    sp.check(m, x)
    assert _hooks(m) == 0 and not hasattr(m, "_hooks_installed") and m.captured == []
    m(x)
    assert _hooks(m) == 3 and len(m.captured) == 3


def test_hooks_of_the_users_own_stay():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    seen = []
    m[0].register_forward_hook(lambda mod, a, out: seen.append(1))
    m[2].register_forward_pre_hook(lambda mod, a: None)
    sp.check(m, torch.randn(4, 8))
    assert len(m[0]._forward_hooks) == 1 and len(m[2]._forward_pre_hooks) == 1 and seen == [1]


def test_an_hf_model_checked_before_its_first_forward_gets_no_second_set_of_hooks():
    """HF registers its output-capturing hooks on the first forward that collects outputs (hidden states:
    DPT's neck always asks for them)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2)
    m = transformers.LlamaForCausalLM(cfg)
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "output_hidden_states": True}
    m(**batch)
    once = _hooks(m)
    assert once > 0
    m2 = transformers.LlamaForCausalLM(cfg)
    sp.check(m2, batch)
    assert _hooks(m2) == 0
    m2(**batch)
    assert _hooks(m2) == once


class _TrainOnlyBackward(torch.autograd.Function):
    """HF Reformer's reversible layers: their backward asserts the model is in training mode."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("If you want to train this model, make sure to use model.train()")


class _Reversible(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(_TrainOnlyBackward.apply(self.a(x)))


def test_an_error_raised_in_a_custom_backward_is_named_as_the_backwards():
    """A RuntimeError from the backward was a ModelError naming the backward;
    any other exception (Reformer's AssertionError in eval mode) came out bare."""
    torch.manual_seed(0)
    m = _Reversible()
    m.a.weight.grad = torch.ones_like(m.a.weight)
    with pytest.raises(sp.probe.ModelError, match=r"backward failed on inputs of shape \(4, 8\): AssertionError: If "
                                                  r"you want to train"):
        sp.check(m, torch.randn(4, 8))
    assert torch.equal(m.a.weight.grad, torch.ones_like(m.a.weight)) and m.b.weight.grad is None


class _MaybeLogged(nn.Module):
    def __init__(self, keep_log: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        if keep_log:
            self.log: list[torch.Size] = []

    def forward(self, x):
        if hasattr(self, "log"):
            self.log.append(x.shape)
        return self.fc(x)


def test_a_list_only_some_instances_of_a_class_hold_comes_back():
    """The names of a class's container attributes were read off the first
    instance seen: a second one holding a list the first did not (set under
    a flag of ``__init__``) kept what the pass appended."""
    torch.manual_seed(0)
    m = nn.Sequential(_MaybeLogged(False), _MaybeLogged(True))
    log = m[1].log
    sp.check(m, torch.randn(4, 8))
    assert m[1].log is log and log == []
