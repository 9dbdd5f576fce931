"""schoenholz2017: networks deeper than ~6 xi_c do not train; at the critical sigma_w^2 they do."""

import json

from signalprop.cli import main
from signalprop.lab import experiments
from signalprop.lab.schoenholz import QUICK, SchoenholzConfig, trainable_depths
from signalprop.theory import depth_scales


def test_quick_grid_shows_the_boundary(tmp_path):
    assert "schoenholz2017" in experiments()
    out = tmp_path / "s"
    assert main(["lab", "run", "schoenholz2017", "--quick", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    cfg = SchoenholzConfig(**QUICK)
    assert [c["depth"] for c in r["cells"]] == [d for _ in cfg.sigma_w2s for d in cfg.depths]
    # the theory line is signalprop.theory's: 6 xi_c = 21.8 (sigma_w^2 = 1), 41.9 (4), ~3e4 (critical 1.76)
    for w in cfg.sigma_w2s:
        assert r["xi_c"][str(w)] == depth_scales("tanh", w, 0.05)[1]
    trained = trainable_depths(cfg, r["cells"])
    # depth 48 lies beyond 6 xi_c off criticality: it does not train there (measured 17% and 13% test
    # accuracy, chance 10%), it does at the critical sigma_w^2 (84%); depth 8 (< 6 xi_c) trains everywhere (>= 88%)
    assert trained == {1.0: 8, 1.76: 48, 4.0: 8}
    for c in r["cells"]:
        beyond = c["depth"] > 6 * r["xi_c"][str(c["sigma_w2"])]
        assert (c["test_acc"] < cfg.trained_acc) == beyond, c
    assert (out / "schoenholz2017.png").stat().st_size > 10_000
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 0
