"""The models and data of the real training runs (:mod:`signalprop.lab.training_runs`).

Each kind is a model and a batch sampler on data that ships with Python
packages or Python itself (no download):

* ``mlp``: 6-layer ReLU MLP (He init), width 128, on scikit-learn's digits;
* ``resmlp``: 6 residual blocks ``x + W2 relu(W1 x)``, width 128, no
  normalisation, PyTorch's default init, on digits;
* ``transformer``: a 2-layer causal character transformer (d=64,
  ``nn.TransformerEncoderLayer``, pre-LN) on the text of a few standard-library
  modules;
* ``mlp10``: a 10-layer ReLU MLP of width 64 (He init), on digits;
* ``resmlp12``: 12 residual blocks of width 64, on digits;
* ``cnn``: three 3x3 ReLU convolutions (no normalisation) on the 8x8 digit images;
* ``gpt`` / ``gpt-qknorm``: a nanoGPT-style causal LM (2 pre-LN blocks, d=64,
  4 heads, ``F.scaled_dot_product_attention``, GPT-2's init), the second with
  LayerNorm on each head's queries and keys (Dehghani et al. 2023; Wortsman et
  al. 2023: the control for attention-logit growth).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("mlp", "resmlp", "transformer", "mlp10", "resmlp12", "cnn", "gpt", "gpt-qknorm")
Batch = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class ResMLP(nn.Module):
    """``h = h + block(h)`` over ``blocks`` Linear-ReLU-Linear blocks, no normalisation; the residual sum is
    written in this forward (no module outputs it)."""

    def __init__(self, width: int = 128, blocks: int = 6, n_in: int = 64, n_out: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        self.out = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, d: int = 64, layers: int = 2, seq: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = cast(torch.Tensor, self.mask)
        h = self.emb(ids) + self.pos[:t]
        return self.head(self.body(h, mask=mask[:t, :t], is_causal=True))


class Attention(nn.Module):
    """Causal self-attention through ``F.scaled_dot_product_attention`` (nanoGPT's)."""

    def __init__(self, d: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.q_norm = nn.LayerNorm(d // heads) if qk_norm else None
        self.k_norm = nn.LayerNorm(d // heads) if qk_norm else None
        # set True to keep the largest causal |q.k| / sqrt(d) of each forward in `logit_max` (a 0-d tensor,
        # detached): the per-step truth of the early-warning benchmark's attention family
        self.track_logits = False
        self.logit_max: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.track_logits:
            with torch.no_grad():
                z = (q @ k.transpose(-2, -1)).abs() / math.sqrt(q.shape[-1])
                self.logit_max = z.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), 0.0).amax()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return cast(torch.Tensor, self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads, qk_norm)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4, seq: int = 64,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, qk_norm) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2's init, as nanoGPT writes it
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))  # residual projections, per GPT-2 paper
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.emb(ids) + self.pos(pos)
        for b in self.blocks:
            h = b(h)
        return cast(torch.Tensor, self.head(self.ln_f(h)))


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.ReLU())
        self.out = nn.Linear(2 * width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.out(self.body(x.view(-1, 1, 8, 8)).flatten(1)))


def stdlib_text(max_chars: int = 400_000) -> str:
    """Source of a few standard-library modules, from this interpreter's installation."""
    import argparse
    import inspect
    import json.decoder
    import textwrap

    parts = []
    for mod in (argparse, json.decoder, textwrap, inspect):
        parts.append(Path(mod.__file__).read_text(encoding="utf-8"))  # type: ignore[arg-type]
    return "".join(parts)[:max_chars]


def _mlp(width: int, hidden: int, gen: torch.Generator) -> nn.Module:
    import signalprop as sp

    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(hidden):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    sp.init.apply_(model, "kaiming_normal", generator=gen)
    return model


def _digits_model(kind: str, gen: torch.Generator) -> nn.Module:
    if kind == "mlp":
        return _mlp(128, 4, gen)
    if kind == "mlp10":
        return _mlp(64, 8, gen)
    if kind == "resmlp":
        return ResMLP()
    if kind == "resmlp12":
        return ResMLP(64, 12)
    return DigitsCNN()


def build(kind: str, seed: int) -> tuple[nn.Module, Batch]:
    """The model and a ``batch(generator) -> (inputs, targets)`` sampler; the
    model's initialisation is drawn from ``seed`` (torch's global generator is
    seeded with it, as the runs always were)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; one of {KINDS}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if kind in ("mlp", "resmlp", "mlp10", "resmlp12", "cnn"):
        from .datasets import digits

        d = digits(seed)
        x, y = d.x_train, d.y_train
        model = _digits_model(kind, gen)

        def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(0, len(x), (64,), generator=g)
            return x[idx], y[idx]

        return model, batch
    text = stdlib_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text])
    model = CharTransformer(len(chars)) if kind == "transformer" else GPT(len(chars), qk_norm=kind == "gpt-qknorm")

    def text_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, len(ids) - 65, (16,), generator=g)
        seqs = torch.stack([ids[s:s + 65] for s in start.tolist()])
        return seqs[:, :-1], seqs[:, 1:]

    return model, text_batch


def corrupt(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A corrupted batch: random targets (a shuffled-labels bug), and for
    token inputs random tokens (a misaligned shard).  One such batch is a
    transient spike of the loss; features scaled up as well (a unit bug)
    were tried and are not transient -- at 10x, one step's update sent the
    residual MLP at a healthy rate on to diverge."""
    y2 = torch.randint(0, classes, y.shape, generator=g)
    if x.is_floating_point():
        return x, y2
    return torch.randint(0, classes, x.shape, generator=g), y2


__all__ = ["KINDS", "ResMLP", "build", "corrupt", "stdlib_text"]
