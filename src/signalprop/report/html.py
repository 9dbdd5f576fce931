"""One self-contained HTML report: a header, the problems, a figure and the layer table."""

from __future__ import annotations

import base64
import datetime
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..records import LayerStats
from ..statistics import STATISTICS
from .figures import new_figure

VERDICT_COLOURS = {"healthy": "#1a7f37", "vanishing": "#9a6700", "exploding": "#cf222e", "non-finite": "#a40e26",
                   "saturated": "#8250df", "dead": "#0969da"}
# (attribute, column title, how to show it): the units the terminal uses
COLUMNS = [("index", "#", "int"), ("name", "layer", "text"), ("kind", "kind", "text"),
           ("forward_second_moment", "E[y²]", "num"), ("predicted_second_moment", "E[y²] theory", "num"),
           ("grad_rms", "gradient RMS", "num"), ("predicted_grad_rms", "gradient RMS theory", "num"),
           ("relative_grad_rms", "gradient RMS / output's", "num"), ("param_grad_rms", "parameter gradient RMS", "num"),
           ("grad_to_weight", "‖grad‖ / ‖weight‖", "num"), ("saturation", "saturated", "pct"),
           ("dead_fraction", "dead units", "pct")]


def columns() -> list[tuple[str, str, str]]:
    """:data:`COLUMNS`, then every declared statistic that has no field of its
    own in ``LayerStats`` (max |y|, max |gradient|, ...), then the verdict."""
    extra = [(s.name, s.label, s.fmt) for s in STATISTICS
             if s.name not in LayerStats.__dataclass_fields__ and s.table and s.phase != "update"]  # check takes no step
    return [*COLUMNS, *extra, ("verdict", "verdict", "verdict")]


def _arr(layers: Any, attr: str) -> np.ndarray:
    return np.array([np.nan if getattr(x, attr) is None else getattr(x, attr) for x in layers], dtype=float)


def signal_figure(report: Any) -> bytes:
    """Forward second moment and gradient RMS per row on log scales: weight
    layers, activations and other rows as separate series (a weight layer and
    the activation after it differ by construction, so one line would
    zig-zag), theory predictions dashed, the gradient bounds as a band."""
    layers = report.layers
    x = np.arange(len(layers))
    kinds = {"weight layers": np.array([x_.param_grad_rms is not None and x_.activation is None for x_ in layers]),
             "activations": np.array([x_.activation is not None for x_ in layers])}
    kinds["other rows"] = ~(kinds["weight layers"] | kinds["activations"])
    fig, (a, b) = new_figure(2, 1, figsize=(9, 6.5), sharex=True)
    m2, pm2, g, pg = (_arr(layers, k) for k in ("forward_second_moment", "predicted_second_moment", "grad_rms",
                                               "predicted_grad_rms"))
    style = {"weight layers": ("o-", "C0"), "activations": ("s-", "C1"), "other rows": ("^", "C2")}
    for name, mask in kinds.items():
        if not mask.any():
            continue
        fmt, colour = style[name]
        a.semilogy(x[mask], np.where(m2[mask] > 0, m2[mask], np.nan), fmt, c=colour, ms=3, lw=1, label=name)
        b.semilogy(x[mask], np.where(g[mask] > 0, g[mask], np.nan), fmt, c=colour, ms=3, lw=1, label=name)
    if np.isfinite(pm2).any():
        a.semilogy(x, pm2, "k--", lw=1, label="theory")
    if np.isfinite(pg).any():
        b.semilogy(x, pg, "k--", lw=1, label="theory")
    a.set_ylabel(r"forward second moment $E[y^2]$")
    a.legend(fontsize=8)
    lo, hi = report.summary.bounds
    out = report.summary.output_grad_rms or 1.0
    b.axhspan(lo * out, hi * out, color="green", alpha=0.08, label=f"healthy band [{lo:g}, {hi:g}] x output's")
    b.set(xlabel="row (execution order)", ylabel="gradient RMS")
    b.legend(fontsize=8)
    fig.suptitle(f"{report.summary.model}: {report.verdict}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _cell(v: Any, how: str) -> str:
    if v is None:
        return "-"
    if how == "pct":
        return f"{v:.0%}"
    if how == "num" and isinstance(v, float):
        return f"{v:.3g}"
    if how == "verdict":
        return f"<span class='v' style='color:{VERDICT_COLOURS.get(v, '#000')}'>{html.escape(v)}</span>"
    return html.escape(str(v))


def _header(report: Any) -> str:
    import torch

    from .. import __version__

    s = report.summary
    facts = [("model", s.model), ("inputs", s.inputs or "-"),
             ("backward pass", s.backprop + (f" (seed {s.cotangent_seed})" if s.cotangent_seed is not None else "")),
             ("mode", "train" if s.training_mode else "eval"), ("rows", str(s.rows)),
             ("torch", torch.__version__), ("signalprop", __version__),
             ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))]
    return "<table class='facts'>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                                             for k, v in facts) + "</table>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}
h1{font-size:1.4em} .verdict{font-weight:bold}
table.facts th{text-align:left;padding-right:1em;font-weight:600}
table.layers{border-collapse:collapse;font-size:12px}
table.layers th,table.layers td{border:1px solid #ccc;padding:2px 6px;text-align:right}
table.layers td.text,table.layers th{text-align:left}
img{max-width:100%;height:auto}
li{margin-bottom:.5em} .v{font-weight:600}
"""


def render_html(report: Any, standalone: bool = True) -> str:
    img = base64.b64encode(signal_figure(report)).decode()
    colour = VERDICT_COLOURS.get(report.verdict, "#000")
    probs = "".join(f"<li><b style='color:{VERDICT_COLOURS.get(p.kind, '#000')}'>{html.escape(p.kind)}</b>: "
                    f"{html.escape(p.message)}<br><i>fix:</i> {html.escape(p.suggestion)}</li>"
                    for p in report.problems) or "<li>none</li>"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.summary.notes)
    cols = columns()
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in cols)
    rows = "".join("<tr>" + "".join(f"<td class='{'text' if how == 'text' else ''}'>"
                                    f"{_cell(getattr(layer, attr), how)}</td>" for attr, _, how in cols) + "</tr>"
                   for layer in report.layers)
    title = f"signalprop check of {report.summary.model}: {report.verdict}"
    body = (f"<h1>signalprop check of {html.escape(report.summary.model)}: "
            f"<span class='verdict' style='color:{colour}'>{html.escape(report.verdict)}</span></h1>"
            f"{_header(report)}"
            f"<h2>Problems</h2><ul>{probs}</ul>" + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "") +
            f"<img alt='signal propagation per row' src='data:image/png;base64,{img}'/>"
            f"<h2>Layers</h2><table class='layers'><tr>{head}</tr>{rows}</table>")
    if not standalone:  # a notebook cell: the page's body in one element, styles inline
        return f"<div><style>{STYLE}</style>{body}</div>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def write_html(path: Any, text: str) -> Path:
    """Write a page, creating its folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def save_html(report: Any, path: Any) -> Path:
    return write_html(path, render_html(report))
