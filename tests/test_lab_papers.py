"""The classic papers' claims, each tested at small scale (the lab runs them larger)."""

from __future__ import annotations

import json
import math

import pytest

from signalprop.cli import main
from signalprop.lab import papers as P
from signalprop.lab import run_experiment


def test_glorot2010_quick_run_normalized_init_is_much_flatter_not_level(tmp_path):
    """`lab run glorot2010 --quick` (width 256), read from its results.json:
    from the last hidden layer down to the first the gradient std shrinks
    11.7x (tanh) and 21.9x (softsign) with the standard init, 1.7x and 3.8x
    with the normalized one (measured).  So 'much flatter' (>= 3x smaller a
    drop), 'not level' (> 1.25x), softsign less flat than tanh -- and the
    printed reading says exactly that."""
    res = run_experiment("glorot2010", tmp_path, quick=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    drop = saved["gradient_drop"]
    for act in ("tanh", "softsign"):
        assert drop[act]["standard"] > 8, drop  # standard: shrinks toward the input, as the paper says
        assert drop[act]["standard"] >= P.GLOROT_MUCH * drop[act]["normalized"] > P.GLOROT_MUCH * P.GLOROT_LEVEL
        line = next(r for r in saved["reading"] if r.startswith(act + ":"))
        assert "much flatter than with the standard init, not level" in line and "this run: " + line in res["headline"]
    assert drop["softsign"]["normalized"] > drop["tanh"]["normalized"]


def test_glorot2010_reading_is_no_stronger_than_its_numbers():
    acts = [0.4, 0.3]
    words = {(20.0, 1.1): "about level", (20.0, 2.0): "much flatter than with the standard init, not level",
             (4.0, 2.0): "flatter than with the standard init, not level",
             (2.0, 2.0): "not flatter than with the standard init"}
    for (std, norm), want in words.items():
        assert want + ";" in P._glorot_reading("tanh", {"standard": std, "normalized": norm}, acts, acts)


def test_he2015_quick_run_xavier_stalls_and_kaiming_trains(tmp_path):
    """`lab run he2015 --quick` (200 steps), read from its results.json: chance
    is ln 10 = 2.303; Xavier's 30-layer ReLU net stays there (its gradient is
    2.8e-5 of the output's at the first layer: `vanishing`), Kaiming's falls
    far below it (measured 0.34, test 72.8%; the full 600-step run: 0.006)."""
    run_experiment("he2015", tmp_path, quick=True)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    xavier, kaiming = runs["xavier_normal"], runs["kaiming_normal"]
    assert abs(xavier["final_loss"] - math.log(10)) < 0.05 and xavier["verdict_at_init"] == "vanishing"
    assert kaiming["final_loss"] < 1.2 and kaiming["verdict_at_init"] == "healthy"


@pytest.mark.slow
def test_xiao2018_quick_run_critical_trains_further_than_kaiming(tmp_path):
    """`lab run xiao2018 --quick` (depth 100, 100 Adam steps; ~40 s): at this
    depth Kaiming's tanh CNN still moves a little (measured loss 2.21, test
    17.4%), the critical one much further (1.81, 42.1%); the README's
    1,000-layer claims are checked against the kept run in test_lab_claims."""
    run_experiment("xiao2018", tmp_path, quick=True)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    critical, kaiming = runs["critical"], runs["kaiming_normal"]
    assert critical["verdict_at_init"] == "healthy"
    assert critical["final_loss"] < kaiming["final_loss"] - 0.2 and critical["test_acc"] > kaiming["test_acc"] + 0.1


def test_saxe2014_orthogonal_learning_time_is_flat_from_depth_8_gaussian_grows():
    """Step lr / depth.  Measured: 535 steps at depth 2, then 1294, 1189,
    1373 at depths 8, 16, 32 (flat: longest/shortest 1.15 <= 1.2, the
    lab's "flat"), 2.4x depth 2's at depth 8; Gaussian at depth 16 not
    within 4,000 steps (here 2,000)."""
    cfg = P.SaxeConfig(max_steps=2000)
    two = P.saxe_learning_time(cfg, 2, "orthogonal")
    ortho = [P.saxe_learning_time(cfg, d, "orthogonal") for d in (8, 16, 32)]
    assert all(t is not None for t in ortho) and max(ortho) <= P.SAXE_FLAT * min(ortho), ortho
    assert two is not None and ortho[0] > 2 * two
    gauss16 = P.saxe_learning_time(cfg, 16, "gaussian")
    assert gauss16 is None or gauss16 > 1.5 * ortho[1]


@pytest.mark.slow
def test_saxe2014_quick_run_reads_flat_from_depth_8_with_the_step_scaled(tmp_path):
    """`lab run saxe2014 --quick` (depths 2, 8, 32; ~30 s), read from its
    results.json: the flat range the reading states starts at depth 8 and
    its times are within 20% (measured 1294, 1373); the reading names the
    lr / depth scaling; Gaussian not within 4,000 steps at depths 8 and 32."""
    res = run_experiment("saxe2014", tmp_path, quick=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    t = dict(zip(saved["depths"], saved["learning_time"]["orthogonal"]))
    assert saved["flat_from_depth"] == 8 and max(t[8], t[32]) <= P.SAXE_FLAT * min(t[8], t[32])
    assert t[8] > 2 * t[2]
    assert saved["learning_time"]["gaussian"][1:] == [None, None]
    assert "step scaled as lr / depth (lr = 0.05)" in saved["reading"][0] and "flat from depth 8 to 32" in \
        saved["reading"][0] and "this run: " + saved["reading"][0] in res["headline"]


def test_saxe2014_flat_range_is_no_wider_than_its_numbers():
    assert P._flat_from((2, 8, 32), [535, 1294, 1373]) == 8
    assert P._flat_from((2, 8, 32), [1000, 1100, 1150]) == 2
    assert P._flat_from((2, 8, 32), [500, 1000, 2000]) is None
    assert P._flat_from((2, 8, 32), [500, None, 1000]) is None


def test_pennington2017_orthogonal_tanh_is_near_isometric_and_matches_free_probability():
    cfg = P.PenningtonConfig(width=200, seeds=1)  # one network (the lab pools 16)
    for depth in (2, 8, 32):
        r = P.jacobian_sq_singular_values(cfg, "tanh", "orthogonal", depth)
        # width 200: sample mean and variance of 200 eigenvalues; within 10% / 20% of the wide limit
        assert r["measured_mean"] == pytest.approx(r["theory_mean"], rel=0.1)
        assert r["measured_variance"] == pytest.approx(r["theory_variance"], rel=0.2)
    tanh_g = P.jacobian_sq_singular_values(cfg, "tanh", "gaussian", 8)["measured_variance"]
    relu_o = P.jacobian_sq_singular_values(cfg, "relu", "orthogonal", 8)["measured_variance"]
    tanh_o = P.jacobian_sq_singular_values(cfg, "tanh", "orthogonal", 8)["measured_variance"]
    assert tanh_o < 0.1 < 1 < tanh_g and relu_o > 1  # orthogonal tanh alone is near-isometric


def test_pennington2017_pooled_spread_grows_linearly_with_depth():
    """Pennington et al.: the variance of J J^T's eigenvalues grows as
    L (mu2 / mu1^2 - 1) (+ L for Gaussian weights).  Pooled over 8 networks of
    width 300 (seeds 0-7), for orthogonal and Gaussian tanh and ReLU: at depth 4
    within 25% of that (measured 0.90-1.16 of it over five blocks of 8 seeds),
    and from depth 4 to 16 the variance grows 2.5-6 fold -- linear growth is 4
    (measured 3.2-4.8), constant 1, quadratic 16.  Gaussian tanh at depth 32,
    whose heavy tail one network misses (the single-network run measured 11.2
    against 32.1): within 40% (measured 1.04-1.36 of it)."""
    cfg = P.PenningtonConfig(width=300, seeds=8)
    for act in ("tanh", "relu"):
        for weights in ("orthogonal", "gaussian"):
            v4, v16 = (P.jacobian_sq_singular_values(cfg, act, weights, d) for d in (4, 16))
            assert v4["networks"] == 8 and len(v4["values"]) == 8 * 300
            assert v4["measured_variance"] == pytest.approx(v4["theory_variance"], rel=0.25), (act, weights)
            assert 2.5 < v16["measured_variance"] / v4["measured_variance"] < 6.0, (act, weights)
    deep = P.jacobian_sq_singular_values(cfg, "tanh", "gaussian", 32)
    assert deep["measured_variance"] == pytest.approx(deep["theory_variance"], rel=0.4)


@pytest.mark.parametrize("name", ["glorot2010", "pennington2017"])
def test_paper_experiments_run_from_the_cli(tmp_path, name, capsys):
    assert main(["lab", "run", name, "--quick", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["paper"] and (tmp_path / r["figure"]).stat().st_size > 10000
    assert r["paper"][:20] in capsys.readouterr().out.replace("\n", " ")


def test_xiao2018_mechanism_at_depth_300_critical_delta_orthogonal_vs_kaiming():
    """The lab trains 1,000 layers (minutes); here the reason it works, at depth 300:
    Kaiming's variance puts a tanh CNN in the chaotic phase (gradients grow
    1.3e5x back to the input), delta-orthogonal kernels on the critical line keep them within
    4.6x (measured; asserted: over 1e3x, and between 0.1x and 10x)."""
    import torch
    from torch import nn

    import signalprop as sp
    from signalprop.lab.datasets import digits
    from signalprop.lab.models import SmallCNN

    data = digits(0)
    verdicts = {}
    for init in ("kaiming_normal", "critical"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), SmallCNN(300, 16, "tanh", 1, 10))
        g = torch.Generator().manual_seed(0)
        if init == "critical":
            s = sp.init.critical_(m, data.x_train[:256], generator=g)
            assert all(p.distribution.startswith("delta_orthogonal") for p in s.params[1:-1])
        else:
            sp.init.apply_(m, init, generator=g)
        r = sp.check(m, data.x_train[:64])
        verdicts[init] = (r.verdict, r.summary.first_last_grad_ratio)
    assert verdicts["kaiming_normal"][0] == "exploding" and verdicts["kaiming_normal"][1] > 1e3
    assert verdicts["critical"][0] == "healthy" and 0.1 < verdicts["critical"][1] < 10


def test_pennington2017_free_probability_density_matches_the_measured_spectrum():
    """The density of J J^T's eigenvalues from free probability against one
    width-300 network's eigenvalues: the largest gap between the two
    cumulative distributions (a Kolmogorov-Smirnov distance) under 0.1 -- 300
    eigenvalues of one matrix are strongly correlated (they repel), so they
    sit much closer to the limit than 300 independent draws would (whose 5%
    critical distance is 0.08)."""
    import numpy as np

    from signalprop import theory

    cfg = P.PenningtonConfig(width=300, seeds=1)  # one network's eigenvalues, as the docstring says
    # Gaussian at depth 32: most of the mass is spread over 12 decades and 43% lies below 1e-12
    # (Fuss-Catalan-like); the solver must start beyond the right edge, ~e (L + 1) times the mean
    for act, weights, depth in (("tanh", "orthogonal", 8), ("tanh", "gaussian", 2), ("relu", "gaussian", 2),
                                ("tanh", "gaussian", 32)):
        r = P.jacobian_sq_singular_values(cfg, act, weights, depth)
        vals = np.sort(np.array(r["values"]))
        pos = vals[vals > 1e-12]
        grid = np.geomspace(pos.min() / 2, pos.max() * 1.12, 3000)  # the figure's range: 0.05 decade past the top
        dens = theory.jacobian_density(act, r["sigma_w2"], r["sigma_b2"], depth, grid, weights)
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))])
        atom = 1.0 - cdf[-1]  # ReLU's zero eigenvalues are a point mass, not in the density
        model = atom + cdf
        empirical = np.searchsorted(vals, grid, side="right") / vals.size
        assert float(np.max(np.abs(model - empirical))) < 0.1, (act, weights, depth)
        if act == "tanh" and weights == "orthogonal":
            assert cdf[-1] == pytest.approx(1.0, abs=0.01)  # no point mass: all of it is in the density
