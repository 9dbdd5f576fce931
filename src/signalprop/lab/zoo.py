"""The model zoo: known-good and known-bad models, each with the verdict it must get.

Known-good models are stock architectures people train today, built from
small configs with their own default initialization (HuggingFace models from
a config: random weights, nothing downloaded), plus what signalprop's own
initializers produce.  Each must be ``healthy`` at every batch size and
sequence length.  Known-bad models break one mechanism on purpose, and must
get the right kind *and* the right module.  ``signalprop lab run zoo`` prints
the table; the test suite runs the same cases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Experiment, register


@dataclass(frozen=True)
class Case:
    """One zoo entry: ``build(batch, seq, generator)`` returns (model, inputs, check kwargs)."""

    name: str
    build: Callable[[int, int, torch.Generator], tuple[nn.Module, Any, dict[str, Any]]]
    expected: str  # the verdict it must get
    layer: str | None = None  # for broken cases: the first problem's layer must start with this
    needs: str | None = None  # optional package ("transformers")
    sequence: bool = True  # whether ``seq`` means anything to it
    cause: tuple[str, ...] = ()  # for broken cases: parameters the first problem must name as its cause


def _ids(b: int, t: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=g)


def _hf(cls: str, cfg: str, **kw: Any) -> nn.Module:
    import transformers

    return getattr(transformers, cls)(getattr(transformers, cfg)(**kw)).eval()


def _gpt2(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    m = _hf("GPT2LMHeadModel", "GPT2Config", n_layer=4, n_embd=64, n_head=4, vocab_size=500, n_positions=256,
            bos_token_id=0, eos_token_id=0)
    return m, {"input_ids": _ids(b, t, 500, g)}, {}


def _llama(layers: int = 4) -> nn.Module:
    return _hf("LlamaForCausalLM", "LlamaConfig", num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=500, max_position_embeddings=256,
               bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _llama_stock(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    return _llama(), {"input_ids": _ids(b, t, 500, g)}, {}


def _llama_init(which: str) -> Callable[[int, int, torch.Generator], tuple[nn.Module, Any, dict[str, Any]]]:
    def build(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
        from .. import init

        m = _llama()
        calib = {"input_ids": _ids(4, 32, 500, torch.Generator().manual_seed(1))}
        gen = torch.Generator().manual_seed(0)
        if which == "critical":
            init.critical_(m, calib, generator=gen)
        else:
            init.lsuv_(m, calib, generator=gen)
        return m, {"input_ids": _ids(b, t, 500, g)}, {}

    return build


def _llama_deep_ce(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    ids = _ids(b, t, 500, g)

    def loss(out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    return _llama(16), {"input_ids": ids}, {"loss_fn": loss, "targets": ids}


def _bert(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    m = _hf("BertModel", "BertConfig", num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
            intermediate_size=128, vocab_size=500, max_position_embeddings=256)
    ids = _ids(b, t, 500, g)
    mask = torch.ones_like(ids)
    mask[:, t - max(1, t // 4):] = 0  # padded tail
    return m, {"input_ids": ids, "attention_mask": mask}, {}


def _vit(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    m = _hf("ViTModel", "ViTConfig", num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
            intermediate_size=128, image_size=32, patch_size=8)
    return m, torch.randn(b, 3, 32, 32, generator=g), {}


def _convnext(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    m = _hf("ConvNextModel", "ConvNextConfig", depths=[2, 2, 3, 2], hidden_sizes=[16, 32, 48, 64],
            layer_scale_init_value=1e-6, image_size=32)
    return m, torch.randn(b, 3, 32, 32, generator=g), {}


def _resnet(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    m = _hf("ResNetModel", "ResNetConfig", depths=[2, 2, 2, 2], hidden_sizes=[16, 32, 64, 64], embedding_size=16,
            layer_type="bottleneck")
    return m, torch.randn(b, 3, 32, 32, generator=g), {}


def _rwkv(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    m = _hf("RwkvModel", "RwkvConfig", num_hidden_layers=3, hidden_size=32, attention_hidden_size=32,
            intermediate_size=64, vocab_size=300, context_length=256)
    return m, {"input_ids": _ids(b, t, 300, g)}, {}


def _encoder(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    m = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()
    return m, torch.randn(b, t, 64, generator=g), {}


def _lstm(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    return nn.LSTM(32, 64, num_layers=3, batch_first=True), torch.randn(b, t, 32, generator=g), {}


def _gru(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    return nn.GRU(32, 64, num_layers=2, batch_first=True), torch.randn(b, t, 32, generator=g), {}


def _mlp(depth: int, act: str, init: str, width: int = 128, bias: bool = True) -> nn.Sequential:
    from .. import activations
    from .. import init as spi

    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=bias), activations.get(act).torch_module()]
    m = nn.Sequential(*layers, nn.Linear(width, 10))
    if init != "default":
        spi.apply_(m, init, generator=torch.Generator().manual_seed(0))
    return m


def _mlp_case(depth: int, act: str, init: str, **kw: Any) -> Callable[..., tuple[nn.Module, Any, dict[str, Any]]]:
    def build(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
        torch.manual_seed(0)
        m = _mlp(depth, act, init, **kw)
        return m, torch.randn(b, 128, generator=g), {}

    return build


def _critical_mlp(act: str) -> Callable[..., tuple[nn.Module, Any, dict[str, Any]]]:
    def build(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
        from .. import init

        torch.manual_seed(0)
        m = _mlp(50, act, "default")
        init.critical_(m, torch.randn(64, 128, generator=torch.Generator().manual_seed(1)),
                       generator=torch.Generator().manual_seed(0))
        return m, torch.randn(b, 128, generator=g), {}

    return build


# ---- known-bad ------------------------------------------------------------------

def _tiny_weights(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    torch.manual_seed(0)
    m = _mlp(40, "relu", "kaiming_normal", bias=False)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1e-3)
    return m, torch.randn(b, 128, generator=g), {}


def _dead_bias(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    torch.manual_seed(0)
    m = _mlp(8, "relu", "kaiming_normal")
    with torch.no_grad():
        cast(nn.Linear, m[6]).bias.fill_(-100.0)  # every unit of ReLU '7' negative for every input
    return m, torch.randn(b, 128, generator=g), {}


class WhereSqrt(nn.Module):
    """sqrt(x) where x > 0 else 0: a finite forward, a NaN backward at x <= 0
    (the unselected branch's NaN derivative times a zero gradient is NaN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, torch.sqrt(x), torch.zeros_like(x))


def _backward_nan(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 128), WhereSqrt(), nn.Linear(128, 10))
    return m, torch.randn(b, 128, generator=g), {}


class LogOf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # NaN for x < 0


def _forward_nan(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 128), LogOf(), nn.Linear(128, 10))
    return m, torch.randn(b, 128, generator=g), {}


def _resmlp_unscaled(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    from .. import init
    from .models import ResMLP

    torch.manual_seed(0)
    m = ResMLP(60, 64, "relu", 128, 10)
    init.apply_(m, "kaiming_normal", generator=torch.Generator().manual_seed(0))
    return m, torch.randn(b, 128, generator=g), {}


class LastStep(nn.Module):
    """A recurrent model read out on its last step only (a sequence classifier)."""

    def __init__(self, forget_bias: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 4)
        with torch.no_grad():  # PyTorch's gate order: input, forget, cell, output
            for name, p in self.lstm.named_parameters():
                if name.startswith("bias"):
                    p.zero_()
                    p[32:64] = forget_bias / 2  # b_ih + b_hh = forget_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _lstm_forget_bias(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    torch.manual_seed(0)
    # 64 steps whatever the zoo's length: over 8 the hidden-state path alone carries a gradient near the bound,
    # and the case is about what a forget gate of e^-10 does to a sequence, not where that path gives out
    return LastStep(-10.0), torch.randn(b, 64, 16, generator=g), {}


def _deit(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    m = _hf("DeiTModel", "DeiTConfig", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
            intermediate_size=128, image_size=32, patch_size=8)
    return m, torch.randn(b, 3, 32, 32, generator=g), {}


def _gpt2_large_wte(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    m, inputs, kw = _gpt2(b, t, g)
    nn.init.normal_(cast(Any, m).transformer.wte.weight, std=100.0)  # also lm_head.weight: the two are tied
    return m, inputs, kw


def _cli_default(b: int, t: int, g: torch.Generator) -> tuple[nn.Module, Any, dict[str, Any]]:
    from .models import build

    built = build("mlp:depth=50,width=256,act=sigmoid,init=normal", batch=b, seed=0)
    return built.model, built.inputs, {}


GOOD: tuple[Case, ...] = (
    Case("gpt2", _gpt2, "healthy", needs="transformers"),
    Case("llama", _llama_stock, "healthy", needs="transformers"),
    Case("llama critical_", _llama_init("critical"), "healthy", needs="transformers"),
    Case("llama lsuv_", _llama_init("lsuv"), "healthy", needs="transformers"),
    Case("llama 16 layers, mean cross-entropy", _llama_deep_ce, "healthy", needs="transformers"),
    Case("bert (attention mask)", _bert, "healthy", needs="transformers"),
    Case("vit", _vit, "healthy", needs="transformers", sequence=False),
    Case("convnext (layer scale 1e-6)", _convnext, "healthy", needs="transformers", sequence=False),
    Case("resnet (bottleneck, eval)", _resnet, "healthy", needs="transformers", sequence=False),
    Case("rwkv (eval)", _rwkv, "healthy", needs="transformers"),
    Case("nn.TransformerEncoder", _encoder, "healthy"),
    Case("nn.LSTM", _lstm, "healthy"),
    Case("nn.GRU", _gru, "healthy"),
    Case("mlp relu kaiming", _mlp_case(20, "relu", "kaiming_normal"), "healthy", sequence=False),
    Case("mlp tanh xavier", _mlp_case(20, "tanh", "xavier_normal"), "healthy", sequence=False),
    Case("mlp sigmoid critical_", _critical_mlp("sigmoid"), "healthy", sequence=False),
    Case("mlp tanh critical_", _critical_mlp("tanh"), "healthy", sequence=False),
)

BAD: tuple[Case, ...] = (
    Case("relu mlp, weights x1e-3", _tiny_weights, "vanishing", layer="0", sequence=False),
    Case("relu mlp, bias -100", _dead_bias, "dead", layer="7", sequence=False),
    Case("mlp relu xavier (50 layers)", _mlp_case(50, "relu", "xavier_normal"), "vanishing", layer="0",
         sequence=False),
    Case("mlp sigmoid N(0,1)", _mlp_case(30, "sigmoid", "normal"), "saturated", layer="1", sequence=False),
    # signalprop check's default model: at width 256, N(0, 1) weights give every layer a backward gain of
    # sqrt(256 E[sigmoid'(z)^2]) ~ 1.2 with z ~ N(0, 120) -- the gradient grows 1.2x a layer while the
    # sigmoids saturate; at width 128 (above) the gain is ~1.05 and saturation is the finding
    Case("mlp sigmoid N(0,1), 50 x 256 (the CLI's default model)", _cli_default, "exploding", layer="0",
         sequence=False),
    Case("lstm, forget-gate bias -10, read on the last of 64 steps", _lstm_forget_bias, "vanishing", layer="lstm",
         sequence=False),
    Case("deit (zero tokens into LayerNorm eps 1e-12)", _deit, "exploding", layer="embeddings",
         needs="transformers", sequence=False,
         cause=("embeddings.cls_token", "embeddings.distillation_token", "embeddings.position_embeddings")),
    Case("gpt2, wte std 100 (tied to lm_head)", _gpt2_large_wte, "exploding", layer="lm_head",
         needs="transformers", cause=("transformer.wte.weight", "lm_head.weight")),
    Case("resmlp 60 blocks, no residual scaling", _resmlp_unscaled, "exploding", sequence=False),
    Case("sqrt inside torch.where (NaN in backward)", _backward_nan, "non-finite", layer="3", sequence=False),
    Case("log of negatives (NaN in forward)", _forward_nan, "non-finite", layer="3", sequence=False),
)


def available(case: Case) -> bool:
    if case.needs is None:
        return True
    try:
        __import__(case.needs)
    except ImportError:
        return False
    return True


def run_case(case: Case, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """Build and check one case; the row of the zoo table."""
    from ..probe.check import check

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # HF models draw their initial weights from the global generator
    model, inputs, kw = case.build(batch, seq, g)
    t0 = time.perf_counter()
    r = check(model, inputs, **kw)
    first = r.problems[0] if r.problems else None
    ok = r.verdict == case.expected and (case.layer is None or (first is not None and
                                                                first.layer.startswith(case.layer))) \
        and set(case.cause) <= set(first.parameters if first is not None else ())
    return {"model": case.name, "batch": batch, "seq": seq if case.sequence else None, "verdict": r.verdict,
            "expected": case.expected, "layer": first.layer if first else None, "expected_layer": case.layer,
            "ok": ok, "seconds": time.perf_counter() - t0,
            "message": first.message if first else "", "parameters": list(first.parameters) if first else []}


@dataclass(frozen=True)
class ZooConfig:
    batches: tuple[int, ...] = (1, 8, 64)  # every batch size
    seqs: tuple[int, ...] = (8, 128)  # short and long sequences (sequence models only)
    seed: int = 0
    cases: tuple[str, ...] = field(default_factory=tuple)  # names to run; empty: all


def _run(cfg: ZooConfig, out: Path, progress: Any) -> dict[str, Any]:
    cases = [c for c in GOOD + BAD if not cfg.cases or c.name in cfg.cases]
    skipped = [c.name for c in cases if not available(c)]
    cells = [(c, b, s) for c in cases if available(c) for b in cfg.batches
             for s in (cfg.seqs if c.sequence else cfg.seqs[:1])]
    if progress is not None:
        progress.start(len(cells), "zoo")
    rows = []
    for c, b, s in cells:
        rows.append(run_case(c, b, s, cfg.seed))
        if progress is not None:
            progress.advance(1, f"zoo: {c.name}")
    good = [r for r in rows if r["expected"] == "healthy"]
    bad = [r for r in rows if r["expected"] != "healthy"]
    false_alarms = sum(1 for r in good if not r["ok"])
    misses = sum(1 for r in bad if not r["ok"])
    headline = [f"known-good: {len(good) - false_alarms}/{len(good)} healthy ({false_alarms} false alarms)",
                f"known-bad: {len(bad) - misses}/{len(bad)} flagged with the right kind and module ({misses} misses)"]
    if skipped:
        headline.append(f"skipped (package missing): {', '.join(skipped)}")
    table = {"columns": ["model", "batch", "seq", "verdict", "expected", "ok", "ms"],
             "rows": [[r["model"], r["batch"], r["seq"], r["verdict"], r["expected"] + (
                 f" @ {r['expected_layer']}" if r["expected_layer"] else ""), "yes" if r["ok"] else "NO",
                 round(1000 * r["seconds"])] for r in rows]}
    return {"rows": rows, "table": table, "false_alarms": false_alarms, "misses": misses, "cells": len(rows), "skipped": skipped,
            "headline": headline}


register(Experiment("zoo", "known-good and known-bad models at several batch sizes and sequence lengths: "
                    "verdict vs expected", ZooConfig, _run,
                    quick={"batches": (1, 8), "seqs": (8, 64)}))
