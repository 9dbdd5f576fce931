"""The command line: output, files and exit codes."""

import json
import subprocess
import sys

from signalprop.cli import main


def test_theory_json(capsys):
    assert main(["theory", "tanh", "--sigma-b2", "0.05", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert abs(d["critical_sigma_w2"] - 1.7610) < 1e-3 and d["phase"] == "critical"


def test_theory_table_and_plot(tmp_path, capsys):
    png = tmp_path / "phase.png"
    assert main(["theory", "relu", "--sigma-w2", "1.5", "--sigma-b2", "0.1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "ordered" in out and "q_star" in out
    assert png.stat().st_size > 5000


def test_usage_errors_exit_2(capsys):
    assert main(["theory", "tanhh"]) == 2
    assert "unknown activation 'tanhh'" in capsys.readouterr().err
    assert main(["lab", "run", "nope"]) == 2
    assert main(["lab", "run", "explode", "--set", "oops"]) == 2


def test_lab_list_and_run(tmp_path, capsys):
    assert main(["lab", "list"]) == 0
    assert "explode" in capsys.readouterr().out
    assert main(["lab", "run", "explode", "--out", str(tmp_path), "--set", "seed=3"]) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["config"]["seed"] == 3


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "signalprop.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Exit codes" in r.stdout
