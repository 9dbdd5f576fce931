"""The interactive HTML reports' figures, read from the plotly JSON they embed:
what is drawn, where, and what hovering shows.  tests/test_html_browser.py
renders the same pages in Chromium."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import signalprop as sp
from _html_models import relu_run, trend_only_report
from signalprop.probe.diagnose import _median_trend
from signalprop.report import plotly_page
from signalprop.report.check_plot import check_figure
from signalprop.report.monitor_plot import monitor_figure
from signalprop.report.row_groups import blocks, median_trend, row_labels, row_series


@pytest.fixture(scope="module")
def trend_report():
    return trend_only_report()


@pytest.fixture(scope="module")
def relu_report():
    return relu_run()


def _traces(fig, prefix=""):
    return [t for t in fig.data if (t.name or "").startswith(prefix)]


def _figure_json(page: str) -> list[dict]:
    return [json.loads(m.replace("<\\/", "</")) for m in
            re.findall(r"<script type='application/json' id='sp-figure-\d+-json'>(.*?)</script>", page, re.S)]


def test_median_trend_is_the_rules():
    """The trend drawn is the one check's rule judged: equal to diagnose's on random series."""
    rng = random.Random(0)
    for n in range(2, 30):
        v = [math.exp(rng.gauss(0, 3)) for _ in range(n)]
        assert median_trend(v) == pytest.approx(_median_trend(v), rel=1e-12)


def test_trend_drawn_where_only_the_trend_decides(trend_report):
    """Every block row is vanishing by the depth trend, inside the healthy band:
    the figure draws the band and, in red, the trends that passed the limit."""
    r = trend_report
    lo, hi = r.summary.bounds
    assert r.verdict == "vanishing"
    assert all(lo < x.relative_grad_rms < hi for x in r.layers)  # the band alone would say healthy
    fig = check_figure(r)
    band = [s for s in fig.layout.shapes if s.name and s.name.startswith("healthy band")]
    assert len(band) == 1 and (band[0].y0, band[0].y1) == (lo, hi) and band[0].yref == "y"
    trends = _traces(fig, "depth trend")
    assert trends
    red = [t for t in trends if t.line.color == "#cf222e"]
    # the forward trend (E[y^2] falls ~1e5x over 12 blocks against a 1e4x limit) is past the limit in both roles
    forward_red = [t for t in red if t.yaxis == "y2"]
    assert len(forward_red) == 2
    for t in forward_red:
        assert set(t.x) <= {f"blocks.{i}.fc" for i in range(12)} | {f"blocks.{i}.act" for i in range(12)}
        assert "past the limit: vanishing" in t.hovertext[0]
        assert float(t.y[0]) / float(t.y[-1]) > r.summary.trend_limit ** 2
    assert sum(t.showlegend for t in trends) == 2  # one legend entry per panel, not one per role


def test_series_and_theory_never_mix_kinds_of_rows(trend_report):
    """No sawtooth: each line joins rows of one kind only; theory is drawn per
    series and only on rows that have a prediction."""
    r = trend_report
    fig = check_figure(r)
    labels = dict(zip(row_labels(r.layers), r.layers))
    for axis in ("y", "y2"):  # the gradient and the forward panel: one line per module position across blocks
        (fc,) = [t for t in _traces(fig, "blocks.#.fc (Linear)") if t.yaxis == axis]
        (act,) = [t for t in _traces(fig, "blocks.#.act (Tanh)") if t.yaxis == axis]
        (rest,) = [t for t in _traces(fig, "other rows") if t.yaxis == axis]
        assert list(fc.x) == [f"blocks.{i}.fc" for i in range(12)] and fc.mode == "lines+markers"
        assert list(act.x) == [f"blocks.{i}.act" for i in range(12)]
        assert list(rest.x) == ["stem", "head"] and rest.mode == "markers"  # not a sequence: not joined
    assert {t.showlegend for t in _traces(fig, "blocks.#.fc")} == {True, False}  # named once, toggles both panels
    theory = _traces(fig, "theory (")
    assert theory
    for t in theory:
        assert all((labels[x].predicted_grad_rms if t.yaxis == "y" else labels[x].predicted_second_moment)
                   is not None for x in t.x)
        assert t.line.dash == "dash" if t.mode == "lines" else t.marker.symbol == "line-ew-open"


def test_rows_by_module_name_with_every_value_on_hover(trend_report):
    r = trend_report
    fig = check_figure(r)
    assert list(fig.layout.xaxis.categoryarray) == [x.name for x in r.layers]
    assert fig.layout.xaxis.type == "category"
    hovers = [h for t in fig.data if t.yaxis == "y" and t.name in ("blocks.#.fc (Linear)", "blocks.#.act (Tanh)",
                                                                     "other rows") for h in t.hovertext]
    for x in r.layers:
        mine = [h for h in hovers if h.startswith(f"<b>{x.name}</b> · {x.kind}")]
        assert mine, x.name
        assert f"E[y²]: {x.forward_second_moment:.3g}" in mine[0]
        assert f"gradient RMS / output's: {x.relative_grad_rms:.3g}" in mine[0]
        assert f"verdict: <b>{x.verdict}</b>" in mine[0]
    # blocks grouped: one label per block above the figure, every other block shaded
    names = [a.text for a in fig.layout.annotations]
    assert names == [f"blocks.{i}" for i in range(12)]
    assert blocks(r.layers)[0] == ("blocks.0", 1, 2)


def test_legends_sit_outside_the_data(trend_report, relu_report):
    for fig in (check_figure(trend_report), monitor_figure(relu_report)):
        legends = [k for k in fig.layout.to_plotly_json() if k.startswith("legend")]
        assert legends
        for k in legends:
            assert fig.layout[k].x > 1 and fig.layout[k].xanchor == "left"  # right of every plot area


def test_block_grouping_and_labels():
    class Row:
        def __init__(self, name, role=""):
            self.name, self.role = name, role
            self.activation = self.param_grad_rms = None

    plain = [Row(str(i)) for i in range(6)]
    assert blocks(plain) == []  # a Sequential's children are single modules
    nested = [Row(n) for n in ("embed", "layer.0.attn", "layer.0.mlp", "layer.1.attn", "layer.1.mlp", "out")]
    assert blocks(nested) == [("layer.0", 1, 2), ("layer.1", 3, 4)]
    assert row_labels([Row("a"), Row("b"), Row("a"), Row("")]) == ["a", "b", "a (call 2)", "(root)"]
    # a plain Sequential's repeated children: named by class, with the shape where two roles share one
    seq = [Row(str(i), ("#|Linear|8x8" if i % 2 else "#|Linear|4x8") if i < 6 else "#|ReLU|8") for i in range(9)]
    assert [(n, len(rows), joined) for n, rows, joined in row_series(seq)] == [
        ("Linear rows (4x8)", 3, True), ("Linear rows (8x8)", 3, True), ("ReLU rows", 3, True)]
    # a position seen twice is no series: its rows are points
    few = [Row("a.0.fc", "a.#.fc|Linear|"), Row("a.1.fc", "a.#.fc|Linear|")] + seq[6:]
    assert [(n, len(rows), joined) for n, rows, joined in row_series(few)] == [
        ("ReLU rows", 3, True), ("other rows", 2, False)]


def test_share_panel_only_where_measured():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fig = check_figure(sp.check(m, torch.randn(16, 8)))
    assert "yaxis3" not in fig.layout.to_plotly_json()  # no activation: no share panel
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    fig = check_figure(sp.check(m, torch.randn(64, 8)))
    assert fig.layout.yaxis3.title.text.startswith("share")
    assert [t.name for t in fig.data if t.yaxis == "y3"] == ["dead units"]


def test_monitor_panels_are_the_models_quantities(relu_report):
    """A ReLU model: a dead-units panel, no saturated-share panel; layers named by module."""
    r = relu_report
    fig = monitor_figure(r)
    titles = [fig.layout[k].title.text for k in fig.layout.to_plotly_json() if k.startswith("yaxis")]
    assert "dead units (%)" in titles and not any("saturated" in t for t in titles)
    layer_names = {t.name for t in fig.data if t.legendgroup}
    assert layer_names == {x.name for x in r.history[0].layers}
    dead = [t for t in fig.data if t.yaxis == f"y{titles.index('dead units (%)') + 1}"]
    assert {t.name for t in dead} == {x.name for x in r.history[0].layers if x.kind == "ReLU"}


def test_monitor_series_drawn_without_gaps(relu_report):
    """The gradient norm is recorded on some steps only: every recorded value is
    a point, the line has no None to break it, and the legend says how many."""
    r = relu_report
    fig = monitor_figure(r)
    (gn,) = _traces(fig, "gradient norm")
    recorded = [(s, v) for s, v in zip(r.steps, r.grad_norms) if v is not None and math.isfinite(v)]
    assert list(gn.x) == [s for s, _ in recorded] and None not in gn.y
    if len(recorded) < len(r.steps):
        assert f"({sum(v is not None for v in r.grad_norms)} of {len(r.steps)} steps)" in gn.name
    for t in fig.data:
        assert t.y is None or None not in t.y, t.name
        assert t.mode is None or "markers" in t.mode or len(t.x) > 1  # a lone point is visible


def test_monitor_alerts_on_the_timeline(relu_report):
    r = relu_report
    assert r.alerts
    fig = monitor_figure(r)
    alerts = _traces(fig, "alert: ")
    assert sum(len(t.x) for t in alerts) == len(r.alerts)
    text = " ".join(h for t in alerts for h in t.hovertext)
    for a in r.alerts:
        assert f"step {a.step}: {a.kind}" in text
        assert a.message.split()[0] in text and "fix:" in text
    assert {t.xaxis for t in alerts} == {None}  # on the loss panel (x1)
    steps = {s.x0 for s in fig.layout.shapes if s.type == "line" and s.yref == "paper"}
    assert steps == {a.step for a in r.alerts}


def test_pages_are_self_contained_and_small(tmp_path, trend_report, relu_report):
    """No network: no <script src>, no http(s) reference loaded by the page;
    plotly.js embedded exactly once (compressed: under 2.5 MB with it)."""
    for rec in (trend_report, relu_report):
        page = rec.save_html(tmp_path / "p.html").read_text()
        assert "<script src" not in page and not re.search(r"src=['\"]https?:", page)
        assert page.count("id='sp-plotlyjs-") == 1
        assert len(page.encode()) < 2.5e6
        (spec,) = _figure_json(page)
        assert spec["data"] and spec["layout"]["height"] > 300


def test_notebook_fragments_carry_plotly_once(monkeypatch, trend_report, relu_report):
    monkeypatch.setattr(plotly_page, "_sent_to_notebook", False)
    first = trend_report._repr_html_()
    second = relu_report._repr_html_()
    assert first.startswith("<div") and "<html" not in first
    assert "id='sp-plotlyjs-" in first and "id='sp-plotlyjs-" not in second
    assert "window.signalpropPlotly.then" in second  # draws with the library the first cell loaded
    ids = re.findall(r"id='(sp-figure-\d+)'", first + second)
    assert len(ids) == len(set(ids)) == 2  # two reports on one notebook page never share an id


def test_json_cannot_end_its_script_early(tmp_path):
    """A module named with "</script>" must not break the page."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("x</script><script>alert(1)</script>", nn.Linear(4, 4))

        def forward(self, x):
            return next(iter(self.children()))(x)

    r = sp.check(Odd(), torch.randn(8, 4))
    page = r.save_html(tmp_path / "odd.html").read_text()
    assert "<script>alert(1)" not in page
    (spec,) = _figure_json(page)
    assert spec["layout"]["xaxis"]["categoryarray"] == [r.layers[0].name]  # the name itself, read back whole
    assert any("x&lt;/script&gt;" in h for t in spec["data"] for h in (t.get("hovertext") or []))


def test_report_does_not_touch_the_callers_matplotlib():
    """Saving a report must leave a user's matplotlib backend (here svg) and
    pyplot's open figures as they were."""
    code = ("import matplotlib, torch, signalprop as sp\n"
            "import matplotlib.pyplot as plt\n"
            "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())\n"
            "sp.check(m, torch.randn(4, 8)).save_html('r.html')\n"
            "print(matplotlib.get_backend(), len(plt.get_fignums()))\n")
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.environ.get("TMPDIR", "/tmp"), check=True).stdout.split()
    assert out == ["svg", "0"]


def test_monitor_band_is_the_monitors(relu_report):
    """The band drawn is the one the monitor judged with (monitor(bounds=...))."""
    import dataclasses

    fig = monitor_figure(dataclasses.replace(relu_report, bounds=(1e-4, 10.0)))
    (band,) = [s for s in fig.layout.shapes if s.name and s.name.startswith("healthy band")]
    assert (band.y0, band.y1) == (1e-4, 10.0)
    assert relu_report.bounds == (1e-6, 1e3)  # what the run used: the default
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    with sp.monitor(m, every=1, bounds=(1e-4, 10.0)) as mon:
        loss = m(torch.randn(8, 4)).square().mean()
        loss.backward()
        mon.step(loss)
    assert mon.report().bounds == (1e-4, 10.0) and mon.report().to_dict()["bounds"] == [1e-4, 10.0]
