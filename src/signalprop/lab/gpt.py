"""A small GPT-style model for width experiments, in standard parametrization or muP.

Token and position embeddings, ``layers`` pre-LN blocks (causal
self-attention through ``F.scaled_dot_product_attention``, a 4x GELU MLP),
a final LayerNorm and a read-out to the vocabulary.  The number of heads is
fixed, so the head dimension grows with the width.

* ``parametrization="sp"``: PyTorch's default initialization, attention scale
  1/sqrt(d_head), an ``nn.Linear`` read-out.
* ``parametrization="mup"``: as Yang et al. (2022, Tensor Programs V, and
  the ``mup`` package's Transformer example): ``mup.MuReadout`` (output
  multiplier 1/width, zero-initialized), attention scale 1/d_head (times
  sqrt(d_base) so that the base width matches SP), a zero-initialized query,
  and ``mup.set_base_shapes`` against the model at ``base_width`` (shapes only,
  built on the meta device); train it with ``mup.MuAdam`` / ``mup.MuSGD``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Parametrization = Literal["sp", "mup"]
PARAMETRIZATIONS = ("sp", "mup")


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, scale: float, zero_query: bool) -> None:
        super().__init__()
        self.heads, self.scale = heads, scale
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        if zero_query:
            nn.init.zeros_(self.q.weight)
            nn.init.zeros_(self.q.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, w // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True,
                                           scale=self.scale)
        return self.o(y.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, scale: float, zero_query: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, scale, zero_query)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, width: int, *, layers: int = 2, heads: int = 4, vocab: int = 64, seq: int = 16,
                 parametrization: Parametrization = "sp", base_width: int = 64) -> None:
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization={parametrization!r} is not one of {list(PARAMETRIZATIONS)}")
        if width % heads or base_width % heads:
            raise ValueError(f"width {width} and base_width {base_width} must be multiples of heads={heads}")
        mup = parametrization == "mup"
        d = width // heads
        # muP: 1/d; times sqrt(d_base) so that at the base width it equals SP's 1/sqrt(d)
        scale = math.sqrt(base_width // heads) / d if mup else 1.0 / math.sqrt(d)
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq, width)
        self.blocks = nn.Sequential(*[Block(width, heads, scale, mup) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.readout: nn.Linear
        if mup:
            from mup import MuReadout

            self.readout = MuReadout(width, vocab, readout_zero_init=True)
        else:
            self.readout = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.readout(self.ln(self.blocks(self.embed(ids) + self.pos(pos))))


def gpt(width: int, parametrization: Parametrization = "sp", *, layers: int = 2, heads: int = 4, vocab: int = 64,
        seq: int = 16, base_width: int = 64) -> GPT:
    """The model at ``width``; in muP with its base shapes set (mup's
    ``set_base_shapes`` against ``base_width`` and ``2 * base_width``, shapes
    built on the meta device so no random numbers are drawn for them)."""
    kw: dict[str, Any] = {"layers": layers, "heads": heads, "vocab": vocab, "seq": seq,
                          "parametrization": parametrization, "base_width": base_width}
    if parametrization != "mup":
        return GPT(width, **kw)
    from mup import set_base_shapes

    with torch.device("meta"):
        base, delta = GPT(base_width, **kw), GPT(2 * base_width, **kw)
    model = GPT(width, **kw)
    set_base_shapes(model, base, delta=delta)
    return model


def token_batch(batch: int = 8, seq: int = 16, vocab: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random next-token data: ``(ids, targets)``, targets the ids shifted by one, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def coord_model(width: int, parametrization: Parametrization = "sp", *, layers: int = 2, batch: int = 8,
                seq: int = 16, vocab: int = 64, seed: int = 0) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    """A factory for ``signalprop coord-check``: the model at ``width`` with
    its token batch, ``signalprop.lab.gpt:coord_model:parametrization=mup``."""
    return gpt(width, parametrization, layers=layers, vocab=vocab, seq=seq), *token_batch(batch, seq, vocab, seed)
