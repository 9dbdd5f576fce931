"""Coordinate check cost: a 4-layer GPT-style model (signalprop.lab.gpt), widths
64-1024 x 3 seeds x 3 Adam steps, in SP; wall and CPU seconds, and the ratio to
the same training without any measurement (the bare cost of the 15 runs).
Also the grid on Ray with 2 CPUs when ray is installed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from _util import run_cli, write
from signalprop import coord_check
from signalprop.lab.gpt import gpt, token_batch
from signalprop.width import optimizer
from signalprop.width.measure import cross_entropy

WIDTHS = [64, 128, 256, 512, 1024]
SEEDS, STEPS, LAYERS = 3, 3, 4


def _make(width: int) -> torch.nn.Module:
    return gpt(width, "sp", layers=LAYERS)


def _bare(data: Any) -> None:
    """The same models, steps and forward passes without hooks."""
    for seed in range(SEEDS):
        for w in WIDTHS:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = _make(w)
                opt = torch.optim.Adam(model.parameters(), lr=1e-2)
                for t in range(STEPS + 1):
                    out = model(data[0])
                    if t == STEPS:
                        break
                    opt.zero_grad()
                    cross_entropy(out, data[1]).backward()
                    opt.step()


def _timed(fn: Any) -> tuple[float, float, Any]:
    w, c = time.perf_counter(), time.process_time()
    r = fn()
    return time.perf_counter() - w, time.process_time() - c, r


def main(out: Path, repeat: int) -> dict[str, Any]:
    data = token_batch()
    opt = optimizer("adam", 1e-2)
    wall, cpu, res = _timed(lambda: coord_check(_make, WIDTHS, data, opt, steps=STEPS, seeds=SEEDS))
    bwall, bcpu, _ = _timed(lambda: _bare(data))
    rows: dict[str, Any] = {"model": f"signalprop.lab.gpt, {LAYERS} layers, SP, Adam lr 1e-2, batch 8 x 16 tokens",
                            "widths": WIDTHS, "seeds": SEEDS, "steps": STEPS, "torch_threads": torch.get_num_threads(),
                            "coord_check_wall_s": wall, "coord_check_cpu_s": cpu,
                            "bare_training_wall_s": bwall, "bare_training_cpu_s": bcpu,
                            "overhead_cpu_ratio": cpu / bcpu, "verdict": res.verdict}
    try:
        import ray
    except ImportError:
        rows["ray"] = "not installed"
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            rwall, _, rres = _timed(lambda: coord_check(_make, WIDTHS, data, opt, steps=STEPS, seeds=SEEDS,
                                                        use_ray=True))
        finally:
            ray.shutdown()
        rows.update({"ray_2cpu_wall_s": rwall, "ray_speedup": wall / rwall,
                     "ray_same_result": rres.to_dict()["series"] == res.to_dict()["series"]})
    write(out, "bench_coord", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, 1)
