"""check() vs a plain forward + backward of the same model and batch, in one process.
Targets (CPU): <= 1.15x on the 100 x 512 MLP, <= 1.5x on the 2000 x 64 MLP, <= 1.3x on
GPT-2 (Cockpit's cheapest configuration costs 1.5x on GPU as published)."""

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


def main(out: Path, repeat: int) -> dict:
    # the MLP steps take 0.2-0.8 s: 4x the pairs (20 by default; single runs of 5 moved by 5-15%
    # on the 2-core development machine); the GPT-2 steps take 5-25 s
    rows = {"mlp_100x512": case_mlp(4 * repeat), "mlp_2000x64": case_mlp(4 * repeat, 2000, 64, 1.5),
            "gpt2_small_8x128": case_gpt2(max(3, repeat // 2)),
            "gpt2_small_8x512": case_gpt2(3, 8, 512), "threads": torch.get_num_threads()}
    write(out, "bench_check", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, 5)
