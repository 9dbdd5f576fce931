"""A small depth sweep through the lab's own code path (the quick sweep with
its accuracy claims runs in `make bench`: benchmarks/lab_depth_quick.py)."""

import json

from signalprop.cli import main


def test_small_depth_sweep_verdicts_and_resume(tmp_path, capsys):
    out = tmp_path / "depth"
    args = ["lab", "run", "depth", "--out", str(out), "--set", "depths=[40]", "--set", 'acts=["tanh"]',
            "--set", 'inits=["default","critical"]', "--set", "steps=20", "--set", "lr_scale=[1.0]",
            "--set", "residual_blocks=0"]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    cell = {c["init"]: c for c in r["cells"]}
    assert set(cell) == {"default", "critical"} and r["cached_cells"] == 0
    # torch's default init vanishes through 40 tanh layers; the critical one does not
    assert cell["default"]["verdict"] == "vanishing" and cell["critical"]["verdict"] == "healthy"
    assert cell["default"]["grad_ratio"] < 1e-3 < 0.5 < cell["critical"]["grad_ratio"] < 2
    assert (out / "depth.png").stat().st_size > 5000
    assert main(args) == 0  # a repeated sweep resumes from its cached cells
    r2 = json.loads((out / "results.json").read_text())
    assert r2["cached_cells"] == 2 and r2["cells"] == r["cells"]
    assert "critical" in capsys.readouterr().out
