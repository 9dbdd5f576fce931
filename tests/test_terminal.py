"""Every report signalprop prints fits the terminal's width: no line longer
than it, no name split across lines, the verdict whole; and the reports
render in notebooks."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.report.layout import fit_columns, shorten_name

WIDTHS = (80, 200)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.projection_in = nn.Linear(width, width)
        self.activation = nn.Sigmoid()
        self.projection_out = nn.Linear(width, width)

    def forward(self, x):
        return self.projection_out(self.activation(self.projection_in(x)))


def long_named_model(blocks=14, width=16):
    """42 rows named like ``encoder.blocks.13.projection_out`` (32 characters):
    a sigmoid stack whose gradient vanishes, so the verdict column says so."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(encoder=nn.Sequential(OrderedDict(
        blocks=nn.Sequential(*[Block(width) for _ in range(blocks)])))))


def _fits(text, width):
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, max(lines, key=len)
    return lines


@pytest.mark.parametrize("width", WIDTHS)
def test_check_report_fits_the_width_with_whole_names_and_verdicts(width, monkeypatch):
    report = sp.check(long_named_model(), torch.randn(32, 16, generator=torch.Generator().manual_seed(1)))
    assert len(report.layers) == 42 and report.summary.theory
    monkeypatch.setenv("COLUMNS", str(width))
    lines = _fits(str(report), width)
    first = next(i for i, line in enumerate(lines) if line.split()[:1] == ["0"])
    table = lines[first:first + len(report.layers)]
    for layer, line in zip(report.layers, table):  # one line per row: no name or verdict wrapped onto a second
        cells = line.split()
        assert cells[0] == str(layer.index) and cells[1] == layer.name and cells[-1] == layer.verdict, line
    assert "vanishing" in {layer.verdict for layer in report.layers}
    shown = table[0].split()
    if width == 80:  # what gave way is said, and the essential columns stayed
        assert "theory" not in lines[first - 2] and "not shown at 80 columns: E[y^2] theory" in " ".join(lines)
        assert len(shown) >= 4
    else:
        assert lines[first - 2].split().count("theory") == 2 and "not shown" not in str(report)


def test_names_too_long_for_any_layout_are_abbreviated_not_split(monkeypatch):
    report = sp.check(long_named_model(blocks=2), torch.randn(32, 16))
    monkeypatch.setenv("COLUMNS", "40")
    lines = _fits(str(report), 40)
    rows = [line for line in lines if line.split()[:1] == ["5"]]
    assert rows and rows[0].split()[1].startswith("e.b.1.pro"), rows  # the block number kept
    assert "names abbreviated" in " ".join(lines)
    assert shorten_name("model.layers.11.self_attn.q_proj", 15) == "m.l.11.s.q_proj"
    assert fit_columns([5, 30, 10], 40, drop=[2], shorten=1).dropped == (2,)


def _diverging_monitor():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        [("input_projection_layer", nn.Linear(16, 64)), ("first_nonlinearity", nn.Tanh()),
         ("hidden_projection_layer", nn.Linear(64, 64)), ("second_nonlinearity", nn.Tanh()),
         ("classifier_head", nn.Linear(64, 4))]))
    opt = torch.optim.SGD(model.parameters(), lr=3.0, momentum=0.9)  # large enough for alerts
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    with sp.monitor(model, every=5) as mon:
        for _ in range(20):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    return mon.report()


@pytest.fixture(scope="module")
def monitor_report():
    return _diverging_monitor()


@pytest.mark.parametrize("width", WIDTHS)
def test_monitor_report_fits_the_width(width, monitor_report, monkeypatch):
    assert monitor_report.alerts and max(len(a.message) + len(a.suggestion) for a in monitor_report.alerts) > 120
    monkeypatch.setenv("COLUMNS", str(width))
    text = str(monitor_report)
    lines = _fits(text, width)
    for a in monitor_report.alerts:  # the heading of each alert holds its step, kind and module, whole
        assert any(line.startswith(f"step {a.step}  {a.kind}") and line.split()[-1] == a.layer for line in lines)
    for h in monitor_report.history:
        assert any(line.split()[:1] == [str(h.step)] and h.verdict in line.split() for line in lines)


@pytest.mark.parametrize("width", WIDTHS)
def test_init_summaries_fit_the_width(width, monkeypatch):
    model = long_named_model(blocks=3)
    monkeypatch.setenv("COLUMNS", str(width))
    for summary in (sp.init.critical_(model, torch.randn(64, 16)),
                    sp.init.apply_(model, "xavier_normal", activation="sigmoid")):
        lines = _fits(str(summary), width)
        tokens = {t.strip(",") for line in lines for t in line.split()}
        for p in summary.params:
            assert p.name in tokens, p.name
        for layer in summary.layers:
            assert layer.name in tokens, layer.name


def test_reports_render_in_notebooks(monitor_report):
    report = sp.check(long_named_model(blocks=2), torch.randn(8, 16))
    html = report._repr_html_()
    assert html.startswith("<div") and "Sequential" in html and "encoder.blocks.1.projection_out" in html
    html = monitor_report._repr_html_()
    assert html.startswith("<div") and "<html" not in html
    assert "signalprop monitor: Sequential" in html and "hidden_projection_layer" in html


def test_cli_tables_fit_the_width(capsys, monkeypatch):
    from signalprop.cli import main
    from signalprop.lab import experiments

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["lab", "list"]) == 0
    lines = _fits(capsys.readouterr().out, 80)
    assert {line.split()[0] for line in lines if line.strip()} >= set(experiments())  # each name whole, first
    assert main(["theory", "silu"]) == 0
    _fits(capsys.readouterr().out, 80)
