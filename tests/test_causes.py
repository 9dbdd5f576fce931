"""The fix a problem suggests follows its cause (issue 26): a residual
stream that grows with depth is fixed by scaling the branches, not by
rescaling every weight -- and following the advice does fix it."""

import re

import pytest
import torch
from torch import nn

import signalprop as sp


class Res(nn.Module):
    def __init__(self, blocks=100, width=64, marked=False):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        for b in self.blocks:
            for layer in b:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight)
            if marked:
                sp.init.mark_residual(b)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_a_growing_residual_stream_is_told_to_scale_its_branches():
    """100 Kaiming residual blocks, no normalisation: E[y^2] grows by ~1.5x a
    block; the advice names Fixup/SkipInit, and following it (the marked
    branches, scale_residual_) keeps the stream at its input's scale (Fixup
    zeroes each branch's last layer, so the stream is the input at first)."""
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    r = sp.check(Res(), x)
    assert r.verdict == "exploding"
    fix = r.problems[0].suggestion
    assert "residual branches" in fix and "scale_residual_" in fix and "Fixup" in fix
    torch.manual_seed(0)
    m = Res(marked=True)
    sp.init.scale_residual_(m, "fixup")
    fixed = sp.check(m, x)
    assert fixed.verdict != "exploding"
    assert max(layer.forward_second_moment for layer in fixed.layers) < 10 * float(x.square().mean())


def test_a_plain_deep_net_that_explodes_keeps_the_weight_scale_advice():
    """The control: no residual sums, so the weights' scale is the cause."""
    torch.manual_seed(0)
    layers = []
    for _ in range(30):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    m = nn.Sequential(*layers)
    for layer in m:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.4)
    r = sp.check(m, torch.randn(64, 64))
    assert r.verdict == "exploding" and "residual" not in r.problems[0].suggestion
    assert "rescale" in r.problems[0].suggestion


@pytest.mark.parametrize("factor", [1e-7, 1e4])
def test_one_layer_far_off_its_fans_scale_is_named_either_way(factor):
    """(Outside review) A 20-layer Kaiming ReLU MLP with one Linear scaled
    by 1e4 was "exploding" with that weight named; scaled by 1e-7 it was
    "vanishing @ rows 0-19", no parameter named, and the advice told the
    user to switch to kaiming_normal_ -- which the net already uses (the
    gradient is flat at ~7e-8 before the layer and drops 1.4e-7x across it).
    The small one is named now too, with its RMS and the gain it makes."""
    torch.manual_seed(0)
    layers = []
    for _ in range(20):
        lin = nn.Linear(256, 256)
        nn.init.kaiming_normal_(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    m = nn.Sequential(*layers)
    with torch.no_grad():
        m[20].weight.mul_(factor)
    r = sp.check(m, torch.randn(128, 256))
    p = r.problems[0]
    assert r.verdict == ("vanishing" if factor < 1 else "exploding")
    assert p.parameters == ("20.weight",) and p.layer == "20" and "Linear #20" in p.message
    if factor < 1:
        assert "kaiming_normal_" in p.suggestion and "re-initialise 20.weight" in p.suggestion


def test_a_deep_sigmoid_net_keeps_its_depth_advice():
    """The control: a vanishing gradient made by depth (30 sigmoid layers at
    torch's default initialisation, ~0.25 per layer) names no single weight."""
    torch.manual_seed(0)
    m = nn.Sequential(*[mod for _ in range(30) for mod in (nn.Linear(64, 64), nn.Sigmoid())])
    r = sp.check(m, torch.randn(64, 64))
    assert r.verdict == "vanishing" and not r.problems[0].parameters


# ---- causes traced to parameters (issue 26): each mechanism in a small model built here ------------------

def _bn_net(gamma_std=None, blocks=12, width=16):
    """Conv -> BatchNorm -> ReLU blocks with He-initialised convolutions; the
    norms' weights drawn from N(0, gamma_std^2) as HF EfficientNet/MobileViT
    do (torch: 1); eval mode with running statistics never updated."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, width, 3, padding=1)]
    for _ in range(blocks):
        layers += [nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
    m = nn.Sequential(*layers)
    for layer in m:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight)
        if isinstance(layer, nn.BatchNorm2d) and gamma_std is not None:
            nn.init.normal_(layer.weight, std=gamma_std)
    return m.eval()


def test_batchnorm_weights_drawn_small_are_named_with_their_scale():
    """gamma ~ N(0, 0.02) with fresh running statistics: each norm is gamma x + beta,
    a factor ~0.02 on the signal and its gradient, 0.02^12 ~ 4e-21 over 12 of
    them. The problem names the norms' weights and their scale; setting them to 1
    (the advice) makes the model healthy; with torch's gamma = 1 no cause is named."""
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    m = _bn_net(0.02)
    r = sp.check(m, x)
    p = r.problems[0]
    assert r.verdict == "vanishing" and p.kind == "vanishing"
    bns = [f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert p.parameters == tuple(bns) and p.layer == "1"
    assert "12 BatchNorm2d layers have weights γ drawn around" in p.message, p.message
    std = float(re.search(r"with std ([0-9.e-]+)", p.message).group(1))
    assert 0.015 < std < 0.025  # the sample std of 12 x 16 draws from N(0, 0.02^2): within 4 standard errors
    assert "running statistics never updated" in p.message and "torch.nn.init.ones_" in p.suggestion
    assert "--init kaiming_normal" in p.fix("cli") and "apply_" not in p.fix("cli")
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
    assert sp.check(m, x).verdict == "healthy"
    control = sp.check(_bn_net(None), x)
    assert control.verdict == "healthy" and not control.problems


class _Tokens(nn.Module):
    """ViT/DeiT-style embedding: patches projected, a class token prepended,
    position embeddings added, dropout -- the tokens and positions zeros."""

    def __init__(self, d=32, patches=16, patch_dim=12, zero=True):
        super().__init__()
        self.proj = nn.Linear(patch_dim, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.position_embeddings = nn.Parameter(torch.zeros(1, patches + 1, d))
        if not zero:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.proj(x)], dim=1)
        return self.dropout(t + self.position_embeddings)


class _ViTish(nn.Module):
    def __init__(self, eps=1e-12, zero=True):
        super().__init__()
        self.embeddings = _Tokens(zero=zero)
        self.norm = nn.LayerNorm(32, eps=eps)
        self.fc = nn.Linear(32, 32)
        self.act = nn.GELU()
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.act(self.fc(self.norm(self.embeddings(x)))))


def test_zero_tokens_entering_a_norm_with_tiny_eps_are_named_with_the_norm():
    """The class token and the position embeddings exact zeros: the class
    token reaches the LayerNorm as a zero vector, divided by sqrt(1e-12) =
    1e-6, so its gradient is ~1e6x the patches'. The problem names the zero
    parameters, the norm and its eps; drawing them from N(0, 0.02) (the
    advice) is healthy, and no cause is named there."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, generator=torch.Generator().manual_seed(1))
    r = sp.check(_ViTish(), x)
    p = r.problems[0]
    assert r.verdict == "exploding" and p.layer == "embeddings"
    assert p.parameters == ("embeddings.cls_token", "embeddings.position_embeddings")
    assert "cls_token, position_embeddings of embeddings are exactly zero" in p.message, p.message
    assert "norm (LayerNorm, eps 1e-12" in p.message and "Jacobian there is 1e+06" in p.message
    assert "trunc_normal_" in p.suggestion and "eps" in p.suggestion and "--init" in p.fix("cli")
    torch.manual_seed(0)
    fixed = sp.check(_ViTish(zero=False), x)
    assert fixed.verdict == "healthy" and not fixed.problems


class _TiedLM(nn.Module):
    """An embedding, a norm and a read-out; ``tied``: the read-out's weight
    is the embedding's tensor (GPT-2's lm_head and wte)."""

    def __init__(self, std=100.0, tied=True, vocab=300, d=64):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.drop = nn.Dropout(0.0)
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        nn.init.normal_(self.wte.weight, std=std)
        if tied:
            self.lm_head.weight = self.wte.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=std)

    def forward(self, ids):
        return self.lm_head(self.ln(self.drop(self.wte(ids))))


def test_a_tied_embedding_drawn_large_is_named_as_the_cause_of_the_logits_scale():
    """wte at std 100, tied to lm_head: the logits' RMS is ~100 sqrt(64) = 800
    and the gradient behind the read-out 100 sqrt(300) ~ 1.7e3x the output's.
    One problem names lm_head and wte.weight as one tensor; redrawing it at
    std 0.02 (the advice) is healthy. Untied, only lm_head.weight is named."""
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    m = _TiedLM()
    r = sp.check(m, ids)
    assert r.verdict == "exploding" and len([p for p in r.problems if p.kind == "exploding"]) == 1
    p = r.problems[0]
    assert p.layer == "lm_head" and p.parameters == ("wte.weight", "lm_head.weight")
    assert "the same tensor as wte.weight (tied)" in p.message, p.message
    out_rms = r.layers[-1].forward_second_moment ** 0.5
    assert 500 < out_rms < 1200 and f"output reaches RMS {out_rms:.3g}" in p.message
    assert "torch.nn.init.normal_(model.wte.weight, std=0.02)" in p.suggestion and "lm_head.weight" in p.suggestion
    assert "--init critical" in p.fix("cli")
    nn.init.normal_(m.wte.weight, std=0.02)
    assert sp.check(m, ids).verdict == "healthy"
    torch.manual_seed(0)
    untied = sp.check(_TiedLM(tied=False), ids).problems[0]
    assert untied.parameters == ("lm_head.weight",) and "tied" not in untied.message


def test_hf_gpt2_with_a_large_tied_embedding_names_wte_and_lm_head():
    """The issue's case on a tiny HF GPT-2 (from a config, nothing downloaded):
    the message named transformer.drop "reaching 2.22e+03" (a norm-adjusted
    figure it did not call one) and neither wte nor lm_head."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    nn.init.normal_(m.transformer.wte.weight, std=100.0)
    r = sp.check(m, {"input_ids": torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(1))})
    p = r.problems[0]
    assert r.verdict == "exploding" and p.layer == "lm_head"
    assert set(p.parameters) == {"transformer.wte.weight", "lm_head.weight"} and "(tied)" in p.message
    assert not any(q.layer == "transformer.drop" for q in r.problems)


def test_weights_drawn_far_below_their_fans_scale_are_named_as_the_cause_of_vanishing():
    """An MLP whose Linear weights are drawn at std 1e-4 (RMS x sqrt(fan-in)
    ~0.006; HF SAM's vision encoder draws 1e-10 from its config): the
    vanishing problem names those weights and says to redraw them at their
    fans' scale, not the activation's generic advice.  The control, a
    sigmoid stack at torch's default scale, vanishes for its activation and
    keeps that advice."""
    torch.manual_seed(0)
    m = nn.Sequential(*[layer for _ in range(6) for layer in (nn.Linear(64, 64), nn.Tanh())], nn.Linear(64, 4))
    with torch.no_grad():
        for mod in m:
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, 1e-4)
    r = sp.check(m, torch.randn(32, 64))
    p = next(p for p in r.problems if p.kind == "vanishing")
    assert "drawn at RMS x sqrt(fan-in)" in p.message and "redraw the weights at their fans' scale" in p.suggestion
    assert p.parameters and all(n.endswith(".weight") for n in p.parameters), p.parameters
    torch.manual_seed(0)
    control = nn.Sequential(*[layer for _ in range(40) for layer in (nn.Linear(32, 32), nn.Sigmoid())])
    q = next(p for p in sp.check(control, torch.randn(32, 32)).problems if p.kind == "vanishing")
    assert "fans' scale" not in q.suggestion and not q.parameters, q.suggestion
