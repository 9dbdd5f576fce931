"""How a module, a range of modules and a number are written in what users read.

One place for the words of every message (check's problems, the monitor's
alerts, the terminal summary), so they name things the same way:

* a module by its qualified name (``encoder.layer.0.attn``); a module whose
  name is only indices -- the unnamed children of an ``nn.Sequential`` or
  ``nn.ModuleList`` at the root (``18``, ``3.1``) -- by its class and index,
  ``Linear #18``, since "18" alone names nothing a reader can find;
* a run of such children as ``layers 0–99``; any other range by its two ends;
* the model's own code (the root, name ``""``) as "the model's own forward".

Standard library only: records, probe, monitor and report all import it.
"""

from __future__ import annotations

import math

ROOT = "the model"


def is_index_name(name: str) -> bool:
    """Whether a module name is only container indices (``"18"``, ``"3.1"``)."""
    return bool(name) and all(part.isdigit() for part in name.split("."))


def module_label(name: str, kind: str | None = None) -> str:
    """``Linear #18`` for an unnamed Sequential child, else the name itself
    (the root, ``""``, as "the model")."""
    if not name:
        return ROOT if kind is None else f"{ROOT} ({kind})"
    if kind and is_index_name(name):
        return f"{kind} #{name}"
    return name


def span_label(first: str, first_kind: str | None, last: str, last_kind: str | None) -> str:
    """A range of modules in execution order: ``layers 0–99`` when both ends
    are indices at the root, one module's label when the ends are the same,
    else ``from A to B``."""
    if first == last:
        return module_label(first, first_kind)
    if first.isdigit() and last.isdigit():
        return f"layers {first}–{last}"
    return f"from {module_label(first, first_kind)} to {module_label(last, last_kind)}"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 layer``, ``3 layers``."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


def times(x: float) -> str:
    """A factor as people write it: ``3.8e+04x`` -> ``38,000x``, ``1.22x``."""
    if not math.isfinite(x):
        return "an unbounded factor"
    if 1e3 <= x < 1e7:
        return f"{float(f'{x:.2g}'):,.0f}x"
    return f"{x:.3g}x"


def share(f: float) -> str:
    """A fraction as a percentage that a small nonzero share does not round
    to zero: ``0.031%`` (1 value in 3,200), ``12.5%``, ``100.0%``."""
    p = 100.0 * f
    return f"{p:.1f}%" if p == 0 or p >= 1 else f"{p:.2g}%"


def sci(x: float) -> str:
    """A limit as people write it: ``1e-6``, ``1e3``, ``0.5``."""
    if x > 0 and math.isfinite(x):
        e = round(math.log10(x))
        if abs(e) >= 3 and math.isclose(x, 10.0 ** e, rel_tol=1e-12):
            return f"1e{e}"
    return f"{x:g}"
