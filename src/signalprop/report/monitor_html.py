"""The monitor's HTML report: loss and gradient-norm curves, per-layer time
series over the sampled steps, and the alerts (one self-contained file)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .cells import COLUMNS, cell
from .html import write_html
from .monitor_plot import MAX_LAYERS, monitor_figure
from .plotly_page import embedded_library, figure_div


def figure_section(r: Any) -> str:
    fig = monitor_figure(r)
    hint = ("<p class='sp-hint'>Hover a point for its values, an alert's cross for its message and fix; drag to "
            "zoom (double-click resets), the slider under the last panel picks the steps shown; a click on a layer "
            f"in the legend hides it in every panel. Up to {MAX_LAYERS} layers are drawn, evenly spaced through the "
            "model, and every layer an alert names; the JSON (to_json) has them all.</p>")
    return hint + figure_div(fig, f"training timeline and per-layer statistics of {r.model}", fig.layout.height)


_PAGE_STYLE = ("body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px} td,th{font-size:12px;padding:3px}"
               " .sp-hint{color:#57606a;font-size:13px}")
_NOTEBOOK_STYLE = ".sp-monitor td,.sp-monitor th{font-size:12px;padding:3px} .sp-monitor .sp-hint{color:#57606a;font-size:13px}"


def _last_sample_table(r: Any) -> str:
    """The last sampled step's rows, in the columns of check's report."""
    if not r.history:
        return ""
    h = r.history[-1]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{cell(getattr(layer, attr), how)}</td>" for attr, _, how in COLUMNS)
                   + "</tr>" for layer in h.layers)
    return (f"<h3>Layers at the last sampled step ({h.step}: {html.escape(h.verdict)})</h3>"
            f"<table border=1 cellspacing=0><tr>{head}</tr>{rows}</table>")


def render_monitor_html(r: Any, standalone: bool = True) -> str:
    """The page, or with ``standalone=False`` its body in one ``<div>`` with
    its styles inline (a notebook cell's ``_repr_html_``)."""
    alerts = "".join(
        f"<tr><td>{a.step}</td><td>{html.escape(a.kind)}</td><td>{html.escape(a.layer)}</td>"
        f"<td>{html.escape(a.phase)}</td><td>{html.escape(a.message)}</td><td>{html.escape(a.suggestion)}</td></tr>"
        for a in r.alerts) or "<tr><td colspan=6>none</td></tr>"
    hist = "".join(f"<tr><td>{h.step}</td><td>{'-' if h.loss is None else f'{h.loss:.4g}'}</td>"
                   f"<td>{'-' if h.grad_norm is None else f'{h.grad_norm:.3g}'}</td>"
                   f"<td>{html.escape(h.verdict)}</td><td>{len(h.problems)}</td>"
                   f"<td>{html.escape(h.incomplete)}</td><td>{html.escape(' '.join(h.notes))}</td></tr>"
                   for h in r.history)
    skips = "".join(f"<li>{html.escape(why)}: {html.escape(', '.join(map(str, ks)))}</li>" for why, ks in (
        ("by skip=", r.skipped), ("by the GradScaler, its scaled gradients overflowing", r.scaler_skipped)) if ks)
    body = (f"<h2>signalprop monitor: {html.escape(r.model)}</h2>"
            f"<p>{len(r.steps)} steps, one in {r.every} sampled layer by layer ({len(r.history)} samples)</p>"
            f"<h3>Alerts</h3><table border=1 cellspacing=0><tr><th>step</th><th>kind</th><th>layer</th>"
            f"<th>phase</th><th>message</th><th>suggestion</th></tr>{alerts}</table>"
            + (f"<h3>Optimizer steps skipped</h3><ul>{skips}</ul>" if skips else "")
            + f"{figure_section(r)}"
            f"<h3>Sampled steps</h3><table border=1 cellspacing=0><tr><th>step</th><th>loss</th>"
            f"<th>gradient norm</th><th>verdict</th><th>problems</th><th>no verdict because</th><th>notes</th></tr>{hist}</table>"
            f"{_last_sample_table(r)}")
    if not standalone:  # styles scoped to this element: a notebook page holds other cells
        return f"<div class='sp-monitor'><style>{_NOTEBOOK_STYLE}</style>{embedded_library(notebook=True)}{body}</div>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>signalprop monitor: {html.escape(r.model)}"
            f"</title><meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{_PAGE_STYLE}</style>{embedded_library()}</head><body>{body}</body></html>")


def save_monitor_html(r: Any, path: Any) -> Path:
    return write_html(path, render_monitor_html(r))
