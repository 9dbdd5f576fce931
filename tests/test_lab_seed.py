"""The seed's demonstrations, through the lab runner."""

import json
import math

import pytest

from signalprop.lab import experiments, run_experiment


def test_registry_lists_seed_demos():
    assert {"sigmoid", "explode"} <= set(experiments())


def test_sigmoid_demo(tmp_path):
    r = run_experiment("sigmoid", tmp_path)
    s = r["activations"]["sigmoid"]
    assert s["max_grad"] == pytest.approx(0.25, abs=1e-7) and abs(s["argmax_x"]) < 1e-6
    # sigma'(-8) = sigma(-8)(1 - sigma(-8))
    sig = 1 / (1 + math.exp(8))
    assert s["grad_at_start"] == pytest.approx(sig * (1 - sig), rel=1e-5)
    assert r["activations"]["tanh"]["max_grad"] == pytest.approx(1.0)
    assert (tmp_path / "sigmoid.png").stat().st_size > 1000
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["config"]["step"] == 0.1 and "torch" in cfg["environment"]


def test_explode_demo(tmp_path):
    r = run_experiment("explode", tmp_path, seed=0)["products"]
    assert 1e18 < r["normal(0,1)"]["max_abs_entry"] < 1e28  # the note's run: order 1e24-1e25
    assert abs(r["orthogonal"]["final_log10_norm"] - math.log10(2.0)) < 1e-9  # ||Q||_F = sqrt(4)
    assert r["xavier"]["final_log10_norm"] < 0  # variance matching still drifts
    # measured growth within 0.06 decades/factor of the Lyapunov exponent (100 factors, one seed)
    for k in ("normal(0,1)", "xavier"):
        assert abs(r[k]["log10_growth_per_factor"] - r[k]["theory_log10_growth_per_factor"]) < 0.06
    assert (tmp_path / "explode.png").exists()


def test_unknown_experiment_and_option(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        run_experiment("nope", tmp_path)
    with pytest.raises(ValueError, match=r"has no option\(s\) \['bogus'\]"):
        run_experiment("explode", tmp_path, bogus=1)
