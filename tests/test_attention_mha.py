"""nn.MultiheadAttention's attention statistics: its row carries the largest
logit and the attention entropy in both need_weights modes, checked against
logits computed here by hand -- themselves checked against the attention
weights torch's own MultiheadAttention returns."""

import math

import pytest
import torch
from torch import nn

import signalprop as sp


class Net(nn.Module):
    def __init__(self, batch_first, need_weights, mask, kdim=None):
        super().__init__()
        self.emb = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.kv = nn.Linear(8, kdim) if kdim else None
        self.head = nn.Linear(32, 3)
        self.batch_first, self.need_weights, self.mask = batch_first, need_weights, mask

    def inputs(self, x):
        h = self.emb(x)
        kv = self.kv(x) if self.kv is not None else h
        if not self.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
        return h, kv

    def masks(self, x):
        n, t = x.shape[0], x.shape[1]
        kw = {}
        if self.mask in ("causal", "both"):
            kw["attn_mask"] = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        if self.mask in ("padding", "both"):
            pad = torch.zeros(n, t, dtype=torch.bool)
            pad[0, -3:] = True  # the first sequence's last 3 keys are padding
            kw["key_padding_mask"] = pad
        if self.mask == "float":
            kw["attn_mask"] = torch.randn(t, t, generator=torch.Generator().manual_seed(3))
        return kw

    def forward(self, x):
        h, kv = self.inputs(x)
        o, _ = self.attn(h, kv, kv, need_weights=self.need_weights, **self.masks(x))
        return self.head(o)


def _by_hand(net, x):
    """Logits q.k/sqrt(d) per (batch, head, query, key) in float64 from the
    module's projections, the boolean mask of allowed pairs, and torch's own
    attention weights (need_weights=True, per head) for the same call."""
    m = net.attn
    with torch.no_grad():
        h, kv = net.inputs(x)
        if not m.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)  # (N, L, E)
        E, H = m.embed_dim, m.num_heads
        if m._qkv_same_embed_dim:
            wq, wk = m.in_proj_weight[:E], m.in_proj_weight[E:2 * E]
        else:
            wq, wk = m.q_proj_weight, m.k_proj_weight
        q = (h.double() @ wq.double().T + m.in_proj_bias[:E].double()).reshape(*h.shape[:2], H, -1).transpose(1, 2)
        k = (kv.double() @ wk.double().T + m.in_proj_bias[E:2 * E].double()).reshape(*kv.shape[:2], H, -1).transpose(1, 2)
        z = q @ k.transpose(-1, -2) / math.sqrt(E // H)
        masks = net.masks(x)
        allowed = torch.ones_like(z, dtype=torch.bool)
        if "attn_mask" in masks and masks["attn_mask"].dtype == torch.bool:
            allowed &= ~masks["attn_mask"]
        elif "attn_mask" in masks:
            z = z + masks["attn_mask"].double()
        if "key_padding_mask" in masks:
            allowed &= ~masks["key_padding_mask"][:, None, None, :]
        hq, hk = net.inputs(x)
        _, w = m(hq, hk, hk, need_weights=True, average_attn_weights=False, **masks)
    return z, allowed, w.double()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal", "padding", "both", "float"])
def test_multihead_attention_row_matches_logits_by_hand(batch_first, need_weights, mask):
    torch.manual_seed(0)
    net = Net(batch_first, need_weights, mask)
    with torch.no_grad():
        net.attn.in_proj_weight.mul_(4)  # logits of a few units, entropy well below 1
    x = torch.randn(3, 12, 8)
    z, allowed, w = _by_hand(net, x)
    p = torch.softmax(z.masked_fill(~allowed, -math.inf), dim=-1)
    assert torch.allclose(p, w, atol=1e-5)  # the hand-made logits are the ones torch's softmax saw
    valid = allowed.sum(-1) >= 2  # a query with one key has no distribution to judge
    ent = torch.where(valid, -torch.special.xlogy(p, p).sum(-1) / torch.log(allowed.sum(-1).double()), 0.0)
    per_head = ent.sum((0, 2)) / valid.sum((0, 2))
    r = sp.check(net, x)
    (row,) = [layer for layer in r.layers if layer.attn_logit_max is not None]
    assert (row.name, row.kind) == ("attn", "MultiheadAttention")
    assert row.attn_logit_max == pytest.approx(z.abs().masked_fill(~allowed, 0).max().item(), rel=1e-5)
    assert row.attn_entropy == pytest.approx(per_head.mean().item(), abs=1e-5)
    assert row.attn_entropy_min_head == pytest.approx(per_head.min().item(), abs=1e-5)
    assert row.attn_entropy < 0.95


def test_separate_key_projection_and_transformer_layers():
    """kdim != embed_dim (q_proj_weight / k_proj_weight) is measured the same
    way; nn.TransformerEncoder's self-attention (need_weights=False, its
    inner SDPA call not measured twice) gets one row per layer."""
    torch.manual_seed(0)
    net = Net(True, False, "causal", kdim=16)
    x = torch.randn(2, 10, 8)
    z, allowed, _ = _by_hand(net, x)
    (row,) = [layer for layer in sp.check(net, x).layers if layer.attn_logit_max is not None]
    assert row.attn_logit_max == pytest.approx(z.abs().masked_fill(~allowed, 0).max().item(), rel=1e-5)

    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    rows = [layer for layer in sp.check(enc, torch.randn(2, 10, 32)).layers if layer.attn_logit_max is not None]
    assert [(r.name, r.kind) for r in rows] == [(f"layers.{i}.self_attn", "MultiheadAttention") for i in range(2)]


def test_saturated_multihead_attention_is_named_by_its_module():
    """q/k projections x30: logits far past 30 and one-hot attention, the
    'saturated attention' verdict naming the MultiheadAttention module itself."""
    torch.manual_seed(0)
    net = Net(True, False, "none")
    with torch.no_grad():
        net.attn.in_proj_weight[:64].mul_(30)
    r = sp.check(net, torch.randn(4, 16, 8))
    p = next(p for p in r.problems if "attention" in p.message)
    assert p.layer == "attn" and p.kind == "saturated"
