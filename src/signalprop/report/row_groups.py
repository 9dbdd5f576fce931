"""How the figures group a report's rows: a distinct label per row, the
repeated blocks, the series one line joins, and the depth trend as check's
rule measures it."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ..records import LayerStats

MIN_REPEATS = 3  # check's depth-trend rule judges a module position seen in 3 or more blocks
_BLOCK = re.compile(r"^(.*?[^.]+\.\d+)(\.|$)")


def _kind_series(layer: LayerStats) -> str:
    if layer.activation is not None:
        return "activations"
    if layer.param_grad_rms is not None:
        return "weight layers"
    return "other rows"


def _role_labels(roles: list[str]) -> dict[str, str]:
    """A legend name per role: the module name with block numbers as ``#`` and
    its class ("blocks.#.fc (Linear)"); a plain Sequential's children
    ("#") are named by class ("Linear rows"), with their shapes where two
    roles share a class."""
    parts = {r: (r.split("|") + ["", ""])[:3] for r in roles}
    kinds = [k for n, k, _ in parts.values() if n == "#"]
    out = {}
    for r, (name, kind, shape) in parts.items():
        if name == "#":
            out[r] = f"{kind} rows" + (f" ({shape})" if kinds.count(kind) > 1 else "")
        else:
            out[r] = f"{name or '(root)'} ({kind})"
    return out


def row_series(layers: Sequence[LayerStats]) -> list[tuple[str, list[LayerStats], bool]]:
    """How rows are joined into lines, as (legend name, rows, joined).

    Each module position repeated in :data:`MIN_REPEATS` or more blocks
    (``LayerStats.role``: what the depth-trend rule compares) is one line
    through its blocks; the rows in no repeated position are points, not
    joined (an embedding, a final norm and a read-out are not a sequence).
    A model without repeated positions gets one line each for its weight
    layers, its activations and its other rows.  Rows that differ by design
    -- a Linear and the activation after it, an attention's projection and
    its output -- are never on one line, so no line zig-zags between them."""
    by_role: dict[str, list[LayerStats]] = {}
    for x in layers:
        if x.role:
            by_role.setdefault(x.role, []).append(x)
    roles = {r: rows for r, rows in by_role.items() if len(rows) >= MIN_REPEATS}
    if not roles:
        kinds = [(name, [x for x in layers if _kind_series(x) == name], True)
                 for name in ("weight layers", "activations", "other rows")]
        return [k for k in kinds if k[1]]
    names = _role_labels(list(roles))
    out = [(names[r], rows, True) for r, rows in roles.items()]
    rest = [x for x in layers if x.role not in roles]
    return out + ([("other rows", rest, False)] if rest else [])


def row_labels(layers: Sequence[LayerStats]) -> list[str]:
    """One distinct label per row: the module's name ("(root)" for the model
    itself), with the call number added where a module runs more than once."""
    seen: dict[str, int] = {}
    out = []
    for layer in layers:
        name = layer.name or "(root)"
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} (call {seen[name]})")
    return out


def blocks(layers: Sequence[LayerStats]) -> list[tuple[str, int, int]]:
    """Repeated blocks as (name, first row, last row): the name's prefix up to
    its first numbered part below a named container (``blocks.3`` of
    ``blocks.3.attn.q``), kept when at least two such blocks share a
    container and a block holds several rows.  A plain ``Sequential``'s rows
    ("0", "1", ...) are single modules, not blocks."""
    keys = []
    for layer in layers:
        m = _BLOCK.match(layer.name)
        keys.append(m.group(1) if m else None)
    runs: list[tuple[str, int, int]] = []
    for i, k in enumerate(keys):
        if k is not None and runs and runs[-1][0] == k and runs[-1][2] == i - 1:
            runs[-1] = (k, runs[-1][1], i)
        elif k is not None:
            runs.append((k, i, i))
    containers: dict[str, int] = {}
    for k, _, _ in runs:
        parent = k.rsplit(".", 1)[0]
        containers[parent] = containers.get(parent, 0) + 1
    if not any(b > a for _, a, b in runs):
        return []
    return [r for r in runs if containers[r[0].rsplit(".", 1)[0]] >= 2]


def median_trend(v: Sequence[float]) -> float:
    """First-to-last change of ``v`` as check's depth-trend rule measures it
    (``signalprop.probe.diagnose``): the median ratio between neighbouring
    blocks to the power of the number of steps, so one odd block is no trend.
    > 1: larger at the first block.  A test holds it equal to the rule's."""
    steps = sorted(math.log(a / b) for a, b in zip(v, v[1:]))
    k = len(steps)
    med = steps[k // 2] if k % 2 else 0.5 * (steps[k // 2 - 1] + steps[k // 2])
    return math.exp(min(700.0, max(-700.0, med * k)))
