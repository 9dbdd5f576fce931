"""The HTML report in a real browser engine: Chromium renders it headless to a
PNG (which must not be blank) and dumps the DOM (which must hold the verdict,
the header and every layer row)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import signalprop as sp

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]


def _report() -> sp.Report:
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(32, 32) if i % 2 == 0 else nn.Sigmoid() for i in range(40)])
    return sp.check(m, torch.randn(64, 32, generator=torch.Generator().manual_seed(1)))


def test_report_renders_in_chromium(tmp_path):
    r = _report()
    page = r.save_html(tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run([BROWSER, *FLAGS, f"--screenshot={shot}", "--window-size=1000,1600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 900
    assert float(np.std(pixels[..., :3])) > 0.05  # text, table and figure: far from a blank page
    dom = subprocess.run([BROWSER, *FLAGS, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "signalprop check of Sequential: <span class=\"verdict\"" in dom and r.verdict in dom
    for fact in ("inputs", "(64, 32)", "torch", "signalprop", "seed 0"):
        assert fact in dom
    assert dom.count("<tr>") >= len(r.layers) + 1  # every row, and the header
    assert "saturated" in dom and "%" in dom  # shares in percent, as in the terminal
    assert "max-width:100%" in dom.replace(" ", "")  # the figure scales to the window


def test_report_figure_does_not_touch_the_callers_backend():
    """Drawing used to call matplotlib.use("Agg"): a user's backend (here svg)
    must survive, and pyplot must hold no figure afterwards."""
    import os
    import sys

    code = ("import matplotlib, torch, signalprop as sp\n"
            "import matplotlib.pyplot as plt\n"
            "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())\n"
            "sp.check(m, torch.randn(4, 8)).save_html('r.html')\n"
            "print(matplotlib.get_backend(), len(plt.get_fignums()))\n")
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.environ.get("TMPDIR", "/tmp"), check=True).stdout.split()
    assert out == ["svg", "0"]
