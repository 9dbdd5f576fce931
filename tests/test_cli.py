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


def test_check_exit_codes_and_files(tmp_path, capsys):
    j, h = tmp_path / "r.json", tmp_path / "r.html"
    code = main(["check", "mlp:depth=20,width=64,act=sigmoid", "--json", str(j), "--html", str(h)])
    assert code == 1  # torch's default init: problems found
    d = json.loads(j.read_text())
    assert d["verdict"] == "vanishing" and h.stat().st_size > 10000
    assert main(["check", "mlp:depth=20,width=64,act=tanh", "--init", "critical"]) == 0
    out = capsys.readouterr().out
    assert "verdict: healthy" in out


def test_check_builtin_kinds(capsys):
    for spec in ("cnn:depth=4,channels=8,size=8", "resmlp:blocks=10,width=32",
                 "transformer:layers=1,d_model=32,heads=2,seq=8,vocab=20"):
        assert main(["check", spec, "--batch", "4"]) in (0, 1), spec
    assert main(["check", "mlp:depth=5,width=16,act=tanh", "--spectrum", "--init", "orthogonal"]) in (0, 1)
    assert "Jacobian (exact)" in capsys.readouterr().out


def test_check_user_factory(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())\n")
    monkeypatch.chdir(tmp_path)
    assert main(["check", "mymodels:make", "--input-shape", "3,8,8", "--init", "kaiming_normal"]) in (0, 1)
    assert "Conv2d" in capsys.readouterr().out
    assert main(["check", "mymodels:make"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["check", "mlp:depth=3,colour=red"]) == 2
    assert main(["check", "nosuchmodule:f"]) == 2


def test_demo_runs_quickly(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3"]) == 0
    d = json.loads((tmp_path / "demo.json").read_text())
    verdicts = {r["scheme"]: r["verdict"] for r in d["rows"]}
    assert verdicts["critical"] == "healthy" and verdicts["default"] == "vanishing"
    assert verdicts["normal"] in ("exploding", "saturated")
    assert (tmp_path / "report-critical.html").exists()
    assert "after 3 steps of SGD" in capsys.readouterr().out
