"""signalprop.init.lsuv_ vs the PyPI ``lsuv`` package on a 50-layer net: forward
passes and time, plus each layer's output variance on the calibration batch."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

import signalprop as sp
from _util import run_cli, write
from signalprop.lab.models import DeepMLP


def _count_passes(model: nn.Module) -> list[int]:
    n = [0]
    model.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    return n


def _worst_var(model: nn.Module, x: torch.Tensor) -> float:
    vs = []
    hs = [m.register_forward_hook(lambda mod, a, o: vs.append(float(o.var(unbiased=False))))
          for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return max(abs(v - 1.0) for v in vs)


def main(out: Path, repeat: int) -> dict:
    from lsuv.lsuvinit import LSUVinit

    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    rows: dict = {}
    times: dict[str, list[float]] = {"signalprop": [], "pypi_lsuv": []}
    for r in range(repeat):  # interleaved, so that machine noise hits both alike
        for name in times:
            torch.manual_seed(r)
            m = DeepMLP(50, 128, "relu", 128, 10)
            n = _count_passes(m)
            t = time.perf_counter()
            if name == "signalprop":
                sp.init.lsuv_(m, x, tol=0.05, generator=torch.Generator().manual_seed(r))
            else:
                LSUVinit(m, x, needed_std=1.0, std_tol=0.05, max_attempts=10, do_orthonorm=True, verbose=False)
            times[name].append(time.perf_counter() - t)
            rows[name] = {"forward_passes": n[0], "worst_abs_var_error": _worst_var(m, x)}
    for name, ts in times.items():
        rows[name]["median_s"] = sorted(ts)[len(ts) // 2]
    rows["time_ratio"] = rows["signalprop"]["median_s"] / rows["pypi_lsuv"]["median_s"]
    rows["passes_ratio"] = rows["signalprop"]["forward_passes"] / rows["pypi_lsuv"]["forward_passes"]
    write(out, "bench_lsuv", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, 5)
