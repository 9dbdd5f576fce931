"""One self-contained HTML report: a header, the problems, the interactive
figure (plotly, embedded: the file opens offline) and the layer table."""

from __future__ import annotations

import datetime
import html
from pathlib import Path
from typing import Any

from .cells import COLUMNS, VERDICT_COLOURS, cell, columns
from .check_plot import check_figure
from .plotly_page import embedded_library, figure_div

__all__ = ["COLUMNS", "VERDICT_COLOURS", "columns", "render_html", "save_html", "write_html"]
_cell = cell  # the monitor's page and older callers


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
li{margin-bottom:.5em} .v{font-weight:600}
.sp-figure{margin:1em 0} .sp-hint{color:#57606a;font-size:13px}
"""


def figure_section(report: Any) -> str:
    """The figure with a line on how to read it."""
    fig = check_figure(report)
    hint = ("<p class='sp-hint'>Hover a point for the module's values; drag to zoom (double-click resets), "
            "the slider under a long model's axis picks the rows shown, a click on a legend entry hides it. "
            "The dotted lines are the depth-trend rule: across blocks, the median change from one block to the "
            "next, red where it passes the limit.</p>")
    return hint + figure_div(fig, f"signal propagation per module of {report.summary.model}", fig.layout.height)


def render_html(report: Any, standalone: bool = True) -> str:
    """The page, or with ``standalone=False`` its body in one ``<div>`` with
    its styles inline (a notebook cell's ``_repr_html_``: plotly.js comes with
    the first report a process shows there)."""
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
            f"<h2>Per module</h2>{figure_section(report)}"
            f"<h2>Layers</h2><table class='layers'><tr>{head}</tr>{rows}</table>")
    if not standalone:  # a notebook cell: the page's body in one element, styles inline
        return f"<div class='sp-report'><style>{STYLE}</style>{embedded_library(notebook=True)}{body}</div>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{STYLE}</style>{embedded_library()}</head><body>{body}</body></html>")


def write_html(path: Any, text: str) -> Path:
    """Write a page, creating its folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def save_html(report: Any, path: Any) -> Path:
    return write_html(path, render_html(report))
