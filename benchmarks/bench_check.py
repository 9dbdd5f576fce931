"""check() vs a plain forward + backward of the same model and batch, in one process.
Targets (CPU): <= 1.15x on the 100 x 512 MLP, <= 1.5x on the 2000 x 64 MLP, <= 1.3x on
GPT-2 (Cockpit's cheapest configuration costs 1.5x on GPU as published), <= 2x at batch 1
on tiny HF models (8 tokens or 32 x 32 images), <= 10 ms fixed cost on a 4-layer MLP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import signalprop as sp
from _util import interleaved, run_cli, write
from signalprop.lab.models import DeepMLP


def plain(model: nn.Module, inputs, cot_like=None) -> None:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    y = out if isinstance(out, torch.Tensor) else out[0]
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(y, params, torch.randn_like(y), allow_unused=True)


def case_mlp(repeat: int, depth: int = 100, width: int = 512, target: float = 1.15) -> dict:
    torch.manual_seed(0)
    m = DeepMLP(depth, width, "tanh", width, width)
    x = torch.randn(256, width)
    sp.init.critical_(m, x, generator=torch.Generator().manual_seed(0))  # healthy: the fast path is timed
    ours, ref = interleaved(lambda: sp.check(m, x), lambda: plain(m, x), repeat)
    return {"model": f"MLP {depth} x {width}, tanh, critical init", "batch": 256, "pairs": repeat,
            "check_median_s": ours, "plain_median_s": ref, "ratio": ours / ref, "target_ratio": target}


def case_gpt2(repeat: int, batch: int = 8, seq: int = 128) -> dict:
    import transformers

    cfg = transformers.GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 124M parameters
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg)
    m.eval()
    gen = torch.Generator().manual_seed(0)
    ids = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen), "use_cache": False}
    ours, ref = interleaved(lambda: sp.check(m, ids), lambda: plain(m, ids), repeat)
    return {"model": "GPT-2 small (config, random weights)", "batch": batch, "seq": seq, "pairs": repeat,
            "check_median_s": ours, "plain_median_s": ref, "ratio": ours / ref, "target_ratio": 1.3}


def _tiny_hf() -> dict[str, tuple[nn.Module, dict]]:
    """Five held-out families at toy size (random weights, no download), batch 1."""
    import transformers as tf

    gen = torch.Generator().manual_seed(0)
    ids = {"input_ids": torch.randint(0, 256, (1, 8), generator=gen)}
    img = {"pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256)
    torch.manual_seed(0)
    return {
        "gpt_neox": (tf.GPTNeoXModel(tf.GPTNeoXConfig(**small)), ids),
        "opt": (tf.OPTModel(tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                         vocab_size=256, word_embed_proj_dim=64)), ids),
        "distilbert": (tf.DistilBertModel(tf.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                              vocab_size=256)), ids),
        "regnet": (tf.RegNetModel(tf.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                  groups_width=8)), img),
        "clip_vision": (tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               image_size=32, patch_size=8)), img),
    }


def case_tiny_hf(repeat: int) -> dict:
    rows: dict[str, dict] = {}
    for name, (m, inputs) in _tiny_hf().items():
        m.train()
        ours, ref = interleaved(lambda m=m, inputs=inputs: sp.check(m, inputs),
                                lambda m=m, inputs=inputs: plain(m, inputs), repeat)
        rows[name] = {"check_median_s": ours, "plain_median_s": ref, "ratio": ours / ref}
    ratios = sorted(r["ratio"] for r in rows.values())
    return {"models": rows, "batch": 1, "median_ratio": ratios[len(ratios) // 2], "max_ratio": ratios[-1],
            "target_ratio": 2.0}


def case_fixed(repeat: int) -> dict:
    """check's own cost per call where the model costs next to nothing: check - plain."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 10))
    x = torch.randn(8, 32)
    ours, ref = interleaved(lambda: sp.check(m, x), lambda: plain(m, x), repeat)
    return {"model": "MLP 4 x 64, ReLU", "batch": 8, "check_median_s": ours, "plain_median_s": ref,
            "fixed_ms": (ours - ref) * 1e3, "target_ms": 10.0}


class _Floor:
    """The least any measurement through module hooks costs: a global forward
    hook that every module call runs, and a pre-hook on the autograd node of
    every leaf module's output (where a gradient is read); with ``read="copy"``, also one
    copy of each output and of each gradient into a reused buffer (the
    cheapest way to keep a value for a reduction done later, several rows at
    once); with ``read="dot"``, one reduction of each where it is (its sum of
    squares, a BLAS dot: one read, nothing written).  No other statistic, no
    row, no diagnosis: what is left of check's cost above these is its own."""

    def __init__(self, read: str = "") -> None:
        self.read = read
        self.bufs: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[int]]] = {}
        self.sums: list[torch.Tensor] = []

    def _keep(self, t: torch.Tensor) -> None:
        if self.read == "dot":
            v = t.reshape(-1)
            self.sums.append(torch.dot(v, v))
            return
        key = (t.shape, t.dtype)
        b = self.bufs.get(key)
        if b is None:
            b = self.bufs[key] = (list(torch.empty(16, *t.shape, dtype=t.dtype).unbind(0)), [0])
        views, at = b
        views[at[0] % 16].copy_(t)
        at[0] += 1

    def _pre(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        if self.read and grads[0] is not None:
            with torch.no_grad():
                self._keep(grads[0])

    def _post(self, m: nn.Module, args: Any, out: Any) -> None:
        # (a leaf's output only, as check reads: a block's output is the last of its leaves' or a sum of them)
        if isinstance(out, torch.Tensor) and out.grad_fn is not None and out.is_floating_point() \
                and not m._modules:
            if self.read:
                with torch.no_grad():
                    self._keep(out)
            out.grad_fn.register_prehook(self._pre)

    def __call__(self, model: nn.Module, x: Any) -> None:
        h = register_module_forward_hook(self._post)
        try:
            plain(model, x)
        finally:
            h.remove()
            self.sums.clear()


def _floors(m: nn.Module, x: Any, repeat: int) -> dict[str, float]:
    """check/plain beside the floors of :class:`_Floor`, each against plain in interleaved pairs."""
    out = {}
    for name, f in [("hooks", _Floor()), ("hooks_and_one_dot_each", _Floor("dot")),
                    ("hooks_and_one_copy_each", _Floor("copy")), ("check", sp.check)]:
        ours, ref = interleaved(lambda f=f: f(m, x), lambda: plain(m, x), repeat)
        out[f"{name}_ratio"] = ours / ref
    return out


def case_floor(repeat: int) -> dict:
    """check against the floors of any module-hook measurement (see :class:`_Floor`): on the
    two MLPs, and the median over the tiny HF models at batch 1."""
    out: dict[str, Any] = {}
    for depth, width, target in [(100, 512, 1.15), (2000, 64, 1.5)]:
        torch.manual_seed(0)
        m = DeepMLP(depth, width, "tanh", width, width)
        x = torch.randn(256, width)
        sp.init.critical_(m, x, generator=torch.Generator().manual_seed(0))
        out[f"mlp_{depth}x{width}"] = {"model": f"MLP {depth} x {width}, tanh, critical init", "batch": 256,
                                       "pairs": 4 * repeat, **_floors(m, x, 4 * repeat), "target_ratio": target}
    tiny = {}
    for name, (hf, inputs) in _tiny_hf().items():
        hf.train()
        tiny[name] = _floors(hf, inputs, 8 * repeat)
    med = {k: sorted(r[k] for r in tiny.values())[len(tiny) // 2] for k in next(iter(tiny.values()))}
    out["tiny_hf_b1"] = {"models": tiny, "median": med, "target_ratio": 2.0}
    return out


def main(out: Path, repeat: int) -> dict:
    # the MLP steps take 0.2-0.8 s: 4x the pairs (20 by default; single runs of 5 moved by 5-15%
    # on the 2-core development machine); the GPT-2 steps take 5-25 s
    rows = {"mlp_100x512": case_mlp(4 * repeat), "mlp_2000x64": case_mlp(4 * repeat, 2000, 64, 1.5),
            "gpt2_small_8x128": case_gpt2(max(3, repeat // 2)),
            "gpt2_small_8x512": case_gpt2(3, 8, 512), "tiny_hf_b1": case_tiny_hf(8 * repeat),
            "fixed_4_layer": case_fixed(20 * repeat), "floors": case_floor(repeat),
            "threads": torch.get_num_threads()}
    write(out, "bench_check", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, 5)
