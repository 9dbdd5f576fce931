"""The check report's interactive figure (plotly): every row by its module
name, the rules that decided the verdict drawn on it.

Panels share one x-axis, one category per row in execution order, labelled
with the module's name; repeated blocks (``blocks.3``, ``encoder.layer.7``)
are shaded in turns and named above the figure; a range slider under a long
model's axis picks the rows shown.

* Gradient RMS relative to the output's gradient -- the number the verdict
  judges -- with the healthy band of ``check(bounds=...)`` and, for every
  role repeated across blocks, the depth trend the rule measured (the
  median change from one block to the next, drawn as a line through that
  role's rows; red where it passes ``trend``).
* The forward second moment E[y^2], with its depth trends (limit
  ``trend**2``).
* Saturated and dead shares, only when the model has rows that measure them.

Each module position repeated across blocks is one line through its blocks
(rows that differ by design -- a weight layer and the activation after it --
are never joined: one line through both would zig-zag); theory, where it
applies, is a dashed line per series.
Hovering a point shows the row's name, kind, verdict and every measured value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..records import LayerStats
from .cells import VERDICT_COLOURS, hover_text
from .row_groups import _role_labels, blocks, median_trend, row_labels, row_series

__all__ = ["check_figure", "figure_height", "has_shares"]

# one colour per series (plotly's D3 palette, then its Alphabet one); rows in no series are grey
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#7f7f7f", "#AA0DFE", "#3283FE", "#85660D", "#782AB6", "#565656", "#1C8356", "#16FF32", "#F7E1A0",
           "#E2E2E2", "#1CBE4F", "#C4451C", "#DEA0FD", "#FE00FA", "#325A9B", "#FEAF16", "#F8A19F")
OTHER_COLOUR = "#57606a"
BAND_COLOUR = "rgba(26,127,55,0.10)"
TREND_OK, TREND_BAD = "#6e7781", "#cf222e"
RANGE_SLIDER_ROWS = 30
MAX_TICKS = 50  # module names labelled on the axis at once  # longer models get a range slider under the axis
PANEL_HEIGHT = 300  # pixels of a value panel; the shares' panel is smaller
PANEL_WEIGHTS = (1.0, 1.0, 0.6)


def _positive(v: float | None) -> float | None:
    return v if v is not None and 0 < v < math.inf else None


def _trend_line(values: list[float]) -> tuple[list[float], float]:
    """The rule's per-block change drawn through the rows: a geometric line with
    the median step, placed at the median offset of the points from it."""
    up = median_trend(values)
    n = len(values)
    per = math.log(up) / (n - 1)  # log change per block, > 0 when larger toward the input
    offset = sorted(math.log(v) + per * k for k, v in enumerate(values))[n // 2]
    return [math.exp(offset - per * k) for k in range(n)], up


def _trend_traces(go: Any, report: Any, labels: list[str], value: Callable[[LayerStats], float | None],
                  limit: float, what: str, axis: int) -> list[Any]:
    """One dotted line per repeated role (the rows the rule compares), red where
    its change passes ``limit``; one legend entry for them all."""
    traces = []
    by_index = {layer.index: layer for layer in report.layers}
    first = True
    for t in report.summary.series:
        rows = [by_index[i] for i in t.rows if i in by_index]
        vals = [value(r) for r in rows]
        if len(rows) < 3 or any(v is None for v in vals):
            continue
        ys, up = _trend_line(vals)  # type: ignore[arg-type]
        bad = up > limit or up < 1 / limit
        change = (f"{up:.3g}x larger at the first block ({rows[0].name or '(root)'}) than at the last "
                  f"({rows[-1].name or '(root)'})" if up >= 1 else
                  f"{1 / up:.3g}x smaller at the first block ({rows[0].name or '(root)'}) than at the last "
                  f"({rows[-1].name or '(root)'})")
        per = up ** (1 / (len(rows) - 1))
        verdict = ("past the limit: " + ("vanishing" if (up > 1) != (what == "gradient") else "exploding")
                   if bad else "within the limit")
        text = (f"<b>depth trend</b> of {len(rows)} repeated {_role_labels([t.role])[t.role]} rows<br>{what}: {change}<br>"
                f"{per:.3g}x per block (median), limit {limit:.3g}x over all blocks: {verdict}")
        traces.append(go.Scatter(
            x=[labels[r.index] for r in rows], y=ys, mode="lines", line={"dash": "dot", "width": 2,
                                                                        "color": TREND_BAD if bad else TREND_OK},
            name=f"depth trend, {what} (limit {limit:.3g}x)", legendgroup=f"trend{axis}", showlegend=first,
            hovertext=[text] * len(rows), hoverinfo="text",
            xaxis=f"x{axis if axis > 1 else ''}", yaxis=f"y{axis if axis > 1 else ''}"))
        first = False
    return traces


def _value_panel(go: Any, report: Any, labels: list[str], hovers: list[str], axis: int,
                 value: Callable[[LayerStats], float | None], theory: Callable[[LayerStats], float | None],
                 unit: str, quantity: str) -> list[Any]:
    """The rows' values, one line per series of :func:`row_series`, theory
    dashed per series, flagged rows ringed in their verdict's colour, and rows
    whose value cannot sit on a log axis (0, NaN, Inf) as triangles at the
    bottom.  Series, theory and rings are named in the legend once, grouped,
    so one click hides them in every panel."""
    layers = report.layers
    k = "" if axis == 1 else str(axis)
    ax = {"xaxis": f"x{k}", "yaxis": f"y{k}"}
    first = axis == 1
    traces = []
    shown = [v for v in (_positive(value(x)) for x in layers) if v is not None]
    floor = min(shown) / 10 if shown else 1e-30
    theory_shown = False
    for j, (name, rows, joined) in enumerate(row_series(layers)):
        colour = OTHER_COLOUR if not joined else PALETTE[j % len(PALETTE)]
        traces.append(go.Scatter(x=[labels[x.index] for x in rows], y=[_positive(value(x)) for x in rows],
                                 mode="lines+markers" if joined else "markers", name=name, legendgroup=name,
                                 showlegend=first, line={"color": colour, "width": 1.5},
                                 marker={"size": 6, "color": colour}, hovertext=[hovers[x.index] for x in rows],
                                 hoverinfo="text", **ax))
        pred = [x for x in rows if _positive(theory(x)) is not None]
        if pred and joined:
            traces.append(go.Scatter(x=[labels[x.index] for x in pred], y=[theory(x) for x in pred], mode="lines",
                                     name="theory (dashed, per series)", legendgroup="theory",
                                     showlegend=first and not theory_shown,
                                     line={"color": colour, "dash": "dash", "width": 1.5}, opacity=0.7,
                                     hovertext=[f"theory for {x.name or '(root)'}: {theory(x):.3g} {unit}"
                                                for x in pred], hoverinfo="text", **ax))
            theory_shown = True
        elif pred:  # rows that are no series: theory as marks beside their points
            traces.append(go.Scatter(x=[labels[x.index] for x in pred], y=[theory(x) for x in pred],
                                     mode="markers", name="theory (dashed, per series)", legendgroup="theory",
                                     showlegend=first and not theory_shown,
                                     marker={"symbol": "line-ew-open", "size": 12, "color": colour},
                                     hovertext=[f"theory for {x.name or '(root)'}: {theory(x):.3g} {unit}"
                                                for x in pred], hoverinfo="text", **ax))
            theory_shown = True
    off = [x for x in layers if value(x) is not None and _positive(value(x)) is None]
    if off:
        traces.append(go.Scatter(x=[labels[x.index] for x in off], y=[floor] * len(off), mode="markers",
                                 name=f"{quantity} 0 or non-finite (drawn at the bottom)",
                                 marker={"symbol": "triangle-down", "size": 10, "color": "#a40e26"},
                                 hovertext=[hovers[x.index] for x in off], hoverinfo="text", **ax))
    for verdict in VERDICT_COLOURS:
        rows = [x for x in layers if x.verdict == verdict and verdict != "healthy"]
        pts = [(labels[x.index], _positive(value(x)) or floor) for x in rows if value(x) is not None]
        if pts:
            traces.append(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers",
                                     name=f"{verdict} rows", legendgroup=f"flag-{verdict}", showlegend=first,
                                     hoverinfo="skip", marker={"symbol": "circle-open", "size": 13, "line": {"width": 2},
                                                               "color": VERDICT_COLOURS[verdict]},
                                     **ax))
    return traces


def _share_panel(go: Any, report: Any, labels: list[str], hovers: list[str], axis: int) -> list[Any]:
    ax = {"xaxis": f"x{axis}", "yaxis": f"y{axis}"}
    traces = []
    for attr, name, colour in (("saturation", "saturated share", VERDICT_COLOURS["saturated"]),
                               ("dead_fraction", "dead units", VERDICT_COLOURS["dead"])):
        rows = [x for x in report.layers if getattr(x, attr) is not None]
        if rows:
            traces.append(go.Scatter(x=[labels[x.index] for x in rows], y=[100 * getattr(x, attr) for x in rows],
                                     mode="lines+markers", name=name, line={"color": colour, "width": 1.5},
                                     marker={"size": 6, "color": colour}, hovertext=[hovers[x.index] for x in rows],
                                     hoverinfo="text", **ax))
    return traces


def has_shares(report: Any) -> bool:
    return any(x.saturation is not None or x.dead_fraction is not None for x in report.layers)


def check_figure(report: Any) -> Any:
    """The figure as a ``plotly.graph_objects.Figure`` (see the module docstring)."""
    import plotly.graph_objects as go

    layers = report.layers
    labels = row_labels(layers)
    hovers = [hover_text(x) for x in layers]
    out = report.summary.output_grad_rms or 1.0
    lo, hi = report.summary.bounds
    trend = report.summary.trend_limit
    panels = 3 if has_shares(report) else 2
    fig = go.Figure()

    def rel(x: LayerStats) -> float | None:
        return x.relative_grad_rms

    def rel_theory(x: LayerStats) -> float | None:
        return None if x.predicted_grad_rms is None else x.predicted_grad_rms / out

    fig.add_traces(_value_panel(go, report, labels, hovers, 1, rel, rel_theory, "x the output's gradient RMS",
                                "gradient"))
    fig.add_traces(_trend_traces(go, report, labels, rel, trend, "gradient RMS", 1))
    fig.add_traces(_value_panel(go, report, labels, hovers, 2, lambda x: x.forward_second_moment,
                                lambda x: x.predicted_second_moment, "E[y²]", "E[y²]"))
    fig.add_traces(_trend_traces(go, report, labels, lambda x: x.forward_second_moment, trend * trend, "E[y²]", 2))
    if panels == 3:
        fig.add_traces(_share_panel(go, report, labels, hovers, 3))
    # the healthy band, a shape that the legend names
    fig.add_shape(type="rect", xref="x domain", x0=0, x1=1, yref="y", y0=lo, y1=hi, fillcolor=BAND_COLOUR,
                  line={"width": 0}, layer="below", showlegend=True,
                  name=f"healthy band [{lo:g}, {hi:g}]")
    if panels == 3:
        fig.add_shape(type="line", xref="x3 domain", x0=0, x1=1, yref="y3", y0=50, y1=50,
                      line={"dash": "dash", "color": "#57606a", "width": 1}, showlegend=True,
                      name="shares judged above 50%")
    _layout(fig, report, labels, panels)
    return fig


def figure_height(panels: int, rows: int) -> int:
    return int(PANEL_HEIGHT * sum(PANEL_WEIGHTS[:panels])) + 150 + (60 if rows > RANGE_SLIDER_ROWS else 0)


def _layout(fig: Any, report: Any, labels: list[str], panels: int) -> None:
    gap = 0.05
    top = 0.95  # room above for the blocks' names
    unit = (top - gap * (panels - 1)) / sum(PANEL_WEIGHTS[:panels])
    domains, y = [], top
    for w in PANEL_WEIGHTS[:panels]:
        domains.append((max(0.0, y - w * unit), min(1.0, y)))
        y -= w * unit + gap
    titles = ["gradient RMS / output's<br>(what the verdict judges)", "forward E[y²]", "share of units (%)"]
    n = len(labels)
    layout: dict[str, Any] = {
        "height": figure_height(panels, n),
        "margin": {"l": 80, "r": 250, "t": 40, "b": 40}, "hovermode": "closest", "template": "plotly_white",
        "hoverlabel": {"align": "left", "font": {"size": 12}}, "font": {"size": 12},
        # one legend right of the plots (scrolls when taller than the figure); a click hides a series in every panel
        "legend": {"x": 1.01, "xanchor": "left", "y": 1, "yanchor": "top", "font": {"size": 11},
                   "groupclick": "togglegroup"},
    }
    for i in range(panels):
        k = "" if i == 0 else str(i + 1)
        bottom = i == panels - 1
        layout[f"yaxis{k}"] = {"domain": domains[i], "title": {"text": titles[i], "font": {"size": 12}},
                               "type": "linear" if i == 2 else "log", "exponentformat": "power",
                               **({"range": [0, 100]} if i == 2 else {})}
        layout[f"xaxis{k}"] = {"type": "category", "categoryorder": "array", "categoryarray": labels,
                               "anchor": f"y{k}", "showticklabels": bottom, "tickangle": -45 if n > 8 else 0,
                               # a long model: every name would overlap; plotly labels a subset, zooming shows all
                               **({"nticks": MAX_TICKS, "tickangle": -90} if n > MAX_TICKS else {}),
                               "automargin": True, "showgrid": False,
                               **({"matches": "x"} if i else {}),
                               **({"title": {"text": "module (execution order)"}} if bottom else {})}
        if bottom and n > RANGE_SLIDER_ROWS:
            layout[f"xaxis{k}"]["rangeslider"] = {"visible": True, "thickness": 0.05}
    fig.update_layout(layout)
    for j, (name, a, b) in enumerate(blocks(report.layers)):
        if j % 2:  # every other block shaded: where one block ends and the next begins
            fig.add_shape(type="rect", xref="x", x0=a - 0.5, x1=b + 0.5, yref="paper", y0=0, y1=top,
                          fillcolor="rgba(9,105,218,0.06)", line={"width": 0}, layer="below")
        fig.add_annotation(x=(a + b) / 2, xref="x", y=top, yref="paper", yanchor="bottom", text=name,
                           showarrow=False, font={"size": 10, "color": "#57606a"},
                           # tilted where the name is wider than its block (at ~6 px a letter, ~900 px of plot)
                           textangle=-30 if 6 * len(name) > 900 * (b - a + 1) / n else 0)
