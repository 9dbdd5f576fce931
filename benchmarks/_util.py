"""Shared timing helper: medians of repeated runs, ours vs reference in one process."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def median_time(fn: Callable[[], Any], repeat: int = 7, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(ours: Callable[[], Any], ref: Callable[[], Any], repeat: int = 7) -> tuple[float, float]:
    """Alternate the two so that machine noise hits both alike."""
    ours(), ref()
    a, b = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        ours()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref()
        b.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def write(out: Path, name: str, rows: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2))
    return path


def run_cli(main: Callable[[Path, int], dict], repeat: int = 5) -> None:
    """The command line every benchmark shares: --out DIR, --repeat N; prints the rows."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--repeat", type=int, default=repeat)
    a = ap.parse_args()
    print(json.dumps(main(a.out, a.repeat), indent=1))
