"""Rich terminal rendering of a check Report: problems first, then the layer table."""

from __future__ import annotations

import io
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..words import module_label
from .layout import GAP, fit_columns, shorten_name, terminal_width, wrap_widths

STYLE = {"healthy": "green", "vanishing": "yellow", "exploding": "red", "non-finite": "bold red",
          "saturated": "magenta", "dead": "cyan"}
MAX_ROWS = 60  # longer reports show the first and last rows and the unhealthy ones between
EDGE_ROWS = 10  # rows always shown at each end of a long table
MAX_GAPS = 6  # more separate elided stretches than this: the middle collapses into one line


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


def summary_facts(report: Any) -> list[str]:
    """The report's one-line facts in words: how many module calls, what the
    backward pass started from, and the longest repeated series' gradient
    ratio (first over last)."""
    s = report.summary
    facts = [f"{s.rows} module calls", f"backward from {s.backprop}"]
    if s.first_last_grad_ratio is not None:
        kinds = {layer.name: layer.kind for layer in report.layers}
        a, b = module_label(s.first_layer, kinds.get(s.first_layer)), module_label(s.last_layer,
                                                                                     kinds.get(s.last_layer))
        facts.append(f"over {s.param_layers} repeated {kinds.get(s.first_layer, 'weight')} layers the gradient's "
                     f"RMS at the first ({a}) is {s.first_last_grad_ratio:.3g}x that at the last ({b}), "
                     f"{s.geometric_mean_backward_gain:.3g}x per layer")
    return facts


def renderable(report: Any, width: int | None = None, surface: str = "python") -> Group:
    """The report for a terminal ``width`` columns wide (default: see
    :func:`terminal_width`): the verdict, the problems, the layer table
    (see :func:`layer_table` for what gives way at narrow widths), the
    Jacobian reading.  Free text wraps at spaces.  ``surface``: whom the
    fixes address -- ``"python"`` (calls such as ``critical_(model,
    inputs)``) or ``"cli"`` (``signalprop check``'s flags, ``--init
    critical``; see :meth:`signalprop.records.Problem.fix`)."""
    width = width or terminal_width()
    head = Text.assemble(("verdict: ", "bold"), (report.verdict, STYLE.get(report.verdict, "")))
    s = report.summary
    parts: list[Any] = [head, Text("; ".join(f for f in summary_facts(report) if f), style="dim")]
    parts += [Text(f"note: {n}", style="dim") for n in s.notes]
    for p in report.problems:
        parts.append(Panel(Text.assemble((p.message, ""), ("\nfix: ", "bold"), (p.fix(surface), "")),
                           title=p.kind, border_style=STYLE.get(p.kind, "")))
    table, left_out = layer_table_and_fit(report, width)
    parts.append(table)
    if left_out:
        parts.append(Text(f"(not shown at {width} columns: {', '.join(left_out)}; widen the terminal, "
                          "or read every column in --json / to_dict())", style="dim"))
    if report.spectrum:
        sp = report.spectrum
        parts.append(Text(f"Jacobian ({sp.method}): singular values {sp.min_singular_value:.3g} .. "
                          f"{sp.max_singular_value:.3g}, mean square {sp.mean_squared_singular_value:.3g}; "
                          f"{sp.reading}"))
    return Group(*parts)


# the two theory columns, headed "theory" beside their measurement; named in full when left out
_THEORY_FWD, _THEORY_GRAD = "E[y^2] theory", "grad RMS theory"


def _drop_order(report: Any) -> list[str]:
    """The columns left out when the table is too wide, first to go first:
    the two theory predictions, the parameter gradient RMS (shown, never
    judged), the dead and saturated shares, the module's class, the forward
    second moment.  The dead and saturated shares go last when a row is
    judged dead or saturated: they are the evidence.  The row number, the
    name, the gradient RMS and the verdict always stay; names are
    abbreviated (``m.l.11.s.q_proj``, see
    :func:`signalprop.report.layout.shorten_name`) only when those four
    alone do not fit."""
    order = [_THEORY_FWD, _THEORY_GRAD, "param grad", "dead", "sat", "kind", "E[y^2]"]
    verdicts = {layer.verdict for layer in report.layers}
    for col, verdict in (("sat", "saturated"), ("dead", "dead")):
        if verdict in verdicts:
            order.remove(col)
            order.append(col)
    return order


def layer_table(report: Any, width: int | None = None) -> Table:
    """The layer table, ``width`` columns wide at most: see
    :func:`layer_table_and_fit`."""
    return layer_table_and_fit(report, width)[0]


def layer_table_and_fit(report: Any, width: int | None = None) -> tuple[Table, list[str]]:
    """The layer table no wider than ``width`` (default: the terminal's) and
    the headers of the columns left out to fit it (in :func:`_drop_order`;
    the theory columns exist only when the report has predictions).  No
    cell is cut or wrapped: a name is always whole on one line unless even
    the four essential columns do not fit."""
    width = width or terminal_width()
    theory = bool(report.summary.theory)
    heads = ["#", "name", "kind", "E[y^2]", *([_THEORY_FWD] if theory else []), "grad RMS",
             *([_THEORY_GRAD] if theory else []), "param grad", "sat", "dead", "verdict"]
    layers = report.layers
    rows: list[list[str]] = []
    elided: list[str] = []
    for item in shown_rows(layers):
        if isinstance(item, tuple):
            a, b, bad = item
            rows.append(["…", "…", *[""] * (len(heads) - 2)])
            elided.append(f"{a} .. {b - 1} ({b - a} rows, " + (f"{bad} not healthy)" if bad else "all healthy)"))
            continue
        layer = layers[item]
        rows.append([str(layer.index), layer.name, layer.kind, _g(layer.forward_second_moment),
                     *([_g(layer.predicted_second_moment)] if theory else []), _g(layer.grad_rms),
                     *([_g(layer.predicted_grad_rms)] if theory else []), _g(layer.param_grad_rms),
                     _pct(layer.saturation), _pct(layer.dead_fraction), layer.verdict])
    shown = ["theory" if h in (_THEORY_FWD, _THEORY_GRAD) else h for h in heads]
    natural = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(shown)]
    fit = fit_columns(natural, width, drop=[heads.index(h) for h in _drop_order(report) if h in heads],
                      shorten=heads.index("name"))
    t = Table(title="layers (execution order)", show_lines=False, header_style="bold", box=box.SIMPLE_HEAD,
              padding=(0, GAP - 1, 0, 0), pad_edge=False, show_edge=False)
    for i, w in zip(fit.keep, fit.widths):
        text = heads[i] in ("name", "kind", "verdict")
        t.add_column(Text(shown[i]), justify="left" if text else "right", no_wrap=True, overflow="ellipsis",
                     width=w, min_width=w, max_width=w)
    for r in rows:
        cells: list[Any] = []
        for i, w in zip(fit.keep, fit.widths):
            if heads[i] == "verdict":
                cells.append(Text(r[i], style=STYLE.get(r[i], "")))
            else:
                cells.append(Text(shorten_name(r[i], w) if i == fit.shortened else r[i]))
        t.add_row(*cells)
    notes = []
    if elided:
        notes.append(f"rows not shown: {'; '.join(elided)} -- every row is in --json / to_dict()")
    if fit.shortened is not None:
        notes.append(f"names abbreviated to fit {width} columns")
    if notes:
        t.caption = "; ".join(notes)
    return t, [heads[i] for i in fit.dropped]


def fitted_table(title: str, header: list[str], rows: list[list[str]], width: int | None = None, *,
                 wrap: tuple[str, ...] = (), right: tuple[str, ...] = (),
                 styles: dict[str, dict[str, str]] | None = None) -> Table:
    """A rich table of text cells no wider than ``width`` (default: the
    terminal's) unless its longest words alone are: the columns named in
    ``wrap`` wrap at spaces, their headers too (a word is never split), the
    others keep their width; ``right``: right-aligned
    columns; ``styles``: column -> {cell text: rich style}.  Markup in cells
    is shown as it is."""
    width = width or terminal_width()
    natural = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    fit = fit_columns(natural, width, wrap={header.index(h): wrap_widths(h, [r[header.index(h)] for r in rows], True)
                                            for h in wrap})
    t = Table(title=Text(title), header_style="bold", box=box.SIMPLE_HEAD, padding=(0, GAP - 1, 0, 0),
              pad_edge=False, show_edge=False)
    for i, w in zip(fit.keep, fit.widths):
        t.add_column(Text(header[i]), justify="right" if header[i] in right else "left", width=w, min_width=w,
                     max_width=w, no_wrap=header[i] not in wrap, overflow="fold")
    for r in rows:
        t.add_row(*(Text(r[i], style=(styles or {}).get(header[i], {}).get(r[i], "")) for i in fit.keep))
    return t


def render_text(report: Any, width: int | None = None) -> str:
    """The report as plain text, no line longer than ``width`` (default:
    :func:`terminal_width`)."""
    width = width or terminal_width()
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(renderable(report, width))
    return buf.getvalue()
