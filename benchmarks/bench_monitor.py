"""Training-step time with sp.monitor(every=50) against the same loop without it,
in one process, interleaved; and sp.clip.agc_ against the per-parameter loop.

As a user runs it: one monitor for the whole run, on the model, and an
identical copy of the model trained without one; windows of ``every`` steps
alternate between the two (the monitored window starting at its sample).
The monitor's first window, where it builds what later samples reuse, is
reported on its own (``first_window_ratio``).

Targets: <= 1.05x amortised over 50 steps and over 10 (``every=10``), <= 1.3x on
a sampled step (100-layer x 512 MLP, batch 256; a GPT-2-sized model at sequence 128); agc_ <= 0.5x the loop's
time on a model with >= 200 parameter tensors.  The same targets with each
integration: a TensorBoard ``SummaryWriter`` attached (its writes queue to a
background thread), and DDP over 2 gloo ranks on this CPU (one all-reduce
per step).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from _util import run_cli, write
from signalprop.clip import agc_, agc_reference_
from signalprop.lab.models import DeepMLP


def _mlp(depth: int = 100, width: int = 512, batch: int = 256) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], str]:
    torch.manual_seed(0)
    m = DeepMLP(depth, width, "tanh", width, 10)
    x = torch.randn(batch, width)
    sp.init.critical_(m, x, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
    return m, lambda mod: F.cross_entropy(mod(x), y), f"MLP {depth} x {width}, tanh, batch {batch}"


def _gpt2(layers: int) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], str]:
    import transformers

    cfg = transformers.GPT2Config(n_layer=layers)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    return m, lambda mod: mod(input_ids=ids, labels=ids, use_cache=False).loss, \
        f"GPT-2 small config ({layers} layers), batch 4 x 128"


class _Loop:
    """SGD steps of one model (lr 0: the weights stay, so every window sees
    the same model), with a monitor when given one."""

    def __init__(self, model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], mon: Any = None) -> None:
        self.model, self.loss_of, self.mon = model, loss_of, mon
        self.opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def run(self, n: int) -> list[float]:
        """Per-step times of ``n`` steps."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            loss = self.loss_of(self.model)
            self.opt.zero_grad()
            loss.backward()
            if self.mon is not None:
                self.mon.step(loss)
            self.opt.step()
            times.append(time.perf_counter() - t)
        return times


def windows(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], rounds: int, every: int,
            writer: Any = None, twin: nn.Module | None = None) -> tuple[list[list[float]], list[list[float]], list[float]]:
    """Per-step times of ``rounds`` plain windows (``twin``, an identical copy
    of the model -- default a deep copy --, no monitor) and as many monitored
    windows (``model`` under one monitor for the whole run, each window
    starting at a sample), interleaved; and the monitor's first window,
    timed on its own."""
    plain = _Loop(twin if twin is not None else copy.deepcopy(model), loss_of)
    mon = sp.monitor(model, every=every, update_ratio=True, writer=writer)
    watched = _Loop(model, loss_of, mon)
    try:
        plain.run(2)  # warm-up
        first = watched.run(every)
        p_all, m_all = [], []
        for _ in range(rounds):
            p_all.append(plain.run(every))
            m_all.append(watched.run(every))
    finally:
        mon.close()
    return p_all, m_all, first


def case(build: Callable[[], tuple[nn.Module, Any, str]], rounds: int, every: int = 50,
         writer: Any = None) -> dict[str, Any]:
    model, loss_of, name = build()
    p_all, m_all, first = windows(model, loss_of, rounds, every, writer)
    plain_med = statistics.median(t for p in p_all for t in p)
    plain_window = statistics.median(sum(p) for p in p_all)
    return {"model": name + (" + TensorBoard writer" if writer is not None else ""), "every": every, "rounds": rounds,
            "plain_step_median_s": plain_med,
            "sampled_step_ratio": statistics.median(m[0] for m in m_all) / plain_med,
            # the step after a sample reads the sample's update and writes its histograms (with a writer)
            "step_after_sample_ratio": statistics.median(m[1] for m in m_all) / plain_med,
            "unsampled_step_ratio": statistics.median(t for m in m_all for t in m[2:]) / plain_med,
            "amortised_ratio": statistics.median(sum(m) for m in m_all) / plain_window,
            "first_window_ratio": sum(first) / plain_window,
            "targets": {"amortised": 1.05, "sampled": 1.3}}


def case_long_run(steps: int = 3200, window: int = 200) -> dict[str, Any]:
    """Whether a step costs more as the run grows: a small MLP sampled at
    every step (its history grows by a sample a step), the median step time
    over ``window`` steps near the end against the same near the start.  The
    rules read a bounded part of the history: ~1 (before, 10 -> 73 ms a
    step over 3,500 steps)."""
    m, loss_of, name = _mlp(10, 32, 16)
    loop = _Loop(m, loss_of, sp.monitor(m, every=1, update_ratio=True))
    times = loop.run(steps)
    early, late = statistics.median(times[window // 2:window]), statistics.median(times[-window:])
    return {"model": name, "every": 1, "steps": steps, "early_step_median_s": early, "late_step_median_s": late,
            "late_over_early": late / early, "target_ratio": 1.1}


def case_agc(repeat: int) -> dict[str, Any]:
    torch.manual_seed(0)
    m = DeepMLP(120, 128, "relu", 128, 10)  # 242 parameter tensors
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    n = sum(1 for _ in m.parameters())
    agc_(m.parameters(), clipping=0.01)  # warm-up
    agc_reference_(m.parameters(), clipping=0.01)
    a, b = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        agc_(m.parameters(), clipping=0.01)
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        agc_reference_(m.parameters(), clipping=0.01)
        b.append(time.perf_counter() - t)
    return {"parameter_tensors": n, "agc_median_s": statistics.median(a), "loop_median_s": statistics.median(b),
            "ratio": statistics.median(a) / statistics.median(b), "target_ratio": 0.5}


def _ddp_worker(rank: int, port: int, rounds: int, every: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inner = DeepMLP(50, 256, "tanh", 256, 10)
    twin = nn.parallel.DistributedDataParallel(copy.deepcopy(inner))
    m = nn.parallel.DistributedDataParallel(inner)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(128, 256, generator=g), torch.randint(0, 10, (128,), generator=g)
    loss_of = lambda mod: F.cross_entropy(mod(x), y)  # noqa: E731
    p_all, m_all, _ = windows(m, loss_of, rounds, every, twin=twin)
    plain = [sum(p) for p in p_all]
    mon = [sum(q) for q in m_all]
    sampled = [q[0] / statistics.median(p) for p, q in zip(p_all, m_all)]
    if rank == 0:
        Path(out).write_text(json.dumps({"plain": plain, "mon": mon, "sampled": sampled}))
    dist.barrier()  # rank 0 hosts the store: leave together
    dist.destroy_process_group()


def case_ddp(rounds: int, every: int = 50) -> dict[str, Any]:
    """DDP over 2 gloo ranks (1 thread each) on this CPU: the monitor's
    statistics combined across ranks in one all-reduce per step."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "ddp.json")
        mp.spawn(_ddp_worker, args=(port, rounds, every, path), nprocs=2, join=True)
        r = json.loads(Path(path).read_text())
    return {"model": "DDP, 2 gloo ranks x 1 thread, MLP 50 x 256, batch 128 per rank", "every": every,
            "rounds": rounds, "amortised_ratio": statistics.median(r["mon"]) / statistics.median(r["plain"]),
            "sampled_step_ratio": statistics.median(r["sampled"]), "targets": {"amortised": 1.05, "sampled": 1.3}}


def main(out: Path, repeat: int) -> dict[str, Any]:
    import tempfile

    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as d:
        writer = SummaryWriter(d)
        tb = case(_mlp, max(3, repeat), writer=writer)
        writer.close()
    rows = {"mlp_100x512": case(_mlp, max(3, repeat)), "mlp_100x512_every10": case(_mlp, max(6, 2 * repeat), 10),
            "mlp_50x256_every10": case(lambda: _mlp(50, 256, 128), max(10, 4 * repeat), 10),
            "long_run_every1": case_long_run(),
            "mlp_100x512_tensorboard": tb,
            "ddp_2_ranks": case_ddp(max(3, repeat)),
            "gpt2_small_seq128": case(lambda: _gpt2(12), 2, 10),
            "agc": case_agc(max(15, repeat * 8)), "threads": torch.get_num_threads()}
    write(out, "bench_monitor", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, 3)
