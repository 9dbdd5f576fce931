"""What an outside stress test of ``check`` on models it was not built on
found (session 26).  Each test fails on the code before its fix."""

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
