"""Rich terminal rendering of a check Report: problems first, then the layer table."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_STYLE = {"healthy": "green", "vanishing": "yellow", "exploding": "red", "non-finite": "bold red",
          "saturated": "magenta", "dead": "cyan"}
MAX_ROWS = 60  # longer reports show the first and last rows and every unhealthy one


def _g(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.0%}"


def renderable(report: Any) -> Group:
    head = Text.assemble(("verdict: ", "bold"), (report.verdict, _STYLE.get(report.verdict, "")))
    s = report.summary
    facts = [f"{s.rows} rows", s.backprop]
    if s.first_last_grad_ratio is not None:
        facts.append(f"relative grad RMS first/last of {s.param_layers} repeated {s.first_layer} .. "
                     f"{s.last_layer} = {s.first_last_grad_ratio:.3g} "
                     f"({s.geometric_mean_backward_gain:.3g}x per layer)")
    parts: list[Any] = [head, Text("; ".join(f for f in facts if f), style="dim")]
    parts += [Text(f"note: {n}", style="dim") for n in s.notes]
    for p in report.problems:
        parts.append(Panel(Text.assemble((p.message, ""), ("\nfix: ", "bold"), (p.suggestion, "")),
                           title=p.kind, border_style=_STYLE.get(p.kind, "")))
    parts.append(layer_table(report))
    if report.spectrum:
        sp = report.spectrum
        parts.append(Text(f"Jacobian ({sp.method}): singular values {sp.min_singular_value:.3g} .. "
                          f"{sp.max_singular_value:.3g}, mean square {sp.mean_squared_singular_value:.3g}; "
                          f"{sp.reading}"))
    return Group(*parts)


def layer_table(report: Any) -> Table:
    theory = report.summary.theory
    t = Table(title="layers (execution order)", show_lines=False, header_style="bold")
    cols = ["#", "name", "kind", "E\\[y^2]", *(["theory"] if theory else []), "grad RMS",
            *(["theory"] if theory else []), "param grad", "sat", "dead", "verdict"]
    for c in cols:
        t.add_column(c, justify="right" if c not in ("name", "kind", "verdict") else "left")
    layers = report.layers
    show = set(range(len(layers)))
    if len(layers) > MAX_ROWS:
        show = set(range(10)) | set(range(len(layers) - 10, len(layers))) | {
            i for i, l in enumerate(layers) if l.verdict != "healthy"}
        show = set(sorted(show)[:MAX_ROWS])
    prev = -1
    for i, l in enumerate(layers):
        if i not in show:
            continue
        if i != prev + 1:
            t.add_row("...", *[""] * (len(cols) - 1))
        prev = i
        t.add_row(str(l.index), l.name, l.kind, _g(l.forward_second_moment),
                  *([_g(l.predicted_second_moment)] if theory else []), _g(l.grad_rms),
                  *([_g(l.predicted_grad_rms)] if theory else []), _g(l.param_grad_rms),
                  _pct(l.saturation), _pct(l.dead_fraction),
                  Text(l.verdict, style=_STYLE.get(l.verdict, "")))
    return t


def render_text(report: Any, width: int = 120) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(renderable(report))
    return buf.getvalue()
