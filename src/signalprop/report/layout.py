"""Fitting a table into a terminal's width: which columns stay, how wide each
is, and plain fixed-width tables drawn that way.

One rule for every table the package prints (check's layer table, the
monitor's and the initializers' summaries): a column is never cut, and a
name is never split across lines.  When the natural widths do not fit,
in order: columns that may wrap (free text such as notes) wrap at spaces,
down to their longest word; then whole columns are left out, in the order
the caller gives (the caller says which, so the reader can be told); and
only when the columns that must stay still do not fit, the cells of one
column (the names) are abbreviated (:func:`shorten_name`).
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NON_TTY_WIDTH = 80  # when output is not a terminal and COLUMNS is unset: a notebook, a pipe, a log file
GAP = 2  # spaces between two columns
WRAP_COMFORT = 20  # free text is not wrapped narrower than this while a column can be left out instead
WRAP_MIN = 12  # nor narrower than this once they all are


def terminal_width() -> int:
    """The width every report printed by signalprop is made to fit:
    ``COLUMNS`` when set (at least 40); else the terminal's own width when
    standard output is a terminal; else 80 (a notebook, a pipe, a log
    file).  A report's ``__str__`` reads it when it is called, so a window
    resized between two prints is followed."""
    if "COLUMNS" in os.environ:
        try:
            return max(40, int(os.environ["COLUMNS"]))
        except ValueError:
            pass
    if sys.stdout.isatty():
        return max(40, shutil.get_terminal_size((NON_TTY_WIDTH, 24)).columns)
    return NON_TTY_WIDTH


@dataclass(frozen=True)
class Fit:
    """``keep``: the indices of the columns shown, in order; ``widths``: the
    width of each of them; ``dropped``: the indices left out; ``shortened``:
    the column whose cells are cut to its width (None when none is)."""

    keep: tuple[int, ...]
    widths: tuple[int, ...]
    dropped: tuple[int, ...]
    shortened: int | None = None


def fit_columns(natural: Sequence[int], width: int, *, drop: Sequence[int] = (),
                wrap: Mapping[int, tuple[int, int]] | None = None, shorten: int | None = None,
                gap: int = GAP) -> Fit:
    """Which columns of ``natural`` widths fit in ``width`` characters.

    ``wrap``: column -> (the width it may wrap to before any column is left
    out, the narrowest it may wrap to once they all are); ``drop``: the
    columns that may be left out, first to go first; ``shorten``: the
    column whose cells may be cut when nothing else helps (it keeps at least
    8 characters, so a table of too many mandatory columns can still exceed
    a tiny ``width``)."""
    wrap = dict(wrap or {})
    n = len(natural)
    for level in (0, 1):
        for k in range(len(drop) + 1 if level == 0 else 1):
            dropped = drop[:k] if level == 0 else drop
            keep = [i for i in range(n) if i not in dropped]
            least = [min(natural[i], wrap[i][level]) if i in wrap else natural[i] for i in keep]
            spare = width - sum(least) - gap * (len(keep) - 1)
            if spare >= 0:
                widths = list(least)
                for j, i in enumerate(keep):  # the room left goes back to the wrapping columns, in order
                    if i in wrap:
                        extra = min(spare, natural[i] - widths[j])
                        widths[j] += extra
                        spare -= extra
                return Fit(tuple(keep), tuple(widths), tuple(dropped))
    keep = [i for i in range(n) if i not in drop]
    widths = [min(natural[i], wrap[i][1]) if i in wrap else natural[i] for i in keep]
    if shorten is None or shorten not in keep:
        return Fit(tuple(keep), tuple(widths), tuple(drop))
    j = keep.index(shorten)
    rest = sum(widths) - widths[j] + gap * (len(keep) - 1)
    widths[j] = max(8, min(widths[j], width - rest))
    return Fit(tuple(keep), tuple(widths), tuple(drop), shorten if widths[j] < natural[shorten] else None)


def shorten_name(name: str, width: int) -> str:
    """A dotted module name in at most ``width`` characters, as logging
    libraries abbreviate package paths: words before the last are cut to
    their first letter, leftmost first (``model.layers.11.self_attn.q_proj``
    -> ``m.l.11.s.q_proj``), keeping block numbers and the final word; when
    that is not enough, the middle gives way to "…"."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if len(parts[i]) > 1 and not parts[i].isdigit():
            parts[i] = parts[i][0]
            if len(".".join(parts)) <= width:
                return ".".join(parts)
    short = ".".join(parts)
    tail = (width - 1) // 2
    return short[:width - 1 - tail] + "…" + (short[-tail:] if tail else "")


def wrap_words(text: str, width: int, indent: str = "") -> list[str]:
    """``text`` wrapped at spaces to ``width``; a word is never split (one
    longer than the width stands on a line of its own)."""
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False) or [indent.rstrip()]


def wrap_widths(header: str, cells: Sequence[str], header_wraps: bool = False) -> tuple[int, int]:
    """How narrow a wrapping column may become: WRAP_COMFORT before other
    columns are left out, WRAP_MIN after (never below its longest word,
    which is not split, nor its header or, when the header wraps too, the
    header's longest word)."""
    least = max([len(w) for w in header.split()] if header_wraps else [len(header)])
    least = max([least] + [len(w) for c in cells for w in c.split()])
    return max(least, WRAP_COMFORT), max(least, WRAP_MIN)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else str(v)
    return str(v)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], width: int | None = None, *,
               drop: Sequence[str] = (), wrap: Sequence[str] = (), shorten: str | None = None) -> tuple[str, list[str]]:
    """A plain fixed-width table no wider than ``width`` (unbounded when
    None), and the headers of the columns left out to fit.  Columns named
    in ``wrap`` wrap at spaces (see :func:`wrap_widths`); those in ``drop``
    are left out in that order while the rest does not fit, the ones with
    no value in any row ("-") first; the cells of ``shorten`` are
    abbreviated last."""
    cells = [[_cell(c) for c in r] for r in rows]
    cols = list(header)
    natural = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(cols)]
    if width is None:
        fit = Fit(tuple(range(len(cols))), tuple(natural), ())
    else:
        empty = [i for i, h in enumerate(cols) if cells and all(r[i] == "-" for r in cells) and h in drop]
        order = empty + [cols.index(h) for h in drop if cols.index(h) not in empty]
        fit = fit_columns(natural, width, drop=order,
                          wrap={cols.index(h): wrap_widths(h, [r[cols.index(h)] for r in cells]) for h in wrap},
                          shorten=None if shorten is None else cols.index(shorten))
    lines = [_line([cols[i] for i in fit.keep], fit.widths), _line(["-" * w for w in fit.widths], fit.widths)]
    for r in cells:
        parts = []
        for i, w in zip(fit.keep, fit.widths):
            if cols[i] in wrap:
                parts.append(wrap_words(r[i], w))
            else:
                parts.append([shorten_name(r[i], w) if i == fit.shortened else r[i]])
        for k in range(max(len(p) for p in parts)):
            lines.append(_line([p[k] if k < len(p) else "" for p in parts], fit.widths))
    return "\n".join(lines), [cols[i] for i in fit.dropped]


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return (" " * GAP).join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
