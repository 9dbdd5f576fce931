"""The monitor report's interactive figure (plotly): the training timeline
with its alerts, then one panel per per-layer quantity the model has.

* Loss at every step, each alert a marker on it (hover: step, kind, module,
  message and fix) and a faint line through every panel below.
* The global gradient norm where it was recorded (the monitor measures it on
  some steps only, e.g. every 4th on a CPU): points joined without gaps.
* Per layer, over the sampled steps: gradient RMS relative to the output's
  (what the verdict judges, with its healthy band), the forward second
  moment, the optimizer's relative update ||w' - w|| / ||w|| where it was
  measured, and saturated / dead shares only when some layer measures them.

Layers are series named by module name, one colour per layer through every
panel (a click on a legend entry hides that layer everywhere).  A model with
more than :data:`MAX_LAYERS` layers draws that many, evenly spaced, plus
every layer an alert names; a long run's samples are thinned to
:data:`MAX_SAMPLES` (alert steps kept).  The JSON has everything.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from ..records import LayerStats
from .cells import VERDICT_COLOURS, columns
from .check_plot import BAND_COLOUR
from .row_groups import row_labels

MAX_LAYERS = 12
MAX_SAMPLES = 400  # sampled steps drawn per layer
MARKERS_UP_TO = 80  # samples per layer drawn with markers; more are a line (thousands of SVG markers are slow)
MAX_STEPS = 20000  # loss / gradient-norm points drawn (thinned keeping each bucket's extremes)
PANEL_HEIGHT = 250
# one colour per kind of alert (the verdicts' own where the kind is a verdict)
ALERT_COLOURS = {**VERDICT_COLOURS, "loss-spike": "#e16f24", "grad-surge": "#953800", "update-too-large": "#bf3989",
                 "update-too-small": "#6e7781", "attention-logit-growth": "#4d2d00",
                 "output-logit-divergence": "#116329", "overflow-risk": "#0550ae",
                 "update-growth": "#8250df"}
GRAD_NORM_COLOUR = "#1b7c83"


def _short(v: Any) -> Any:
    """A hover value at the 4 significant digits a label shows (the JSON stays small)."""
    return float(f"{v:.4g}") if isinstance(v, float) and math.isfinite(v) else v


def _wrap(text: str, width: int = 90) -> str:
    import html

    return "<br>".join(html.escape(line) for line in textwrap.wrap(text, width)) or "-"


def _thin(xs: Sequence[int], ys: Sequence[float | None], most: int) -> tuple[list[int], list[float]]:
    """The recorded (finite) points; past ``most`` of them, each bucket keeps
    its first, smallest and largest point (a spike survives thinning)."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if len(pts) > most:
        size = math.ceil(len(pts) / (most / 3))
        kept: set[int] = set()
        for a in range(0, len(pts), size):
            bucket = range(a, min(a + size, len(pts)))
            kept |= {a, min(bucket, key=lambda i: pts[i][1]), max(bucket, key=lambda i: pts[i][1])}
        pts = [pts[i] for i in sorted(kept)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _layer_names(r: Any) -> list[str]:
    names: list[str] = []
    for h in r.history:
        for label in row_labels(h.layers):
            if label not in names:
                names.append(label)
    return names


def _picked(r: Any, names: list[str]) -> list[str]:
    if len(names) <= MAX_LAYERS:
        return names
    idx = {round(i * (len(names) - 1) / (MAX_LAYERS - 1)) for i in range(MAX_LAYERS)}
    named = {a.layer.split(" .. ")[0] for a in r.alerts} | {a.layer.split(" .. ")[-1] for a in r.alerts}
    return [n for i, n in enumerate(names) if i in idx or n in named]


def _samples(r: Any) -> list[Any]:
    h = list(r.history)
    if len(h) <= MAX_SAMPLES:
        return h
    alert_steps = {a.step for a in r.alerts}
    keep = {round(i * (len(h) - 1) / (MAX_SAMPLES - 1)) for i in range(MAX_SAMPLES)}
    return [s for i, s in enumerate(h) if i in keep or s.step in alert_steps]


def _colour(i: int, n: int) -> str:
    from plotly.colors import sample_colorscale

    return str(sample_colorscale("Viridis", [0.9 * i / max(n - 1, 1)])[0])


Getter = Callable[[Any, LayerStats], "float | None"]


def panels_for(r: Any) -> list[tuple[str, str, bool, Getter]]:
    """(key, axis title, log scale, value of a layer at a sample) for each
    per-layer panel the model has data for."""
    def rel(h: Any, x: LayerStats) -> float | None:
        return x.relative_grad_rms

    def m2(h: Any, x: LayerStats) -> float | None:
        return x.forward_second_moment

    def upd(h: Any, x: LayerStats) -> float | None:
        return dict(h.update_ratios).get(x.name)

    def sat(h: Any, x: LayerStats) -> float | None:
        return None if x.saturation is None else 100 * x.saturation

    def dead(h: Any, x: LayerStats) -> float | None:
        return None if x.dead_fraction is None else 100 * x.dead_fraction

    out: list[tuple[str, str, bool, Getter]] = [("grad", "gradient RMS / output's", True, rel),
                                               ("m2", "forward E[y²]", True, m2)]
    if any(h.update_ratios for h in r.history):
        out.append(("update", "update ‖Δw‖ / ‖w‖", True, upd))
    if any(x.saturation is not None for h in r.history for x in h.layers):
        out.append(("sat", "saturated share (%)", False, sat))
    if any(x.dead_fraction is not None for h in r.history for x in h.layers):
        out.append(("dead", "dead units (%)", False, dead))
    return out


def _hover_fields() -> list[tuple[str, str, str]]:
    return [(a, t, f) for a, t, f in columns() if a not in ("index", "name", "kind", "verdict")]


def _layer_traces(go: Any, r: Any, picked: list[str], panels: list[tuple[str, str, bool, Getter]]) -> list[Any]:
    """One line per layer and panel; hover from ``customdata`` (the verdict and
    every measured value of that sample) through one template per trace, so a
    long run's file does not repeat the labels at every point."""
    fields = _hover_fields()
    fmt = {"num": ":.3g", "pct": ":.0%", "int": ""}
    samples = _samples(r)
    traces = []
    for li, label in enumerate(picked):
        points = []  # (sample, row)
        for h in samples:
            for lab, x in zip(row_labels(h.layers), h.layers):
                if lab == label:
                    points.append((h, x))
        if not points:
            continue
        kind = points[-1][1].kind
        have = [(a, t, f) for a, t, f in fields if any(getattr(x, a) is not None for _, x in points)]
        template = (f"<b>{_wrap(label)}</b> · {kind}<br>step %{{x}} · verdict %{{customdata[0]}}<br>"
                    + "<br>".join(f"{t}: %{{customdata[{k + 1}]{fmt.get(f, '')}}}" for k, (_, t, f) in enumerate(have))
                    + "<extra></extra>")
        colour = _colour(li, len(picked))
        first = True
        for pi, (_, _, log, get) in enumerate(panels):
            pts = [(h, x, get(h, x)) for h, x in points]
            pts = [(h, x, v) for h, x, v in pts if v is not None and math.isfinite(v) and (v > 0 or not log)]
            if not pts:
                continue
            axis = str(pi + 3)  # subplots 1 and 2 are the loss and the gradient norm
            traces.append(go.Scatter(
                x=[h.step for h, _, _ in pts], y=[v for _, _, v in pts], name=label,
                mode="lines+markers" if len(pts) <= MARKERS_UP_TO else "lines",
                legendgroup=label, showlegend=first, legend="legend3",
                line={"color": colour, "width": 1.5}, marker={"size": 5, "color": colour},
                customdata=[[x.verdict, *(_short(getattr(x, a)) for a, _, _ in have)] for _, x, _ in pts],
                hovertemplate=template, xaxis=f"x{axis}", yaxis=f"y{axis}"))
            first = False
    return traces


def _timeline(go: Any, r: Any) -> list[Any]:
    traces = []
    steps = list(r.steps)
    xs, ys = _thin(steps, r.losses, MAX_STEPS)
    traces.append(go.Scatter(x=xs, y=ys, mode="lines", name="loss", line={"color": "#24292f", "width": 1.5},
                             hovertemplate="step %{x}<br>loss %{y:.4g}<extra></extra>", legend="legend"))
    recorded = sum(v is not None for v in r.grad_norms)
    xs, ys = _thin(steps, r.grad_norms, MAX_STEPS)
    if xs:
        note = "" if recorded == len(steps) else f" ({recorded} of {len(steps)} steps)"
        traces.append(go.Scatter(x=xs, y=ys, mode="lines+markers" if len(xs) <= 200 else "lines",
                                 name=f"gradient norm{note}", line={"color": GRAD_NORM_COLOUR, "width": 1.5},
                                 marker={"size": 4}, hovertemplate="step %{x}<br>gradient norm %{y:.4g}<extra></extra>",
                                 xaxis="x2", yaxis="y2", legend="legend2"))
    loss_at = {s: v for s, v in zip(steps, r.losses) if v is not None and math.isfinite(v)}
    known = sorted(loss_at)
    by_kind: dict[str, list[Any]] = {}
    for a in r.alerts:
        by_kind.setdefault(a.kind, []).append(a)
    for kind, alerts in by_kind.items():
        ys = []
        for a in alerts:  # on the loss line: the alert's step, else the nearest step with a finite loss
            near = min(known, key=lambda s: abs(s - a.step)) if known else None
            ys.append(loss_at.get(a.step, loss_at[near] if near is not None else 0.0))
        traces.append(go.Scatter(
            x=[a.step for a in alerts], y=ys, mode="markers", name=f"alert: {kind} ({len(alerts)})",
            marker={"symbol": "x", "size": 11, "color": ALERT_COLOURS.get(kind, "#cf222e"), "line": {"width": 1}},
            hovertext=[f"<b>step {a.step}: {a.kind}</b> in {_wrap(a.layer)}" + (f" ({a.phase})" if a.phase else "")
                       + f"<br>{_wrap(a.message)}<br><i>fix:</i> {_wrap(a.suggestion)}" for a in alerts],
            hoverinfo="text", legend="legend"))
    return traces


def monitor_figure(r: Any) -> Any:
    """The figure as a ``plotly.graph_objects.Figure`` (see the module docstring)."""
    import plotly.graph_objects as go

    bounds = r.bounds
    panels = panels_for(r) if r.history else []
    names = _layer_names(r)
    picked = _picked(r, names)
    fig = go.Figure(_timeline(go, r) + _layer_traces(go, r, picked, panels))
    n = 2 + len(panels)
    weights = [1.0, 0.7] + [1.0] * len(panels)
    gap = 0.035 if n > 3 else 0.06
    unit = (1 - gap * (n - 1)) / sum(weights)
    domains, y = [], 1.0
    for w in weights:
        domains.append((max(0.0, y - w * unit), min(1.0, y)))
        y -= w * unit + gap
    titles = ["loss", "gradient norm"] + [t for _, t, _, _ in panels]
    # a log scale for the loss unless some loss is <= 0 (NaN/Inf losses are not drawn)
    logs = [not any(v is not None and v <= 0 for v in r.losses), True] + [log for _, _, log, _ in panels]
    layout: dict[str, Any] = {
        "height": int(PANEL_HEIGHT * sum(weights)) + 120, "template": "plotly_white", "hovermode": "closest",
        "margin": {"l": 80, "r": 260, "t": 30, "b": 50}, "hoverlabel": {"align": "left", "font": {"size": 12}},
        "font": {"size": 12}}
    for i in range(n):
        k = "" if i == 0 else str(i + 1)
        bottom = i == n - 1
        layout[f"yaxis{k}"] = {"domain": domains[i], "title": {"text": titles[i], "font": {"size": 12}},
                               "type": "log" if logs[i] else "linear", "exponentformat": "power",
                               **({"range": [0, 100]} if not logs[i] else {})}
        layout[f"xaxis{k}"] = {"anchor": f"y{k}", "showticklabels": True, **({"matches": "x"} if i else {}),
                               **({"title": {"text": "training step"}} if bottom else {})}
        if bottom and len(r.steps) > 50:
            layout[f"xaxis{k}"]["rangeslider"] = {"visible": True, "thickness": 0.04}
    for i, k in ((0, ""), (1, "2"), (2, "3")):
        if i < n:
            layout[f"legend{k}"] = {"x": 1.01, "xanchor": "left", "y": domains[i][1], "yanchor": "top",
                                    "font": {"size": 11}, "bgcolor": "rgba(255,255,255,0)",
                                    **({"title": {"text": f"layers ({len(picked)} of {len(names)})"}}
                                       if i == 2 else {})}
    fig.update_layout(layout)
    if panels:  # the band the verdict judges the relative gradient by
        lo, hi = bounds
        fig.add_shape(type="rect", xref="x3 domain", x0=0, x1=1, yref="y3", y0=lo, y1=hi, fillcolor=BAND_COLOUR,
                      line={"width": 0}, layer="below", showlegend=True, legend="legend3",
                      name=f"healthy band [{lo:g}, {hi:g}] (layer gradients)")
    for s in sorted({a.step for a in r.alerts})[:200]:  # each alert's step through every panel
        fig.add_shape(type="line", xref="x", x0=s, x1=s, yref="paper", y0=0, y1=1, layer="below",
                      line={"color": "rgba(207,34,46,0.3)", "width": 1})
    return fig
