"""check() vs a plain forward + backward of the same model and batch, in one process.
Target: ratio <= 1.3 without spectrum (Cockpit's cheapest configuration costs 1.5x)."""

from __future__ import annotations

from pathlib import Path

import torch
from _util import interleaved, run_cli, write
from torch import nn

import signalprop as sp
from signalprop.lab.models import DeepMLP


def plain(model: nn.Module, inputs, cot_like=None) -> None:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    y = out if isinstance(out, torch.Tensor) else out[0]
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(y, params, torch.randn_like(y), allow_unused=True)


def case_mlp(repeat: int) -> dict:
    torch.manual_seed(0)
    m = DeepMLP(100, 512, "tanh", 512, 512)
    sp.init.apply_(m, "xavier_normal", activation="tanh")
    x = torch.randn(256, 512)
    ours, ref = interleaved(lambda: sp.check(m, x), lambda: plain(m, x), repeat)
    return {"model": "MLP 100 x 512, tanh", "batch": 256, "check_median_s": ours, "plain_median_s": ref,
            "ratio": ours / ref}


def case_gpt2(repeat: int) -> dict:
    import transformers

    cfg = transformers.GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 124M parameters
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg)
    m.eval()
    ids = {"input_ids": torch.randint(0, cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0)),
           "use_cache": False}
    ours, ref = interleaved(lambda: sp.check(m, ids), lambda: plain(m, ids), repeat)
    return {"model": "GPT-2 small (config, random weights)", "batch": 8, "seq": 128, "check_median_s": ours,
            "plain_median_s": ref, "ratio": ours / ref}


def main(out: Path, repeat: int) -> dict:
    rows = {"mlp_100x512": case_mlp(repeat), "gpt2_small": case_gpt2(max(3, repeat // 2)), "target_ratio": 1.3,
            "threads": torch.get_num_threads()}
    write(out, "bench_check", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, 5)
