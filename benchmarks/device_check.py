"""Short checks of the GPU paths (dtype, device placement), run on a CUDA machine.

Not part of ``make test`` (CI has no GPU).  Usage: ``PYTHONPATH=src python
benchmarks/device_check.py OUT_DIR [--no-cost]``; writes ``device_check.json``,
and (unless ``--no-cost``) times check against a plain step on the four rows of
:mod:`device_check_cost` (``device_check_cost.json``, profiler tables).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import signalprop as sp
from signalprop.lab.models import DeepMLP


def main(out: Path) -> dict:
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}}
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = torch.empty(256, 128, dtype=dtype, device=dev)
        for name in ("xavier_normal_", "kaiming_uniform_", "lecun_normal_", "trunc_normal_", "orthogonal_"):
            getattr(sp.init, name)(t, generator=g)
            assert t.dtype == dtype and t.device.type == "cuda" and torch.isfinite(t).all(), (name, dtype)
        res["checks"][f"init {dtype}"] = "ok"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        m = DeepMLP(200, 256, "tanh", 64, 10).to(dev)
        x = torch.rand(128, 64, device=dev)
        s = sp.init.critical_(m, x)
        m = m.to(dtype)
        t0 = time.perf_counter()
        r = sp.check(m, x.to(dtype), spectrum=dtype == torch.float32)
        res["checks"][f"check {dtype}"] = {"verdict": r.verdict, "ratio": r.summary.first_last_grad_ratio,
                                           "seconds": time.perf_counter() - t0, "q_star": s.layers[1].q_star,
                                           "spectrum": None if r.spectrum is None else r.spectrum.reading}
        assert all(p.device.type == "cuda" and p.dtype == dtype for p in m.parameters())
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3)).to(dev)
    s = sp.init.lsuv_(m, torch.randn(32, 3, 16, 16, device=dev), generator=torch.Generator(device=dev).manual_seed(0))
    res["checks"]["lsuv cuda"] = {"passes": s.forward_passes, "notes": [layer.note for layer in s.layers]}
    res["checks"]["monitor nccl"] = _monitor_nccl(dev)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(res, indent=2, default=str))
    return res


def _monitor_nccl(dev: torch.device, steps: int = 100, every: int = 50) -> dict:
    """The monitor's NCCL path on this GPU: a one-rank process group passed
    as group= (reduced over even with one rank), so every step pays the
    all-reduce it would pay under DDP; timed against the same loop without
    the monitor.  Multi-GPU scaling needs a machine with several GPUs."""
    import os
    import socket
    import statistics

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        m = DeepMLP(100, 1024, "tanh", 1024, 10).to(dev)
        x, y = torch.randn(256, 1024, device=dev), torch.randint(0, 10, (256,), device=dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)

        def run(monitor: bool) -> list[float]:
            mon = sp.monitor(m, every=every, group=dist.group.WORLD) if monitor else None
            times = []
            for _ in range(steps):
                torch.cuda.synchronize()
                t = time.perf_counter()
                loss = nn.functional.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                if mon is not None:
                    mon.step(loss)
                opt.step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            if mon is not None:
                mon.close()
            return times

        run(False)
        plain, mon = run(False), run(True)
        return {"model": "MLP 100 x 1024, batch 256, every=50, NCCL one rank",
                "amortised_ratio": sum(mon) / sum(plain),
                "sampled_step_ratio": mon[0] / statistics.median(plain),
                "unsampled_step_ratio": statistics.median(mon[1:every]) / statistics.median(plain)}
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = Path(args[0] if args else ".")
    print(json.dumps(main(out), indent=1, default=str))
    if "--no-cost" not in sys.argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import device_check_cost

        device_check_cost.main(out, None, 5)
