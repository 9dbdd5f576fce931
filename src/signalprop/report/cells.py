"""How the HTML reports show a row's values: the table's columns, one cell,
and the hover text of a row in the interactive figures."""

from __future__ import annotations

import html
from typing import Any

from ..records import LayerStats
from ..statistics import STATISTICS

VERDICT_COLOURS = {"healthy": "#1a7f37", "vanishing": "#9a6700", "exploding": "#cf222e", "non-finite": "#a40e26",
                   "saturated": "#8250df", "dead": "#0969da"}
# (attribute, column title, how to show it): the units the terminal uses
COLUMNS = [("index", "#", "int"), ("name", "layer", "text"), ("kind", "kind", "text"),
           ("forward_second_moment", "E[y²]", "num"), ("predicted_second_moment", "E[y²] theory", "num"),
           ("grad_rms", "gradient RMS", "num"), ("predicted_grad_rms", "gradient RMS theory", "num"),
           ("relative_grad_rms", "gradient RMS / output's", "num"), ("param_grad_rms", "parameter gradient RMS", "num"),
           ("grad_to_weight", "‖grad‖ / ‖weight‖", "num"), ("saturation", "saturated", "pct"),
           ("dead_fraction", "dead units", "pct")]
# measured on every row but left out of the table for width; the hover shows them
_HOVER_ONLY = [("forward_mean", "mean", "num"), ("forward_var", "Var[y]", "num"),
               ("forward_gain", "forward gain (E[y²] / previous row's)", "num"),
               ("backward_gain", "backward gain (previous row's gradient² / this row's)", "num"),
               ("nonfinite_fraction", "non-finite outputs", "pct"),
               ("grad_nonfinite_fraction", "non-finite gradient", "pct")]


def columns() -> list[tuple[str, str, str]]:
    """:data:`COLUMNS`, then every declared statistic that has no field of its
    own in ``LayerStats`` (max |y|, max |gradient|, ...), then the verdict."""
    extra = [(s.name, s.label, s.fmt) for s in STATISTICS
             if s.name not in LayerStats.__dataclass_fields__ and s.table and s.phase != "update"]  # check takes no step
    return [*COLUMNS, *extra, ("verdict", "verdict", "verdict")]


def cell(v: Any, how: str) -> str:
    """One value as the tables show it (HTML-escaped; "-" where not measured)."""
    if v is None:
        return "-"
    if how == "pct":
        return f"{v:.0%}"
    if how == "num" and isinstance(v, float):
        return f"{v:.3g}"
    if how == "verdict":
        return f"<span class='v' style='color:{VERDICT_COLOURS.get(v, '#000')}'>{html.escape(v)}</span>"
    return html.escape(str(v))


def hover_text(layer: LayerStats, extra: str = "") -> str:
    """A row's hover label: its module name, kind and verdict, then every value
    measured on it (plotly's label markup: ``<b>``, ``<br>``)."""
    def esc(s: str) -> str:
        return html.escape(s, quote=False)  # a label, not an attribute: quotes stay readable

    head = (f"<b>{esc(layer.name or '(root)')}</b> · {esc(layer.kind)} · row {layer.index}<br>"
            f"verdict: <b>{esc(layer.verdict)}</b>")
    if layer.activation:
        head += f" · activation {esc(layer.activation)}"
    if layer.shape:
        head += f" · output {tuple(layer.shape)}"
    skip = {"index", "name", "kind", "verdict"}
    lines = [f"{esc(title)}: {cell(getattr(layer, attr), how)}"
             for attr, title, how in [*columns(), *_HOVER_ONLY]
             if attr not in skip and getattr(layer, attr) is not None]
    return head + (f"<br>{extra}" if extra else "") + "<br>" + "<br>".join(lines)
