"""sp.coord_check against the known answers of muP theory and against mup's own coord check.

Known answers (Yang & Hu 2021, "Tensor Programs IV", section 3 and the
abc-parametrization analysis; Yang et al. 2022, "Tensor Programs V", Table 3):

* standard parametrization (SP) trained with Adam at a fixed learning rate:
  every hidden weight's update moves its output by ~ lr * fan-in, so the
  output logits and the attention logits (with 1/sqrt(d)) grow with width
  after one step;
* muP (mup.MuReadout, mup.set_base_shapes, mup.MuAdam, attention 1/d) is
  width-stable;
* SP with SGD at a fixed learning rate, an MLP: the output layer's update
  ~ lr |x|^2 grows like width^1, a hidden layer's ~ lr * n^(-1/2) * n like
  width^(1/2) (back-propagated gradients are O(n^(-1/2)) through a read-out
  initialized at 1/sqrt(n)), the input layer's (fixed fan-in) like
  width^(-1/2): it stops learning;
* muP with SGD (mup.MuSGD, MuReadout) on the same MLP is width-stable.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop.lab.gpt import gpt, token_batch

mup = pytest.importorskip("mup")  # in the test extra: installed by `make test`, so this never skips there

# Few tokens: muP's attention logits are Theta(1) once the learned, coherent part
# of q.k (~ d / d) outweighs its random part (~ sqrt(d) / d); each query's update
# mixes every token of the batch, so at head dimensions 16-64 the batch must be
# small for the coherent part to dominate (2 x 8 tokens; 8 x 16 reads "shrinks").
GPT_DATA = token_batch(batch=2, seq=8, seed=0)
WIDTHS = [64, 128, 256]
LR_ADAM = 1e-2


def _gpt(parametrization):
    def make(width):
        return gpt(width, parametrization, seq=8)
    return make


def _adam(model):
    return torch.optim.Adam(model.parameters(), lr=LR_ADAM)


def _muadam(model):
    return mup.MuAdam(model.parameters(), lr=LR_ADAM)


@pytest.fixture(scope="module")
def sp_gpt():
    return sp.coord_check(_gpt("sp"), WIDTHS, GPT_DATA, _adam, steps=2, seeds=2)


@pytest.fixture(scope="module")
def mup_gpt():
    return sp.coord_check(_gpt("mup"), WIDTHS, GPT_DATA, _muadam, steps=2, seeds=2)


def test_sp_gpt_adam_logits_grow_after_one_step(sp_gpt):
    r = sp_gpt
    assert r.verdict == "grows"
    out = r.layer("", "logits")
    assert out.verdict == "grows"
    # at init SP's logits are O(1) (fan-in init of the read-out); after one Adam step they grow
    assert abs(out.slopes[0]) < 0.25 and out.slopes[1] > 0.25
    assert "MuReadout" in out.fix and out.leaves_range_at is not None
    for block in ("blocks.0", "blocks.1"):
        att = r.layer(f"{block}.attn.sdpa", "attention")
        assert att.verdict == "grows" and att.slopes[1] > 0.25, att
        assert "1/d instead of 1/sqrt(d)" in att.fix
        # every hidden weight's update grows ~ width (Adam: lr per entry, fan-in entries summed)
        upd = r.layer(f"{block}.fc", "update")
        assert upd.verdict == "grows" and upd.position == "hidden layer" and upd.slopes[1] > 0.5
        assert "1/fan-in" in upd.fix
    # the message names the layer and how far it can go
    assert r.problems[0].verdict == "grows" and r.problems[0].name in r.problems[0].message or \
        r.problems[0].name == ""
    assert "width ~" in out.message


def test_mup_gpt_is_width_stable(mup_gpt):
    r = mup_gpt
    bad = [x.message for x in r.problems]
    assert r.verdict == "width-stable", bad
    # not only "within noise": every fitted slope is small
    slopes = [b for x in r.layers for b in x.slopes if math.isfinite(b)]
    assert max(abs(b) for b in slopes) < 0.25
    # the zero-initialized read-out and query have no scale to fit at t = 0 (and are not judged there)
    assert math.isnan(r.layer("", "logits").slopes[0]) and math.isfinite(r.layer("", "logits").slopes[1])


def test_sp_and_mup_differ_where_theory_says(sp_gpt, mup_gpt):
    """The same architecture: the only differences are the parametrization's."""
    assert {(x.name, x.role) for x in sp_gpt.layers} == {(x.name, x.role) for x in mup_gpt.layers}
    grows_sp = {(x.name, x.role) for x in sp_gpt.problems}
    assert ("", "logits") in grows_sp and ("blocks.1.attn.sdpa", "attention") in grows_sp
    assert not mup_gpt.problems


def _mlp_sp(width):
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def _mlp_mup(width):
    def mk(n):
        return nn.Sequential(nn.Linear(16, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(), mup.MuReadout(n, 10))
    with torch.device("meta"):
        base, delta = mk(64), mk(128)
    model = mk(width)
    mup.set_base_shapes(model, base, delta=delta)
    return model


def _mlp_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 16, generator=g), torch.randint(0, 10, (32,), generator=g)


MLP_WIDTHS = [64, 128, 256, 512, 1024]


def test_mlp_sp_sgd_follows_tensor_programs():
    r = sp.coord_check(_mlp_sp, MLP_WIDTHS, _mlp_data(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                       steps=1, seeds=3)
    inp, hidden, readout = (r.layer(n, "update") for n in ("0", "2", "4"))
    assert (inp.position, hidden.position, readout.position) == ("input layer", "hidden layer", "output layer")
    # exponents -1/2, +1/2 (within 0.1: the seed error here is ~0.03) ...
    assert abs(inp.slopes[1] + 0.5) < 0.1 and abs(hidden.slopes[1] - 0.5) < 0.1
    # ... and 1 for the read-out, whose bias step (width-free) still weighs at width 64: the fit over
    # 64-1024 lies below 1 and the local slope between the two largest widths close to it
    assert readout.slopes[1] > 0.6
    mean = r.curve("4", "update", 1).mean
    assert math.log2(mean[-1] / mean[-2]) > 0.85
    assert (inp.verdict, hidden.verdict, readout.verdict) == ("shrinks", "grows", "grows")
    assert "proportional to width under SGD" in inp.fix
    assert r.verdict == "grows"


def test_mlp_mup_sgd_is_width_stable():
    r = sp.coord_check(_mlp_mup, MLP_WIDTHS, _mlp_data(), lambda m: mup.MuSGD(m.parameters(), lr=0.1),
                       steps=1, seeds=3)
    assert r.verdict == "width-stable", [x.message for x in r.problems]
    for name in ("0", "2", "4"):
        assert abs(r.layer(name, "update").slopes[1]) < 0.1


# ---- mup's own coord check as the oracle ------------------------------------

def _mup_frame(param, seed, nsteps):
    """mup.coord_check.get_coord_data on the same models: each lazily built under
    the seed signalprop uses, so both see the same weights and the same steps."""
    from mup.coord_check import get_coord_data

    def lazy(w):
        def build():
            torch.manual_seed(seed)
            return gpt(w, param, seq=8)
        return build

    with torch.random.fork_rng(devices=[]):
        # mup=True: its MuAdam, mup=False: torch's Adam, as our _muadam / _adam
        return get_coord_data({w: lazy(w) for w in WIDTHS}, [(GPT_DATA[0], GPT_DATA[1].reshape(-1))],
                              optimizer="adam", lr=LR_ADAM, mup=param == "mup", nsteps=nsteps,
                              flatten_output=True, cuda=False, show_progress=False)


@pytest.mark.parametrize("param", ["sp", "mup"])
def test_same_curves_as_mups_get_coord_data(param, sp_gpt, mup_gpt):
    ours = sp_gpt if param == "sp" else mup_gpt
    compared = 0
    for seed in ours.seeds:
        df = _mup_frame(param, seed, ours.steps + 1)
        for x in ours.layers:
            if x.role not in ("activation", "logits"):
                continue
            for t in range(ours.steps + 1):
                s = ours.curve(x.name, x.role, t)
                rows = df[(df.module == x.name) & (df.t == t + 1)].set_index("width").l1  # mup's t starts at 1
                theirs = np.array([rows[w] for w in WIDTHS])
                mine = np.array(s.values[s.seeds.index(seed)])
                # same weights, same data, same steps, float32 on one thread: equal to rounding
                np.testing.assert_allclose(mine, theirs, rtol=2e-5, atol=1e-7, err_msg=f"{x.name} t={t}")
                compared += 1
    assert compared >= 2 * 3 * 25  # seeds x readings x modules: the whole model, not a sample


# ---- the report, the record, the boundary -------------------------------------

def test_html_has_a_panel_per_layer_with_its_verdict(sp_gpt, tmp_path):
    path = sp_gpt.save_html(tmp_path / "coord.html")
    text = path.read_text()
    assert text.startswith("<!doctype html>") and "src='http" not in text and "<script" not in text  # self-contained
    # one log-log panel per layer and role, plus mup's overview figure: all embedded
    assert text.count("data:image/png;base64,") == len(sp_gpt.layers) + 1
    assert text.count(">grows</span>") == len(sp_gpt.problems) + 1  # each problem, and the title
    assert "1/d instead of 1/sqrt(d)" in text


def test_record_round_trips_to_json(sp_gpt):
    import json

    d = json.loads(sp_gpt.to_json())
    assert d["verdict"] == "grows" and d["widths"] == WIDTHS and d["steps"] == 2
    assert len(d["series"]) == len(sp_gpt.layers) * 3  # a curve per layer and reading t = 0, 1, 2
    row = d["series"][0]
    assert len(row["values"]) == 2 and len(row["values"][0]) == len(WIDTHS)
    assert d["thresholds"]["slope_tolerance"] == 0.25
    with pytest.raises(AttributeError):
        sp_gpt.layers[0].verdict = "width-stable"  # frozen


def test_global_rng_and_threads_left_as_found():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    sp.coord_check(_mlp_sp, [16, 32], _mlp_data(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), steps=1,
                   seeds=1, threads=1)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads


@pytest.mark.parametrize("kwargs, match", [
    ({"statistic": "max"}, r"statistic='max' is not one of \['l1', 'rms'\]"),
    ({"widths": [64]}, r"at least two different positive whole numbers, got \[64\]"),
    ({"widths": [0, 64]}, r"at least two different positive whole numbers"),
    ({"steps": 0}, r"steps must be a positive whole number, got 0"),
    ({"seeds": 0}, r"seeds must be a positive count or distinct whole numbers, got 0"),
    ({"data": torch.zeros(3)}, r"data must be an \(inputs, targets\) pair or a list of such pairs"),
])
def test_bad_arguments_name_the_value_and_the_choices(kwargs, match):
    args = {"widths": [16, 32], "data": _mlp_data(), "steps": 1, "seeds": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        sp.coord_check(_mlp_sp, args.pop("widths"), args.pop("data"),
                       lambda m: torch.optim.SGD(m.parameters(), lr=0.1), **args)
    with pytest.raises(ValueError, match=r"optimizer 'lion' is not one of \['sgd', 'adam'"):
        sp.width.optimizer("lion", 1e-3)


def test_the_verdict_rule_at_its_thresholds():
    from signalprop.width import judge

    assert judge.direction(0.24, 0.0) == 0 and judge.direction(0.26, 0.0) == 1 and judge.direction(-0.26, 0.0) == -1
    assert judge.direction(0.6, 0.31) == 0 and judge.direction(0.6, 0.29) == 1  # two standard errors from zero
    # a power law n^1 from width 64 leaves 10x of its width-64 value at width 640
    assert judge.leaves_range_at([64, 128], 1.0) == 640 and judge.leaves_range_at([64, 128], -0.5) == 6400
    b, se, n = judge.fit_slope([64, 128, 256], np.array([[1.0, 2.0, 4.0], [2.0, 4.0, 8.0]]))
    assert (b, se, n) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-12), 2)
    assert math.isnan(judge.fit_slope([64, 128], np.array([[0.0, 0.0]]))[0])  # zero: nothing to fit


def test_cli_coord_check_exit_codes(tmp_path, capsys):
    from signalprop.cli import main

    spec = "signalprop.lab.gpt:coord_model:batch=2,seq=8"
    common = ["--widths", "32,64,128", "--steps", "1", "--seeds", "1", "--lr", "0.01"]
    assert main(["coord-check", spec, *common, "--json", str(tmp_path / "c.json"),
                 "--html", str(tmp_path / "c.html")]) == 1
    out = capsys.readouterr().out
    assert "grows" in out and "fix:" in out and (tmp_path / "c.html").exists()
    assert main(["coord-check", spec + ",parametrization=mup", *common, "--optimizer", "mu-adam"]) == 0
    assert "width-stable" in capsys.readouterr().out
    assert main(["coord-check", "nosuchmodule:f", *common]) == 2
    assert main(["coord-check", spec, "--widths", "64"]) == 2
    assert "at least two different positive widths" in capsys.readouterr().err


class _TinyAttention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, width), nn.Linear(8, width), nn.Linear(8, width)
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        q, k, v = (f(x).unsqueeze(1) for f in (self.q, self.k, self.v))  # one head
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))


def test_attention_logits_are_the_softmaxs_own_inputs():
    """q.k^T times the call's scale over the query-key pairs the causal mask keeps, by hand."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 6, 8, generator=g), torch.randint(0, 4, (3, 6), generator=g)
    r = sp.coord_check(_TinyAttention, [8, 16], (x, y), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                       steps=1, seeds=[7])
    for j, w in enumerate([8, 16]):
        torch.manual_seed(7)
        m = _TinyAttention(w)
        with torch.no_grad():
            logits = (m.q(x) @ m.k(x).transpose(-2, -1)) * 0.3
        kept = logits[:, torch.ones(6, 6, dtype=torch.bool).tril()]
        assert r.curve("sdpa", "attention", 0).values[0][j] == pytest.approx(float(kept.square().mean().sqrt()),
                                                                            rel=1e-5)


def test_verdict_rules_on_known_power_laws():
    """summarize() on synthetic readings: exact power laws, two seeds (tiny seed noise)."""
    from signalprop.width import summarize
    from signalprop.width.measure import Cell

    widths, seeds = (64, 128, 256, 512), (0, 1)
    laws = {  # (name, role): exponent at t = 0 and at t = 1
        ("a", "activation"): (0.0, 0.0),
        ("b", "logits"): (-0.5, 0.0),  # o(1) at init only (muP's read-out): not judged
        ("c", "update"): (None, -0.5),  # shrinks after the step: stops learning
        ("d", "attention"): (1.0, 0.0),  # grows at init: judged
        ("e", "activation"): (0.0, "inf"),  # overflows at the largest width
    }

    def value(law, w, s):
        if law is None:
            return math.nan
        if law == "inf":
            return math.inf if w == widths[-1] else 1.0
        return (1 + 0.01 * s) * (w / 64) ** law

    cells = [Cell(w, s, {k: tuple(value(law, w, s) for law in v) for k, v in laws.items()}, {}, {}, "Adam")
             for s in seeds for w in widths]
    r = summarize(cells, widths, seeds, 1, "l1", "synthetic")
    got = {x.name: x.verdict for x in r.layers}
    assert got == {"a": "width-stable", "b": "width-stable", "c": "shrinks", "d": "grows", "e": "grows"}
    assert r.layer("c", "update").slope == pytest.approx(-0.5) and r.layer("c", "update").leaves_range_at == 6400
    assert "non-finite at width 512" in r.layer("e").message
    assert r.verdict == "grows" and [x.name for x in r.problems][:2] in (["d", "e"], ["e", "d"])
