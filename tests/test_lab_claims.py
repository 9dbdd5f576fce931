"""The README's lab sentences against the numbers they stand on.

The full runs take minutes to hours, so their results are kept in
``docs/results/`` (written by the lab itself); each test reads one kept
result and checks the quantity a README sentence states, with the
sentence's own rounding.  The seed demos are cheap and run here; the
quick runs of the papers are in tests/test_lab_papers.py, the monitor's in
tests/test_monitor.py, the zoo's cells in tests/test_zoo.py.  The depth
sweep's quick run takes ~5 minutes: benchmarks/lab_depth_quick.py checks it.
Against the kept results, not reruns: a rerun with a newer version may move
the last digit (orthogonal_ now draws wide matrices as torch does)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from signalprop.lab import papers as P
from signalprop.lab import run_experiment

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
README = (ROOT / "README.md").read_text()
LN10 = math.log(10)


def _kept(path: str) -> dict:
    return json.loads((RESULTS / path).read_text())


def _row(name: str) -> str:
    """The README's table row for experiment ``name``."""
    return next(line for line in README.splitlines() if line.startswith(f"| `{name}` |"))


def test_glorot2010_row():
    """'0.089 vs 0.70 for tanh; 0.047 vs 0.32 for softsign ... shrink 11x and
    1.4x for tanh, 21x and 3.1x for softsign: much flatter, not level,
    softsign less so; activation std 0.373 -> 0.255, 0.267 -> 0.101 (normalized),
    0.430 -> 0.043, 0.302 -> 0.021 (standard)'."""
    r = _kept("papers/glorot2010/results.json")["runs"]
    row = _row("glorot2010")
    ratio = {k: v["grad_ratio_first_last"] for k, v in r.items()}
    assert [round(ratio[k], n) for k, n in (("tanh/standard", 3), ("tanh/normalized", 2), ("softsign/standard", 3),
                                           ("softsign/normalized", 2))] == [0.089, 0.70, 0.047, 0.32]
    drop = {k: 1 / v for k, v in ratio.items()}
    assert [round(drop["tanh/standard"]), round(drop["tanh/normalized"], 1), round(drop["softsign/standard"]),
            round(drop["softsign/normalized"], 1)] == [11, 1.4, 21, 3.1]
    for act in ("tanh", "softsign"):  # the words, by the thresholds the lab's reading uses
        assert drop[f"{act}/normalized"] > P.GLOROT_LEVEL  # not level
        assert drop[f"{act}/standard"] >= P.GLOROT_MUCH * drop[f"{act}/normalized"]  # much flatter
    assert drop["softsign/normalized"] > drop["tanh/normalized"]  # softsign less so
    acts = [(r[f"{a}/{i}"]["activation_std"][0], r[f"{a}/{i}"]["activation_std"][-1])
            for i in ("normalized", "standard") for a in ("tanh", "softsign")]
    assert [(round(a, 3), round(b, 3)) for a, b in acts] == [(0.373, 0.255), (0.267, 0.101), (0.430, 0.043),
                                                             (0.302, 0.021)]
    assert "much flatter, not level, softsign less so" in row and "about level |" not in row.split("|")[3]


def test_saxe2014_row():
    """'step scaled as lr/depth (lr = 0.05) ... orthogonal 535, 924, 1294,
    1189, 1373, 1286 -- 2.4x longer at depth 8 than at 2, then flat from 8
    to 64 (1,189-1,373, within 16%); Gaussian 504, 2321, then not within 4,000'."""
    kept = _kept("papers/saxe2014/results.json")
    config = _kept("papers/saxe2014/config.json")["config"]
    depths, t = kept["depths"], kept["learning_time"]
    assert config["lr"] == 0.05 and config["max_steps"] == 4000 and "lr/depth (lr = 0.05" in _row("saxe2014")
    assert depths == [2, 4, 8, 16, 32, 64]
    assert t["orthogonal"] == [535, 924, 1294, 1189, 1373, 1286]
    assert t["gaussian"] == [504, 2321, None, None, None, None]
    assert round(t["orthogonal"][2] / t["orthogonal"][0], 1) == 2.4
    flat = t["orthogonal"][2:]
    assert max(flat) / min(flat) <= 1.16 and P._flat_from(tuple(depths), t["orthogonal"]) == 8


def test_he2015_row():
    """'Xavier's loss stays at ln 10 (2.303), test 9.4%, `vanishing` at init
    (first/last gradient 2.8e-5); Kaiming's falls to 0.006, test 90.6%'."""
    r = _kept("papers/he2015/results.json")["runs"]
    x, k = r["xavier_normal"], r["kaiming_normal"]
    assert abs(x["final_loss"] - LN10) < 0.0005 and round(x["test_acc"], 3) == 0.094
    assert x["verdict_at_init"] == "vanishing" and f"{x['grad_ratio_at_init']:.1e}" == "2.8e-05"
    assert round(k["final_loss"], 3) == 0.006 and round(k["test_acc"], 3) == 0.906
    assert _kept("papers/he2015/config.json")["config"]["steps"] == 600


def test_xiao2018_row():
    """'critical_'s loss falls from 2.30 to 1.59, test 37.9%; Kaiming's stays
    at chance (2.304, 12.0%), `exploding` at init (gradients 4.5e17x larger
    at the input)'."""
    r = _kept("papers/xiao2018/results.json")["runs"]
    c, k = r["critical"], r["kaiming_normal"]
    assert (round(c["losses"][0], 2), round(c["final_loss"], 2), round(c["test_acc"], 3)) == (2.30, 1.59, 0.379)
    assert round(k["final_loss"], 3) == 2.304 and abs(k["final_loss"] - LN10) < 0.005 and round(k["test_acc"], 3) == 0.120
    assert k["verdict_at_init"] == "exploding" and f"{k['grad_ratio_at_init']:.1e}" == "4.5e+17"
    assert _kept("papers/xiao2018/config.json")["config"]["depth"] == 1000


def _depth_cells() -> dict[tuple[str, str, int, int], dict]:
    """(act, init, depth, steps) -> cell, from every kept depth sweep."""
    cells: dict[tuple[str, str, int, int], dict] = {}
    for f in ("depth-10-1000.json", "depth-10000.json", "depth-10000-sigmoid-lr4.8.json",
              "depth-1000-tanh-critical-2000steps.json", "depth-1000-sigmoid-critical-2000steps.json"):
        steps = _kept(f.replace(".json", ".config.json"))["config"]["steps"]
        for c in _kept(f)["cells"]:
            key = (c["act"], c["init"], c["depth"], steps)
            if key not in cells or c["val_acc"] > cells[key]["val_acc"]:  # the sweep's rule: best on validation
                cells[key] = c
    return cells


def test_depth_table_is_the_kept_sweep():
    """Every number in the README's depth table, against the kept cells: the
    first number of a cell is the 500-step sweep (300 at depth 10,000: of
    the two learning rates tried for sigmoid, the better on validation, as
    the sweep picks), the one marked † the 2,000-step rerun."""
    cells = _depth_cells()
    names = {"torch default": "default", "Xavier normal": "xavier_normal", "Kaiming normal": "kaiming_normal",
             "orthogonal": "orthogonal", "LSUV": "lsuv", "critical": "critical"}
    table = [line for line in README.splitlines() if re.match(r"\| (tanh|sigmoid|ReLU) / ", line)]
    assert len(table) == 18
    checked = 0
    for line in table:
        label, *cols = [c.strip() for c in line.strip("|").split("|")]
        act, init = label.replace("*", "").split(" / ")
        for depth, text in zip((10, 100, 1000, 10000), cols):
            for part in filter(None, (p.strip() for p in text.replace("*", "").split(";"))):
                steps = 2000 if part.endswith("†") else 300 if depth == 10000 else 500
                cell = cells[(act.lower(), names[init], depth, steps)]
                assert f"{100 * cell['test_acc']:.1f}" == part.rstrip("†"), (label, depth, part)
                checked += 1
    assert checked == 52


def test_depth_check_agrees_with_training_but_in_two_cells():
    """'every critical tanh and sigmoid net is healthy with a first/last
    gradient ratio of 1.09-1.21; every other net that stayed near chance is
    vanishing (ratios down to 1e-22), exploding or dead (four ReLU nets,
    critical ReLU at depth 100 among them); the exceptions are
    torch's default tanh at depth 10 ... and critical sigmoid at depth 10,000'.
    Near chance: test accuracy under 20%; trained: over 50%."""
    cells = _depth_cells()
    for (act, init, depth, _), c in cells.items():
        if init == "critical" and act != "relu":
            assert c["verdict"] == "healthy" and 1.085 <= float(c["grad_ratio"]) < 1.215, (act, depth)
        if c["test_acc"] < 0.2 and (act, init, depth) != ("sigmoid", "critical", 10000):
            assert c["verdict"] in ("vanishing", "exploding", "dead"), (act, init, depth)
        if c["test_acc"] > 0.5 and (act, init, depth) != ("tanh", "default", 10):
            assert c["verdict"] == "healthy", (act, init, depth)
    assert cells[("tanh", "default", 10, 500)]["verdict"] == "vanishing"
    assert round(100 * cells[("tanh", "default", 10, 500)]["test_acc"], 1) == 93.1
    dead = sorted((a, i, d) for (a, i, d, _), c in cells.items() if c["verdict"] == "dead")
    assert len(dead) == 4 and all(a == "relu" for a, _, _ in dead) and ("relu", "critical", 100) in dead
    vanishing = [float(c["grad_ratio"]) for c in cells.values() if c["verdict"] == "vanishing"]
    assert f"{min(vanishing):.0e}" == "2e-22"
    text = " ".join(README.split())
    assert "agrees with the training in all but two cells: every critical tanh and sigmoid net is `healthy`" in text
    assert "every critical net is `healthy`" not in text


def test_residual_sentence():
    """'trains to 95.5% with Fixup scaling and does not train without it
    (10.0%; check says non-finite)'."""
    res = {r["residual"]: r for r in _kept("depth-10-1000.json")["residual"]}
    assert round(100 * res["fixup"]["test_acc"], 1) == 95.5 and res["fixup"]["verdict"] == "healthy"
    assert round(100 * res["none"]["test_acc"], 1) == 10.0 and res["none"]["verdict"] == "non-finite"


def test_seed_demos_sentence(tmp_path):
    """'sigmoid's autograd gradient peaks at 0.25 at x = 0 and is 3.4e-4 at
    x = -8; the product of 100 random 4x4 N(0,1) matrices reaches entries of
    order 1e21 (seed 0; the Lyapunov exponent predicts 0.24 decades per
    factor, measured 0.21), Xavier-scaled factors still drift down,
    orthogonal factors keep the norm exactly'."""
    s = run_experiment("sigmoid", tmp_path / "s")["activations"]["sigmoid"]
    assert s["max_grad"] == 0.25 and s["argmax_x"] == pytest.approx(0, abs=1e-6)
    assert f"{s['grad_at_start']:.1e}" == "3.4e-04" and s["x_start"] == -8
    p = run_experiment("explode", tmp_path / "e", seed=0)["products"]
    assert 20.5 <= math.log10(p["normal(0,1)"]["max_abs_entry"]) < 21.5
    assert round(p["normal(0,1)"]["theory_log10_growth_per_factor"], 2) == 0.24
    assert round(p["normal(0,1)"]["log10_growth_per_factor"], 2) == 0.21
    assert p["xavier"]["final_log10_norm"] < -1
    assert p["orthogonal"]["final_log10_norm"] == pytest.approx(math.log10(2.0), abs=1e-12)  # ||Q||_F = 2


def test_monitor_lead_is_worded_by_its_sign():
    """`lab run monitor` prints how long before the loss turned non-finite the
    first alert came: 'earlier' only when it did come earlier."""
    from signalprop.lab.training_runs import _lead

    assert (_lead(18), _lead(0), _lead(-3), _lead(None)) == (" (18 steps earlier)", " (the same step)",
                                                              " (3 steps later)", "")
