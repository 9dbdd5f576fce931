"""check() vs a plain forward + backward of the same model and batch, in one process.
Targets (CPU): <= 1.15x on the 100 x 512 MLP, <= 1.5x on the 2000 x 64 MLP, <= 1.3x on
GPT-2 (Cockpit's cheapest configuration costs 1.5x on GPU as published), <= 2x at batch 1
on tiny HF models (8 tokens or 32 x 32 images), <= 10 ms fixed cost on a 4-layer MLP."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

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


def main(out: Path, repeat: int) -> dict:
    # the MLP steps take 0.2-0.8 s: 4x the pairs (20 by default; single runs of 5 moved by 5-15%
    # on the 2-core development machine); the GPT-2 steps take 5-25 s
    rows = {"mlp_100x512": case_mlp(4 * repeat), "mlp_2000x64": case_mlp(4 * repeat, 2000, 64, 1.5),
            "gpt2_small_8x128": case_gpt2(max(3, repeat // 2)),
            "gpt2_small_8x512": case_gpt2(3, 8, 512), "tiny_hf_b1": case_tiny_hf(8 * repeat),
            "fixed_4_layer": case_fixed(20 * repeat), "threads": torch.get_num_threads()}
    write(out, "bench_check", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, 5)
