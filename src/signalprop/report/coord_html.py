"""A coordinate check as one self-contained HTML page.

As users know it from mup: scale against width on log-log axes, one line per
training step, here one small panel per layer (and role) with its verdict,
fitted slopes and the fix beside it; problems first.  Figures are drawn on
``Figure`` objects (matplotlib imported lazily) and embedded as PNG.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from .figures import new_figure
from .html import write_html

COLOURS = {"width-stable": "#1a7f37", "grows": "#cf222e", "shrinks": "#9a6700"}
ROLE_LABEL = {"activation": "activation", "update": "update (own step)", "logits": "output logits",
              "attention": "attention logits"}

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1300px}
h1{font-size:1.4em} table.facts th{text-align:left;padding-right:1em}
table.layers{border-collapse:collapse} table.layers td{border-top:1px solid #ddd;padding:4px 8px;vertical-align:top}
.v{font-weight:600} img{max-width:100%;height:auto} .small{font-size:12px;color:#555}
"""


def _png(fig: Any, dpi: int = 80) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode()


def _curves(result: Any, name: str, role: str) -> list[Any]:
    return sorted((s for s in result.series if s.layer == name and s.role == role), key=lambda s: s.step)


def layer_figure(result: Any, name: str, role: str) -> str:
    """One panel: the seed mean at each width, one line per step, seed range as error bars."""
    fig, ax = new_figure(figsize=(3.0, 2.2))
    for s in _curves(result, name, role):
        cols = list(zip(*s.values))
        mean = [sum(c) / len(c) if all(math.isfinite(v) and v > 0 for v in c) else math.nan for c in cols]
        if not any(math.isfinite(m) for m in mean):
            continue
        lo = [m - min(c) if math.isfinite(m) else 0.0 for m, c in zip(mean, cols)]
        hi = [max(c) - m if math.isfinite(m) else 0.0 for m, c in zip(mean, cols)]
        ax.errorbar(s.widths, mean, yerr=[lo, hi], marker="o", ms=3, lw=1, capsize=2,
                    label=f"t={s.step}" + (f" ({s.slope:+.2f})" if math.isfinite(s.slope) else ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width", fontsize=8)
    ax.set_ylabel(result.statistic, fontsize=8)
    ax.tick_params(labelsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, title="step (slope)", title_fontsize=6)
    return _png(fig)


def overview_figure(result: Any) -> str:
    """mup's picture: one panel per step, every layer's activation (mean over seeds) against width."""
    n = result.steps + 1
    fig, axes = new_figure(1, n, figsize=(3.2 * n, 3.0), sharey=True, squeeze=False)
    acts = [x for x in result.layers if x.role in ("activation", "logits")]
    for t, ax in enumerate(axes[0]):
        for x in acts:
            s = result.curve(x.name, x.role, t)
            ax.plot(s.widths, s.mean, lw=1, color=COLOURS[x.verdict], alpha=0.7)
        ax.set(xscale="log", yscale="log", title=f"t = {t}", xlabel="width")
        ax.set_xscale("log", base=2)
    axes[0][0].set_ylabel(f"{result.statistic} of every module's output")
    fig.suptitle(f"{result.model}: {result.verdict} (red: grows, amber: shrinks, green: width-stable)")
    return _png(fig, dpi=90)


def render_html(result: Any, standalone: bool = True) -> str:
    facts = [("model", result.model), ("verdict", result.verdict), ("widths", ", ".join(map(str, result.widths))),
             ("seeds", ", ".join(map(str, result.seeds))), ("steps", str(result.steps)),
             ("optimizer", result.optimizer), ("statistic", result.statistic),
             ("thresholds", f"|slope| > {result.thresholds['slope_tolerance']} and > {result.thresholds['z']} "
                            f"standard errors; healthy range {result.thresholds['range_factor']:g}x "
                            "of the smallest width's scale"),
             ("time", f"{result.seconds:.1f} s")]
    head = "<table class='facts'>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                                             for k, v in facts) + "</table>"
    order = list(result.problems) + [x for x in result.layers if x.verdict == "width-stable"]
    rows = []
    for x in order:
        slopes = ", ".join(f"t{t}: {b:+.2f}±{e:.2f}" for t, (b, e) in enumerate(zip(x.slopes, x.slope_ses))
                           if math.isfinite(b))
        fix = f"<br><i>fix:</i> {html.escape(x.fix)}" if x.fix else ""
        rows.append(f"<tr><td><img alt='{html.escape(x.name)} {x.role}' "
                    f"src='data:image/png;base64,{layer_figure(result, x.name, x.role)}'/></td>"
                    f"<td><b>{html.escape(x.name or '(model output)')}</b> · {ROLE_LABEL[x.role]} · "
                    f"{html.escape(x.kind)} · {html.escape(x.position)}<br>"
                    f"<span class='v' style='color:{COLOURS[x.verdict]}'>{x.verdict}</span>: "
                    f"{html.escape(x.message)}{fix}<br><span class='small'>slopes per step: {slopes or '-'}"
                    "</span></td></tr>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    body = (f"<h1>signalprop coordinate check of {html.escape(result.model)}: "
            f"<span class='v' style='color:{COLOURS[result.verdict]}'>{result.verdict}</span></h1>{head}"
            + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "") +
            f"<img alt='all layers per step' src='data:image/png;base64,{overview_figure(result)}'/>"
            f"<h2>Layers ({len(result.problems)} not width-stable of {len(result.layers)})</h2>"
            f"<table class='layers'>{''.join(rows)}</table>")
    if not standalone:
        return f"<div><style>{STYLE}</style>{body}</div>"
    title = html.escape(f"coordinate check of {result.model}: {result.verdict}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def save_html(result: Any, path: Any) -> Path:
    return write_html(path, render_html(result))
