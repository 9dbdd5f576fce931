"""The interactive HTML reports: file size, the time Python takes to write a
page, and the time headless Chromium takes from navigation start to every
figure drawn (read from the page: ``performance.now()`` when the figure's
``data-drawn`` attribute appears), against the same page with plotly.js
embedded as plain text instead of gzip + base64.

Cases: check of a 40-row MLP (sigmoid) and of a 12-layer GPT-2-shaped model
(narrow, so the check is quick: the rows are what matter), the monitor of a
120-step run and of a 2000-step run sampled every 10 steps (a 20-layer MLP).
Needs Chromium on PATH for the browser columns (``make chromium``).
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from _util import run_cli, write

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=60000"]
_TIMER = """<script>(function(){
function done(){
  var divs = document.querySelectorAll(".sp-figure");
  if (!divs.length || !Array.from(divs).every(function(d){ return d.dataset.drawn; })) return false;
  var p = document.createElement("pre"); p.id = "sp-drawn-ms"; p.textContent = performance.now().toFixed(1);
  document.body.appendChild(p);
  return true;
}
if (done()) return;  // already drawn (a library loaded synchronously draws before this script is parsed)
var obs = new MutationObserver(function(){ if (done()) obs.disconnect(); });
obs.observe(document.documentElement, {attributes: true, subtree: true, attributeFilter: ["data-drawn"]});
})();</script>"""


def _check_mlp() -> Any:
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(32, 32) if i % 2 == 0 else nn.Sigmoid() for i in range(40)])
    return sp.check(m, torch.randn(64, 32, generator=torch.Generator().manual_seed(1))), "check: MLP, 40 rows"


def _check_gpt2() -> Any:
    import transformers

    cfg = transformers.GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    r = sp.check(m, ids)
    return r, f"check: GPT-2 shape (12 layers), {len(r.layers)} rows"


def _monitor(steps: int, every: int, depth: int) -> Any:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = x[:, :3].sum(1, keepdim=True)
    layers: list[nn.Module] = [nn.Linear(16, 64), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    m = nn.Sequential(*layers, nn.Linear(64, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    with sp.monitor(m, every=every) as mon:
        for _ in range(steps):
            i = torch.randint(0, 512, (64,), generator=g)
            loss = F.mse_loss(m(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    r = mon.report()
    return r, f"monitor: {steps} steps, {len(r.history)} samples, {len(r.history[0].layers)} rows"


def _plain_library(page: str) -> str:
    """The same page with plotly.js as plain script text (what include_plotlyjs=True writes)."""
    from plotly.offline import get_plotlyjs

    start = page.index("<script type='application/octet-stream'")
    end = page.index("})();</script>", start) + len("})();</script>")
    plain = (f"<script>{get_plotlyjs()}</script>"
             "<script>window.signalpropPlotly = Promise.resolve(window.Plotly);</script>")
    return page[:start] + plain + page[end:]


def _drawn_ms(page: str, folder: Path, name: str, repeat: int) -> float | None:
    if BROWSER is None:
        return None
    path = folder / name
    path.write_text(page.replace("</body>", _TIMER + "</body>", 1))
    times = []
    for _ in range(repeat):
        out = subprocess.run([BROWSER, *FLAGS, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                             timeout=300, check=True).stdout
        m = re.search(r'<pre id="sp-drawn-ms">([\d.]+)</pre>', out)
        if m is None:
            raise RuntimeError(f"{name}: the figure was never drawn")
        times.append(float(m.group(1)))
    return statistics.median(times)


def main(out: Path, repeat: int = 3) -> dict[str, Any]:
    cases = [_check_mlp(), _check_gpt2(), _monitor(120, 5, 4), _monitor(2000, 10, 20)]
    rows: dict[str, Any] = {"browser": BROWSER and subprocess.run([BROWSER, "--version"], capture_output=True,
                                                                   text=True).stdout.strip(),
                            "repeat": repeat, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for k, (record, label) in enumerate(cases):
            path = folder / f"case{k}.html"
            record.save_html(path)  # warm: plotly.js compressed once per process
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                record.save_html(path)
                times.append(time.perf_counter() - t)
            page = path.read_text()
            spec = re.findall(r"<script type='application/json' id='sp-figure-\d+-json'>(.*?)</script>", page, re.S)
            plain = _plain_library(page)
            row = {"case": label, "file_bytes": len(page.encode()), "figure_json_bytes": sum(len(s) for s in spec),
                   "plain_library_file_bytes": len(plain.encode()),
                   "python_write_s": round(statistics.median(times), 4),
                   "browser_drawn_ms": _drawn_ms(page, folder, f"c{k}.html", repeat),
                   "browser_drawn_ms_plain_library": _drawn_ms(plain, folder, f"p{k}.html", repeat)}
            rows["cases"].append(row)
            print(json.dumps(row), file=sys.stderr)
    write(out, "bench_html", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, repeat=3)
