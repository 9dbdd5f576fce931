"""The depth sweep's quick subset (`signalprop lab run depth --quick`, a few
minutes) with the claims it must show; run by `make bench` (run_all.py).
tests/test_lab_depth_smoke.py keeps a small version in `make test`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from _util import run_cli, write
from signalprop.cli import main as cli


def check(tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "depth"
    main = cli
    assert main(["lab", "run", "depth", "--quick", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    cell = {(c["act"], c["init"], c["depth"]): c for c in r["cells"]}
    assert len(cell) == 18 and r["cached_cells"] == 0
    chance = r["chance"]
    # theory's prediction: critical trains at depth 100 where torch's default does not (sigmoid, tanh)
    for act in ("sigmoid", "tanh"):
        assert cell[(act, "critical", 100)]["test_acc"] > 0.8
        assert cell[(act, "default", 100)]["test_acc"] < chance + 0.1
        assert cell[(act, "critical", 100)]["verdict"] == "healthy"
        assert cell[(act, "default", 100)]["verdict"] == "vanishing"
    # Xavier with ReLU vanishes at depth 100 (gradient ratio << 1) and trains far worse than at depth 10
    assert cell[("relu", "xavier_normal", 100)]["grad_ratio"] < 0.5
    assert cell[("relu", "xavier_normal", 100)]["test_acc"] < cell[("relu", "xavier_normal", 10)]["test_acc"] - 0.3
    assert (out / "depth.png").stat().st_size > 10000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quick"] and cfg["config"]["seed"] == 0
    # an interrupted or repeated sweep resumes from the cached cells
    assert main(["lab", "run", "depth", "--quick", "--out", str(out)]) == 0
    r2 = json.loads((out / "results.json").read_text())
    assert r2["cached_cells"] == 18 and r2["cells"] == r["cells"]
    return {"claims": "all held", "cells": len(cell), "headline": r.get("headline", [])}


def main(out: Path, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        rows = check(Path(d))
    write(out, "lab_depth_quick", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, 1)
