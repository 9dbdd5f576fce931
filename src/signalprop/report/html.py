"""One self-contained HTML report: tables plus signal-propagation plots as inline PNG."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from .figures import _plt


def signal_figure(report: Any) -> bytes:
    """Forward second moment and gradient RMS per layer on log scales, the
    gradient bounds as a band, theory predictions dashed."""
    plt = _plt()
    L = report.layers
    x = np.arange(len(L))
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)

    def arr(attr: str) -> np.ndarray:
        return np.array([np.nan if getattr(l, attr) is None else getattr(l, attr) for l in L], dtype=float)

    m2, pm2, g, pg = arr("forward_second_moment"), arr("predicted_second_moment"), arr("grad_rms"), arr(
        "predicted_grad_rms")
    a.semilogy(x, np.where(m2 > 0, m2, np.nan), ".-", label="measured E[y^2]")
    if np.isfinite(pm2).any():
        a.semilogy(x, pm2, "k--", lw=1, label="theory")
    a.set_ylabel("forward second moment")
    a.legend(fontsize=8)
    lo, hi = report.summary.bounds
    b.axhspan(lo, hi, color="green", alpha=0.08, label=f"bounds [{lo:g}, {hi:g}]")
    b.semilogy(x, np.where(g > 0, g, np.nan), ".-", c="C1", label="measured grad RMS")
    if np.isfinite(pg).any():
        b.semilogy(x, pg, "k--", lw=1, label="theory")
    b.set(xlabel="row (execution order)", ylabel="gradient RMS")
    b.legend(fontsize=8)
    fig.suptitle(f"signal propagation: {report.verdict}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return html.escape(str(v))


def render_html(report: Any, standalone: bool = True) -> str:
    img = base64.b64encode(signal_figure(report)).decode()
    probs = "".join(f"<li><b>{html.escape(p.kind)}</b>: {html.escape(p.message)}<br><i>fix:</i> "
                    f"{html.escape(p.suggestion)}</li>" for p in report.problems) or "<li>none</li>"
    cols = ["index", "name", "kind", "forward_second_moment", "predicted_second_moment", "grad_rms",
            "predicted_grad_rms", "param_grad_rms", "grad_to_weight", "saturation", "dead_fraction", "verdict"]
    head = "".join(f"<th>{c}</th>" for c in cols)
    rows = "".join("<tr>" + "".join(f"<td>{_cell(getattr(l, c))}</td>" for c in cols) + "</tr>"
                   for l in report.layers)
    body = (f"<h2>signalprop check: {html.escape(report.verdict)}</h2>"
            f"<p>{html.escape(report.summary.backprop)}</p>"
            f"<h3>Problems</h3><ul>{probs}</ul>"
            f"<img alt='signal propagation' src='data:image/png;base64,{img}'/>"
            f"<h3>Layers</h3><table border=1 cellspacing=0 cellpadding=3><tr>{head}</tr>{rows}</table>")
    if not standalone:
        return f"<div>{body}</div>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>signalprop report</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}} td,th{{font-size:12px}}</style></head>"
            f"<body>{body}</body></html>")


def write_html(path: Any, text: str) -> Path:
    """Write a page, creating its folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def save_html(report: Any, path: Any) -> Path:
    return write_html(path, render_html(report))
