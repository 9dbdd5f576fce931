"""apply_ on a >= 100M-parameter model vs the same scheme through torch.nn.init,
and orthogonal_ on 4096 x 4096 vs torch's.  Target ratio <= 1.1."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import signalprop as sp
from _util import interleaved, run_cli, write


def big_model() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(256, 512, 3), nn.Conv2d(512, 512, 3), nn.Conv2d(512, 1024, 3)]
    layers += [nn.Linear(4096, 4096) for _ in range(6)]
    return nn.Sequential(*layers)


def torch_kaiming(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


def main(out: Path, repeat: int) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = big_model()
    n = sum(p.numel() for p in model.parameters())
    ours, ref = interleaved(lambda: sp.init.apply_(model, "kaiming_normal"), lambda: torch_kaiming(model), repeat)
    w = torch.empty(4096, 4096)
    o_ours, o_ref = interleaved(lambda: sp.init.orthogonal_(w), lambda: nn.init.orthogonal_(w), max(3, repeat // 2))
    rows = {
        "apply_kaiming_normal": {"params": n, "ours_median_s": ours, "torch_median_s": ref, "ratio": ours / ref},
        "orthogonal_4096": {"ours_median_s": o_ours, "torch_median_s": o_ref, "ratio": o_ours / o_ref},
        "target_ratio": 1.1,
        "threads": torch.get_num_threads(),
    }
    write(out, "bench_init", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, 5)
