"""The command line: output, files and exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
        assert main(["check", spec, "--batch", "4"]) == 0, spec  # stock inits of shallow models: healthy
    assert main(["check", "mlp:depth=5,width=16,act=tanh", "--spectrum", "--init", "orthogonal"]) == 0
    assert "Jacobian (exact)" in capsys.readouterr().out


def test_check_user_factory(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())\n")
    monkeypatch.chdir(tmp_path)
    assert main(["check", "mymodels:make", "--input-shape", "3,8,8", "--init", "kaiming_normal"]) == 0
    assert "Conv2d" in capsys.readouterr().out
    assert main(["check", "mymodels:make"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    # a data-dependent init runs the model: a forward that fails on the inputs is the same input error
    # (exit 2, one line) as without --init, not a traceback from inside the initializer (exit 1)
    for init in ("critical", "lsuv"):
        assert main(["check", "mymodels:make", "--input-shape", "4,8,8", "--init", init]) == 2
        err = capsys.readouterr().err
        assert f"init '{init}' runs the model, but its forward failed on inputs of shape (64, 4, 8, 8)" in err
        assert "Traceback" not in err
    # a lazy layer is refused as check refuses it, whichever init runs first
    (tmp_path / "lazy.py").write_text("import torch\n"
                                      "def make():\n"
                                      "    return torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Tanh())\n")
    for init in ("critical", "lsuv", "kaiming_normal"):
        assert main(["check", "lazy:make", "--input-shape", "8", "--init", init]) == 2
        assert "is lazy and not initialised yet" in capsys.readouterr().err, init
    assert main(["check", "mlp:depth=3,colour=red"]) == 2
    assert main(["check", "nosuchmodule:f"]) == 2


def test_demo_runs_quickly(tmp_path, capsys, monkeypatch):
    """Dive into Deep Learning's numbers come first, the training runs on one
    torch thread with subnormals flushed, and the caller's settings are back after."""
    import torch

    from signalprop.lab import demo
    from signalprop.lab.train import denormals_flushed

    threads_while_training, flushed_while_training = [], []

    def train(*args, **kwargs):
        threads_while_training.append(torch.get_num_threads())
        flushed_while_training.append(denormals_flushed())
        return real_train(*args, **kwargs)

    real_train = demo.train
    monkeypatch.setattr(demo, "train", train)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["demo", "--out", str(tmp_path), "--steps", "3"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert threads_while_training == [1, 1, 1, 1]
    # subnormals flushed while training (the vanishing models' slow path), the process's setting back after
    assert flushed_while_training == [True] * 4 and not denormals_flushed()
    d = json.loads((tmp_path / "demo.json").read_text())
    verdicts = {r["scheme"]: r["verdict"] for r in d["rows"]}
    assert verdicts["critical"] == "healthy" and verdicts["default"] == "vanishing"
    assert verdicts["normal"] in ("exploding", "saturated")
    assert d["config"]["threads"] == 1
    assert (tmp_path / "report-critical.html").exists()
    out = capsys.readouterr().out
    assert "after 3 steps of SGD" in out
    assert out.index("sigmoid'(x) peaks at 0.25") < out.index("training: started")


BAD = [
    (["check", "mlp:depth=2,width=8", "--input-shape", "100000000,100000000"], "inputs of shape (64, 100000000"),
    (["check", "mlp:width=-4"], "width=-4 must be at least 1"),
    (["check", "mlp:width=0"], "width=0 must be at least 1"),
    (["check", "mlp:depth=-3"], "depth=-3 must be at least 1"),
    (["check", "mlp:depth=abc"], "depth='abc' must be a whole number"),
    (["check", "mlp:depth=100000"], "GiB"),
    (["check", "transformer:d_model=30,heads=4"], "not divisible by heads=4"),
    (["check", "--batch", "-1"], "positive whole number"),
    (["check", "--input-shape", "-5"], "positive integers"),
    (["check", "--input-shape", "3,x"], "positive integers"),
    (["theory", "tanh", "--sigma-w2", "nan"], "finite number"),
    (["theory", "tanh", "--sigma-b2", "-1"], ">= 0"),
    (["demo", "--steps", "-1"], "positive whole number"),
    (["lab", "run", "explode", "--set", "n=abc"], "n='abc' must be a whole number"),
]


def _run_cli(args, cwd=None):
    return subprocess.run([sys.executable, "-m", "signalprop.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_bad_input_exits_2_with_one_clear_line(tmp_path, capsys):
    for args, msg in BAD:
        assert main(args + (["--out", str(tmp_path / "lab")] if args[0] == "lab" else [])) == 2, args
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "lab").exists()  # a rejected --set leaves no config behind


def test_bad_output_paths_are_refused_before_any_work(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for args in (["check", "mlp:depth=2,width=8", "--html", str(f / "r.html")],
                 ["check", "mlp:depth=2,width=8", "--html", str(tmp_path)],
                 ["check", "mlp:depth=2,width=8", "--json", str(f / "r.json")],
                 ["theory", "tanh", "--plot", str(f / "p.png")],
                 ["demo", "--out", str(f)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert ("is a file" in err or "is a directory" in err) and "Traceback" not in err


def test_user_modules_that_fail_are_named(tmp_path, capsys):
    (tmp_path / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    (tmp_path / "names.py").write_text("x = undefined_name\n")
    (tmp_path / "facs.py").write_text("import torch\ndef bad():\n    raise NameError('inside')\n"
                                      "def good(width=4):\n    return torch.nn.Linear(width, 3), torch.randn(5, width)\n")
    for spec, msg in (("raises:f", "RuntimeError: boom at import"), ("syntax:f", "SyntaxError"),
                      ("names:f", "NameError"), ("facs:bad", "raised NameError: inside"),
                      ("facs:good:width", "KEY=VALUE"), ("facs:nothing", "no callable 'nothing'")):
        r = _run_cli(["check", spec], cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (spec, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _run_cli(["check", "facs:good:width=6"], cwd=tmp_path)
    assert r.returncode == 0 and "Linear" in r.stdout


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_report_files_that_cannot_be_written_exit_2_after_the_report(tmp_path, capsys):
    """The report is printed first; a full disk is one line on stderr and
    exit 2, and the other file is written all the same."""
    for flag in ("--json", "--html"):
        assert main(["check", "mlp:depth=2,width=8", flag, "/dev/full"]) == 2, flag
        out, err = capsys.readouterr()
        assert "verdict:" in out and "Traceback" not in err
        assert err.strip().splitlines() == [f"error: cannot write {flag} '/dev/full': No space left on device"]
    html = tmp_path / "r.html"
    assert main(["check", "mlp:depth=2,width=8", "--json", "/dev/full", "--html", str(html)]) == 2
    assert html.stat().st_size > 1000 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["theory", "tanh", "--plot", "/dev/full"]) == 2
    assert "cannot write --plot" in capsys.readouterr().err


def test_a_depth_that_would_crash_the_process_is_refused_before_building():
    """Deeper than the stack allows, freeing the autograd graph after check
    ends in a segmentation fault (exit 139; run in a subprocess for that
    reason): refused, with the deepest that fits."""
    r = _run_cli(["check", "mlp:depth=20000,width=4", "--batch", "2"])
    assert r.returncode == 2, (r.returncode, r.stderr[-300:])
    assert len(r.stderr.strip().splitlines()) == 1 and "at most depth=" in r.stderr and "ulimit -s" in r.stderr


def test_the_depth_limit_follows_the_stack_limit(monkeypatch):
    from signalprop.lab import models

    kind, opts = models.parse_spec("mlp:depth=20000,width=4")
    monkeypatch.setattr(models, "_stack_bytes", lambda: 8 << 20)
    with pytest.raises(ValueError, match=r"8 MiB stack \(at most depth=14399\)"):
        models._check_graph_depth(kind, opts, "mlp:depth=20000,width=4")
    monkeypatch.setattr(models, "_stack_bytes", lambda: 16 << 20)
    models._check_graph_depth(kind, opts, "mlp:depth=20000,width=4")  # twice the stack: fits
    monkeypatch.setattr(models, "_stack_bytes", lambda: None)
    models._check_graph_depth(kind, opts, "mlp:depth=20000,width=4")  # unlimited
    kind, opts = models.parse_spec("transformer:layers=3200,d_model=4,heads=1")
    monkeypatch.setattr(models, "_stack_bytes", lambda: 8 << 20)
    with pytest.raises(ValueError, match="at most layers=3199"):
        models._check_graph_depth(kind, opts, "transformer:layers=3200")


def test_factory_arguments_are_read_as_the_types_the_factory_declares(tmp_path, monkeypatch, capsys):
    (tmp_path / "typedfacs.py").write_text(
        "from typing import Literal\n"
        "import torch\n"
        "def make(width: int = 4, bias: bool = True, scale: float = 1.0, name: str = 'a', depth=None,\n"
        "         mode: Literal['a', 'b'] = 'a', limit: int | None = 3):\n"
        "    if not (isinstance(width, int) and isinstance(bias, bool) and isinstance(scale, float)\n"
        "            and name == '7' and depth == 3 and mode == 'b' and limit is None):\n"
        "        raise TypeError(f'{width!r} {bias!r} {scale!r} {name!r} {depth!r} {mode!r} {limit!r}')\n"
        "    if bias:\n"
        "        raise ValueError('bias arrived true')\n"
        "    return torch.nn.Linear(width, 3, bias=bias), torch.randn(5, width)\n")
    monkeypatch.chdir(tmp_path)
    assert main(["check", "typedfacs:make:bias=false,scale=2,width=6,name=7,depth=3,mode=b,limit=none"]) == 0
    assert "Linear" in capsys.readouterr().out
    for spec, msg in (("typedfacs:make:bias=notabool", "bias='notabool' is not a bool (true or false)"),
                      ("typedfacs:make:width=2.5", "width='2.5' is not an int (a whole number)"),
                      ("typedfacs:make:scale=big", "scale='big' is not a float"),
                      ("typedfacs:make:mode=c", "mode='c' is not one of 'a', 'b'"),
                      ("typedfacs:make:limit=x", "limit='x' is not None (none) or an int (a whole number)"),
                      ("typedfacs:make:colour=red", "make() takes no argument 'colour'")):
        assert main(["check", spec]) == 2, spec
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (spec, err)


def test_seed_seeds_the_model_too(capsys):
    outs = []
    for _ in range(2):
        assert main(["check", "mlp:depth=3,width=16,act=tanh", "--seed", "5", "--json", "/dev/stdout"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_errors_keep_square_brackets_and_version(capsys):
    assert main(["lab", "run", "explode", "--set", "factors=[1]"]) == 2
    assert "[1]" in capsys.readouterr().err
    r = _run_cli(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("signalprop ")


def test_theory_always_shows_numbers_and_explains_both_critical_points(capsys):
    assert main(["theory", "silu"]) == 0
    out = capsys.readouterr().out
    assert "critical_init_sigma_w2" in out and "gain_forward" in out and "E[phi]" in out


def test_terminal_output_wraps_instead_of_cropping_and_elides_once():
    import signalprop as sp
    from signalprop.lab.models import build
    from signalprop.report.terminal import render_text

    b = build("mlp:depth=50,width=32,act=sigmoid", batch=16)
    report = sp.check(b.model, b.inputs)
    assert len(report.layers) == 101
    for width in (80, 120):
        text = render_text(report, width)
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= width, width
        assert "…" not in "".join(line for line in lines if "Linear" in line or "Sigmoid" in line)  # no cropped cell
        rows = [line.split()[0] for line in lines  # table lines: number, name, class
                if len(line.split()) > 2 and line.split()[0].isdigit() and line.split()[2] in ("Linear", "Sigmoid")]
        assert rows[0] == "0" and rows[-1] == "100"  # first and last rows always shown
        assert sum(1 for line in lines if line.strip().startswith("…")) == 1  # one line for the elided middle
        assert "rows not shown: 10 .. 90 (81 rows" in text.replace("\n", " ")
        # the fix line wraps at word boundaries: the suggestion's words survive intact
        assert "signalprop.init.critical_(model," in text


def test_progress_lines_when_not_a_terminal(tmp_path):
    """A log file (stdout not a terminal) gets progress lines with the time left, not silence."""
    r = _run_cli(["lab", "run", "depth", "--out", str(tmp_path / "d"), "--set", "depths=[6]", "--set", 'acts=["tanh"]',
                  "--set", 'inits=["default","critical"]', "--set", "steps=5", "--set", "lr_scale=[1.0]",
                  "--set", "residual_blocks=0"])
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "/" in line and "%" in line]
    assert lines and lines[-1].split(":")[1].strip().startswith("10/10 (100%)"), r.stdout


def test_line_bar_reports_time_left():
    import io

    from rich.console import Console

    from signalprop.report.progress import LineBar

    buf = io.StringIO()
    bar = LineBar(Console(file=buf, width=200), interval=0.0)
    bar.start(4, "work")
    bar.advance(1)
    bar.advance(1)
    bar.advance(2, "work done")
    out = buf.getvalue().splitlines()
    assert out[0] == "work: started, 4 units of work"
    assert out[1].startswith("work: 1/4 (25%)") and "left" not in out[1]  # no pace measured yet
    assert out[2].startswith("work: 2/4 (50%)") and "left" in out[2]
    assert out[3].startswith("work done: 4/4 (100%)") and "left" not in out[3]


def test_line_bar_time_left_follows_the_pace_not_the_first_slow_step(monkeypatch):
    """Set-up takes 100 s before the first unit, then a unit takes 1 s: the
    time left is the units left at 1 s each, not 100 s each; when the pace
    halves, the estimate follows within a window."""
    import io

    from rich.console import Console

    from signalprop.report import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    buf = io.StringIO()
    bar = progress.LineBar(Console(file=buf, width=200), interval=10.0)  # the pace of the last 60 s
    bar.start(1000, "work")
    now[0] = 100.0
    bar.advance(1)
    for _ in range(10 + 200):
        now[0] += 1.0
        bar.advance(1)
    for _ in range(100):  # twice as slow from here
        now[0] += 2.0
        bar.advance(1)
    lines = buf.getvalue().splitlines()
    assert lines[1].startswith("work: 1/1000") and "left" not in lines[1]
    assert lines[2].startswith("work: 11/1000") and lines[2].endswith("about 16m29s left")  # 989 units x 1 s
    assert lines[-1].startswith("work: 311/1000") and lines[-1].endswith("about 22m58s left")  # 689 x 2 s


def test_check_with_dropout_gives_one_report_per_seed(tmp_path, monkeypatch, capsys):
    """A factory's model in train mode draws dropout masks during the pass:
    they come from --seed, so the same command gives the same JSON whatever
    the process's RNG held (it starts from a random seed in each process,
    and the reports differed run to run); another seed gives other masks."""
    import torch

    (tmp_path / "dropmodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5),\n"
        "                               torch.nn.Linear(32, 4))\n")
    monkeypatch.chdir(tmp_path)
    texts = []
    for k, seed in enumerate(["0", "0", "1"]):
        torch.manual_seed(100 + k)  # the process's RNG elsewhere each time
        before = torch.get_rng_state()
        j = tmp_path / f"r{k}.json"
        main(["check", "dropmodels:make", "--input-shape", "16", "--seed", seed, "--json", str(j)])
        assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG as it was
        texts.append(j.read_text())
    capsys.readouterr()
    assert texts[0] == texts[1] and texts[0] != texts[2]
