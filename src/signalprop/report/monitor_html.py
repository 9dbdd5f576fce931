"""The monitor's HTML report: loss and gradient-norm curves, per-layer time
series over the sampled steps, and the alerts (one self-contained file)."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from .figures import new_figure
from .html import COLUMNS, _cell, write_html

_SERIES = (("grad_rms", "gradient RMS (d loss / d output)", True),
           ("forward_second_moment", "forward second moment E[y^2]", True),
           ("saturation", "saturated share", False))
MAX_LINES = 12  # layers drawn per panel (evenly spaced through the network); the JSON has all


def _num(v: Any) -> float:
    return float("nan") if v is None or not math.isfinite(v) else float(v)


def monitor_figure(r: Any) -> bytes:
    from matplotlib import colormaps
    fig, axes = new_figure(2, 2, figsize=(12, 7.5))
    steps = np.array(r.steps, dtype=float)
    ax = axes[0][0]
    ax.semilogy(steps, [_num(v) if (v or 0) > 0 else np.nan for v in r.losses], lw=1, label="loss")
    ax.semilogy(steps, [_num(v) if (v or 0) > 0 else np.nan for v in r.grad_norms], lw=1, label="gradient norm")
    for a in r.alerts:
        ax.axvline(a.step, c="red", alpha=0.35, lw=1)
    ax.set(xlabel="step", title="every step (red: alerts)")
    ax.legend(fontsize=8)
    names: list[str] = []
    for h in r.history:
        for layer in h.layers:
            if layer.name not in names:
                names.append(layer.name)
    pick = names if len(names) <= MAX_LINES else [names[int(i)] for i in np.linspace(0, len(names) - 1, MAX_LINES)]
    for ax, (attr, title, log) in zip([axes[0][1], axes[1][0], axes[1][1]], _SERIES):
        drawn = False
        for i, n in enumerate(pick):
            xs, ys = [], []
            for h in r.history:
                v = next((getattr(layer, attr) for layer in h.layers if layer.name == n), None)
                if v is not None:
                    xs.append(h.step)
                    ys.append(_num(v) if (not log or (v or 0) > 0) else np.nan)
            if xs:
                ax.plot(xs, ys, ".-", lw=1, ms=3, color=colormaps["viridis"](i / max(len(pick) - 1, 1)),
                        label=n or "(root)")
                drawn = True
        if log and drawn:
            ax.set_yscale("log")
        ax.set(xlabel="sampled step", title=title)
        if drawn:
            ax.legend(fontsize=6, ncol=2)
        else:
            ax.text(0.5, 0.5, "no layer has this quantity", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"signalprop monitor: {r.model}, {len(r.steps)} steps, {len(r.alerts)} alert(s)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


_PAGE_STYLE = "body{font-family:sans-serif;margin:2em} td,th{font-size:12px;padding:3px} img{max-width:100%;height:auto}"
_NOTEBOOK_STYLE = ".sp-monitor td,.sp-monitor th{font-size:12px;padding:3px} .sp-monitor img{max-width:100%;height:auto}"


def _last_sample_table(r: Any) -> str:
    """The last sampled step's rows, in the columns of check's report."""
    if not r.history:
        return ""
    h = r.history[-1]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{_cell(getattr(layer, attr), how)}</td>" for attr, _, how in COLUMNS)
                   + "</tr>" for layer in h.layers)
    return (f"<h3>Layers at the last sampled step ({h.step}: {html.escape(h.verdict)})</h3>"
            f"<table border=1 cellspacing=0><tr>{head}</tr>{rows}</table>")


def render_monitor_html(r: Any, standalone: bool = True) -> str:
    """The page, or with ``standalone=False`` its body in one ``<div>`` with
    its styles inline (a notebook cell's ``_repr_html_``)."""
    img = base64.b64encode(monitor_figure(r)).decode()
    alerts = "".join(
        f"<tr><td>{a.step}</td><td>{html.escape(a.kind)}</td><td>{html.escape(a.layer)}</td>"
        f"<td>{html.escape(a.phase)}</td><td>{html.escape(a.message)}</td><td>{html.escape(a.suggestion)}</td></tr>"
        for a in r.alerts) or "<tr><td colspan=6>none</td></tr>"
    hist = "".join(f"<tr><td>{h.step}</td><td>{'-' if h.loss is None else f'{h.loss:.4g}'}</td>"
                   f"<td>{'-' if h.grad_norm is None else f'{h.grad_norm:.3g}'}</td>"
                   f"<td>{html.escape(h.verdict)}</td><td>{len(h.problems)}</td></tr>" for h in r.history)
    body = (f"<h2>signalprop monitor: {html.escape(r.model)}</h2>"
            f"<p>{len(r.steps)} steps, one in {r.every} sampled layer by layer ({len(r.history)} samples)</p>"
            f"<h3>Alerts</h3><table border=1 cellspacing=0><tr><th>step</th><th>kind</th><th>layer</th>"
            f"<th>phase</th><th>message</th><th>suggestion</th></tr>{alerts}</table>"
            f"<img alt='monitor time series' src='data:image/png;base64,{img}'/>"
            f"<h3>Sampled steps</h3><table border=1 cellspacing=0><tr><th>step</th><th>loss</th>"
            f"<th>gradient norm</th><th>verdict</th><th>problems</th></tr>{hist}</table>{_last_sample_table(r)}")
    if not standalone:  # styles scoped to this element: a notebook page holds other cells
        return f"<div class='sp-monitor'><style>{_NOTEBOOK_STYLE}</style>{body}</div>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>signalprop monitor: {html.escape(r.model)}"
            f"</title><style>{_PAGE_STYLE}</style></head><body>{body}</body></html>")


def save_monitor_html(r: Any, path: Any) -> Path:
    return write_html(path, render_monitor_html(r))
