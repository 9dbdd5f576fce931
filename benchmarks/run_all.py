"""Run every benchmark; each writes its own JSON under --out."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BENCHES = ["bench_init", "bench_theory", "bench_check", "bench_lsuv", "bench_monitor", "bench_early_warning",
           "lab_depth_quick", "bench_coord", "bench_html", "bench_stability"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    for name in args.only or BENCHES:
        if not (HERE / f"{name}.py").exists():
            continue
        mod = importlib.import_module(name)
        rows = mod.main(args.out, 5)
        print(name, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
