"""Rich terminal rendering of a check Report: problems first, then the layer table."""

from __future__ import annotations

import io
import os
import shutil
import sys
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_STYLE = {"healthy": "green", "vanishing": "yellow", "exploding": "red", "non-finite": "bold red",
          "saturated": "magenta", "dead": "cyan"}
MAX_ROWS = 60  # longer reports show the first and last rows and the unhealthy ones between
EDGE_ROWS = 10  # rows always shown at each end of a long table
MAX_GAPS = 6  # more separate elided stretches than this: the middle collapses into one line
NON_TTY_WIDTH = 100  # when output is not a terminal and COLUMNS is unset


def terminal_width() -> int:
    """The real terminal's width; ``COLUMNS`` when set; a sane default for
    pipes and files."""
    if "COLUMNS" in os.environ:
        try:
            return max(40, int(os.environ["COLUMNS"]))
        except ValueError:
            pass
    if sys.stdout.isatty():
        return max(40, shutil.get_terminal_size((NON_TTY_WIDTH, 24)).columns)
    return NON_TTY_WIDTH


def shown_rows(layers: Any) -> list[int | tuple[int, int, int]]:
    """Row indices to print, with ``(start, stop, unhealthy)`` for each
    elided stretch: every row when short; else the first and last
    EDGE_ROWS, and between them the unhealthy rows when that stays short
    and in few stretches -- otherwise one line for the whole middle."""
    n = len(layers)
    if n <= MAX_ROWS:
        return list(range(n))
    head, tail = list(range(EDGE_ROWS)), list(range(n - EDGE_ROWS, n))
    middle = [i for i in range(EDGE_ROWS, n - EDGE_ROWS) if layers[i].verdict != "healthy"]
    keep = head + middle + tail
    gaps = sum(1 for a, b in zip(keep, keep[1:]) if b != a + 1)
    if len(keep) > MAX_ROWS or gaps > MAX_GAPS:
        keep = head + tail
    out: list[int | tuple[int, int, int]] = []
    for a, b in zip(keep, keep[1:] + [n]):
        out.append(a)
        if b > a + 1:
            out.append((a + 1, b, sum(1 for i in range(a + 1, b) if layers[i].verdict != "healthy")))
    return out


def _g(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.0%}"


def renderable(report: Any, width: int | None = None) -> Group:
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
    parts.append(layer_table(report, width))
    if report.summary.theory and (width or terminal_width()) < THEORY_MIN_WIDTH:
        parts.append(Text(f"(theory columns hidden below {THEORY_MIN_WIDTH} columns: widen the terminal, "
                          "or read predicted_* in --json)", style="dim"))
    if report.spectrum:
        sp = report.spectrum
        parts.append(Text(f"Jacobian ({sp.method}): singular values {sp.min_singular_value:.3g} .. "
                          f"{sp.max_singular_value:.3g}, mean square {sp.mean_squared_singular_value:.3g}; "
                          f"{sp.reading}"))
    return Group(*parts)


THEORY_MIN_WIDTH = 112  # narrower terminals hide the two theory columns (and say so)


def layer_table(report: Any, width: int | None = None) -> Table:
    theory = report.summary.theory and (width or terminal_width()) >= THEORY_MIN_WIDTH
    t = Table(title="layers (execution order)", show_lines=False, header_style="bold", box=box.SIMPLE_HEAD,
              padding=(0, 1), pad_edge=False, show_edge=False)
    cols = ["#", "name", "kind", "E\\[y^2]", *(["theory"] if theory else []), "grad RMS",
            *(["theory"] if theory else []), "param grad", "sat", "dead", "verdict"]
    for c in cols:
        text = c in ("name", "kind", "verdict")
        # text columns wrap (fold) when the terminal is narrow; numbers keep their width, never cropped
        t.add_column(c, justify="left" if text else "right", overflow="fold",
                     min_width=(10 if c == "verdict" else None) if text else (4 if c in ("sat", "dead", "#") else 8))
    layers = report.layers
    elided: list[str] = []
    for item in shown_rows(layers):
        if isinstance(item, tuple):
            a, b, bad = item
            t.add_row("…", "…", *[""] * (len(cols) - 2))
            elided.append(f"{a} .. {b - 1} ({b - a} rows, " + (f"{bad} not healthy)" if bad else "all healthy)"))
            continue
        layer = layers[item]
        t.add_row(str(layer.index), layer.name, layer.kind, _g(layer.forward_second_moment),
                  *([_g(layer.predicted_second_moment)] if theory else []), _g(layer.grad_rms),
                  *([_g(layer.predicted_grad_rms)] if theory else []), _g(layer.param_grad_rms),
                  _pct(layer.saturation), _pct(layer.dead_fraction),
                  Text(layer.verdict, style=_STYLE.get(layer.verdict, "")))
    if elided:
        t.caption = f"rows not shown: {'; '.join(elided)} -- every row is in --json / to_dict()"
    return t


def render_text(report: Any, width: int | None = None) -> str:
    """The report as plain text, ``width`` columns wide (default: the
    terminal's, or COLUMNS, or 100 when not a terminal)."""
    width = width or terminal_width()
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(renderable(report, width))
    return buf.getvalue()
