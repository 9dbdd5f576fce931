"""The HTML reports in a real browser engine: headless Chromium opens each page
from disk (no network), inflates the embedded plotly.js, draws the figures,
and a probe script added to a copy of the page hovers points through
plotly's own ``Fx.hover`` and writes what the hover label shows -- with every
error the page raised (``window.onerror``, rejected promises,
``console.error``) -- into the DOM, which ``--dump-dom`` hands back.  A
screenshot must show the figure's own colours, not just text.

``SIGNALPROP_SCREENSHOTS=docs/img pytest tests/test_html_browser.py`` also
writes the screenshots the README shows (check-report.png, monitor-report.png).

``make test`` installs Chromium (Debian: apt-get install chromium) when it can.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from _html_models import relu_run, trend_only_report
from signalprop.report.monitor_plot import GRAD_NORM_COLOUR, monitor_figure

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")
# virtual time: the page's timers and promises run to completion before the DOM is dumped
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=30000",
         "--enable-logging=stderr", "--v=0"]

_CATCH = """<script>window.__sp = {errors: []};
window.addEventListener("error", function(e){ __sp.errors.push("error: " + e.message); });
window.addEventListener("unhandledrejection", function(e){ __sp.errors.push("rejection: " + e.reason); });
(function(){ var ce = console.error; console.error = function(){ __sp.errors.push("console.error: " +
  Array.prototype.join.call(arguments, " ")); return ce.apply(console, arguments); }; })();</script>"""

_PROBE = """<script>(async function(){
var result = {figures: 0, drawn: 0, hovers: [], errors: window.__sp.errors};
try {
  var P = await window.signalpropPlotly;
  var divs = Array.from(document.querySelectorAll(".sp-figure"));
  result.figures = divs.length;
  for (var i = 0; i < 300 && divs.some(function(d){ return !d.dataset.drawn; }); i++)
    await new Promise(function(r){ setTimeout(r, 50); });
  result.drawn = divs.filter(function(d){ return d.dataset.drawn; }).length;
  var div = divs[0];
  var HOVER = %s, KEEP = %s;
  for (var h of HOVER) {
    var c = div.data.findIndex(function(t){ return t.name === h[0]; });
    if (c < 0) { result.hovers.push("no trace " + h[0]); continue; }
    var t = div.data[c];
    P.Fx.hover(div, [{curveNumber: c, pointNumber: h[1]}], (t.xaxis || "x") + (t.yaxis || "y"));
    var layer = div.querySelector(".hoverlayer");
    result.hovers.push(layer ? layer.textContent : "");
    if (!KEEP || h !== HOVER[HOVER.length - 1]) P.Fx.unhover(div);
  }
} catch (e) { result.errors.push("probe: " + e); }
var out = document.createElement("pre"); out.id = "sp-probe"; out.textContent = JSON.stringify(result);
document.body.appendChild(out);
})();</script>"""


def _probed(page: Path, hovers: list[tuple[str, int]], tmp_path: Path, keep_last: bool = False) -> Path:
    """A copy of ``page`` with the probe: it hovers (trace name, point number)
    in turn, leaving the last label shown when ``keep_last`` (a screenshot)."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("<head>", "<head>" + _CATCH, 1).replace(
        "</body>", _PROBE % (json.dumps(hovers), json.dumps(keep_last)) + "</body>", 1))
    return probed


def _probe(page: Path, hovers: list[tuple[str, int]], tmp_path: Path) -> tuple[dict, str]:
    """Open a copy of ``page`` with the probe; its findings and Chromium's log."""
    probed = _probed(page, hovers, tmp_path)
    run = subprocess.run([BROWSER, *FLAGS, "--dump-dom", probed.as_uri()], capture_output=True, text=True,
                         timeout=180, check=True)
    m = re.search(r'<pre id="sp-probe">(.*?)</pre>', run.stdout, re.S)
    assert m, "the probe never ran: " + run.stderr[-2000:]
    import html

    return json.loads(html.unescape(m.group(1))), run.stderr


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Uncaught" in line or ("CONSOLE" in line and "ERROR" in line)]


def _screenshot(page: Path, out: Path, size: str) -> np.ndarray:
    subprocess.run([BROWSER, *FLAGS, f"--screenshot={out}", f"--window-size={size}", page.as_uri()],
                   capture_output=True, timeout=180, check=True)
    from matplotlib.image import imread

    return imread(out)


def _colour_share(pixels: np.ndarray, hex_colour: str, tol: float = 0.06) -> float:
    """Share of the screenshot's pixels within ``tol`` of a colour (RGB in 0..1)."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return float((np.abs(pixels[..., :3] - rgb).max(axis=-1) < tol).mean())


def _keep(pixels_path: Path, name: str) -> None:
    """With SIGNALPROP_SCREENSHOTS set: the screenshot in that folder, as a
    palette PNG (the README's pictures stay small)."""
    folder = os.environ.get("SIGNALPROP_SCREENSHOTS")
    if not folder:
        return
    from PIL import Image

    Path(folder).mkdir(parents=True, exist_ok=True)
    with Image.open(pixels_path) as im:
        im.convert("RGB").quantize(colors=128, dither=Image.Dither.NONE).save(Path(folder) / name, optimize=True)


@pytest.fixture(scope="module")
def check_page(tmp_path_factory):
    r = trend_only_report()
    return r, r.save_html(tmp_path_factory.mktemp("check") / "report.html")


@pytest.fixture(scope="module")
def monitor_page(tmp_path_factory):
    r = relu_run()
    return r, r.save_html(tmp_path_factory.mktemp("monitor") / "monitor.html")


def test_check_report_draws_and_hovers_in_chromium(check_page, tmp_path):
    r, page = check_page
    found, log = _probe(page, [("blocks.#.fc (Linear)", 3), ("blocks.#.act (Tanh)", 0)], tmp_path)
    assert found["errors"] == [] and _console_errors(log) == []
    assert found["figures"] == found["drawn"] == 1
    row = next(x for x in r.layers if x.name == "blocks.3.fc")
    first_act = next(x for x in r.layers if x.name == "blocks.0.act")
    assert row.name in found["hovers"][0] and "Linear" in found["hovers"][0]
    assert "E[y²]" in found["hovers"][0] and f"{row.forward_second_moment:.3g}" in found["hovers"][0]
    assert first_act.name in found["hovers"][1] and "Tanh" in found["hovers"][1]


def test_check_report_screenshot(check_page, tmp_path):
    r, page = check_page
    shot = tmp_path / "check.png"
    pixels = _screenshot(_probed(page, [("blocks.#.fc (Linear)", 8)], tmp_path, keep_last=True), shot, "1280,1500")
    assert pixels.shape[:2] == (1500, 1280)
    assert float(np.std(pixels[..., :3])) > 0.05  # far from a blank page
    # the figure itself is drawn: the blue Linear and orange Tanh series' lines and markers
    # (about 4e-4 of the pixels each; none at all where the figure is not drawn)
    assert _colour_share(pixels, "#1f77b4") > 1e-4 and _colour_share(pixels, "#ff7f0e") > 1e-4
    _keep(shot, "check-report.png")


def test_monitor_report_draws_and_hovers_in_chromium(monitor_page, tmp_path):
    r, page = monitor_page
    kinds = list(dict.fromkeys(a.kind for a in r.alerts))
    first = next(a for a in r.alerts if a.kind == kinds[0])
    layer = r.history[0].layers[2].name
    found, log = _probe(page, [(f"alert: {kinds[0]} ({sum(a.kind == kinds[0] for a in r.alerts)})", 0),
                               (layer, 1)], tmp_path)
    assert found["errors"] == [] and _console_errors(log) == []
    assert found["figures"] == found["drawn"] == 1
    alert = found["hovers"][0]
    assert f"step {first.step}: {first.kind}" in alert and "fix:" in alert
    assert " ".join(first.message.split()[:4]) in alert
    trace = next(t for t in monitor_figure(r).data if t.name == layer)
    assert layer in found["hovers"][1] and "Linear" in found["hovers"][1]
    assert f"step {trace.x[1]}" in found["hovers"][1] and "gradient RMS" in found["hovers"][1]


def test_monitor_report_screenshot(monitor_page, tmp_path):
    r, page = monitor_page
    shot = tmp_path / "monitor.png"
    dead = sum(a.kind == "dead" for a in r.alerts)
    hover = [(f"alert: dead ({dead})", 0)] if dead else []  # the alert's message and fix in the picture
    pixels = _screenshot(_probed(page, hover, tmp_path, keep_last=True), shot, "1280,2300")
    assert float(np.std(pixels[..., :3])) > 0.05
    # the gradient norm's teal line and points (about 6e-4 of the pixels; none where the figure is not drawn)
    assert _colour_share(pixels, GRAD_NORM_COLOUR) > 1e-4
    _keep(shot, "monitor-report.png")


def test_notebook_cells_draw_with_one_copy_of_plotly(check_page, monitor_page, tmp_path, monkeypatch):
    """Two reports shown in one notebook page (their _repr_html_ fragments one
    after the other, as Jupyter places cell outputs): plotly.js comes with
    the first only, and both figures are drawn without errors."""
    from signalprop.report import plotly_page

    monkeypatch.setattr(plotly_page, "_sent_to_notebook", False)
    cells = [check_page[0]._repr_html_(), monitor_page[0]._repr_html_()]
    assert sum("id='sp-plotlyjs-" in c for c in cells) == 1
    page = tmp_path / "notebook.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body>"
                    + "".join(f"<div class='output'>{c}</div>" for c in cells) + "</body></html>")
    found, log = _probe(page, [("blocks.#.fc (Linear)", 0)], tmp_path)
    assert found["errors"] == [] and _console_errors(log) == []
    assert found["figures"] == found["drawn"] == 2
    assert "blocks.0.fc" in found["hovers"][0]
