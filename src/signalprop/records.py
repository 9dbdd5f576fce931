"""Plain, frozen records shared by every part of signalprop (stdlib only).

``probe`` and ``monitor`` produce them, ``report`` draws them, ``lab`` saves
them.  Each has ``to_dict()`` so that JSON output is one ``json.dumps`` away.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


def _clean(v: Any) -> Any:
    """JSON-safe: non-finite floats become strings ("nan", "inf", "-inf")."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else str(v)
    return str(v)


def text_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width table (records stay free of rich; ``report`` renders richly)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


@dataclass(frozen=True)
class ParamInit:
    """How one parameter (or one block of a stacked parameter) was initialized."""

    name: str
    shape: tuple[int, ...]
    fan_in: int | None
    fan_out: int | None
    std: float
    distribution: str
    note: str = ""


@dataclass(frozen=True)
class LayerInit:
    """Per-layer choices of theory-driven schemes (critical init, LSUV)."""

    name: str
    kind: str
    activation: str | None
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_star: float | None = None
    chi1: float | None = None
    scale: float | None = None
    note: str = ""


@dataclass(frozen=True)
class InitSummary:
    """What an initializer did to a model; ``print(summary)`` shows a table."""

    scheme: str
    params: tuple[ParamInit, ...] = ()
    skipped: tuple[str, ...] = ()
    layers: tuple[LayerInit, ...] = ()
    notes: tuple[str, ...] = ()
    forward_passes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def __str__(self) -> str:
        parts = [f"InitSummary(scheme={self.scheme!r})"]
        if self.layers:
            parts.append(text_table(
                ["layer", "kind", "activation", "sigma_w2", "sigma_b2", "q*", "chi1", "scale", "note"],
                [[l.name, l.kind, l.activation, l.sigma_w2, l.sigma_b2, l.q_star, l.chi1, l.scale, l.note]
                 for l in self.layers]))
        if self.params:
            parts.append(text_table(
                ["parameter", "shape", "fan_in", "fan_out", "std", "distribution", "note"],
                [[p.name, p.shape, p.fan_in, p.fan_out, p.std, p.distribution, p.note]
                 for p in self.params]))
        if self.forward_passes:
            parts.append(f"forward passes: {self.forward_passes}")
        if self.skipped:
            parts.append("left untouched: " + ", ".join(self.skipped))
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)


@dataclass(frozen=True)
class LayerStats:
    """One module call's measurements from one forward and backward pass.

    Forward statistics are over all elements of the module's (first floating)
    output; ``grad_rms`` is the RMS of d loss / d output.  Gains are ratios of
    second moments (forward) and of gradient mean squares (backward) to the
    previous row that has them, so they multiply along depth.
    """

    index: int
    name: str
    kind: str
    depth: int
    shape: tuple[int, ...]
    forward_mean: float
    forward_var: float
    forward_second_moment: float
    nonfinite_fraction: float
    grad_rms: float | None
    grad_nonfinite_fraction: float | None = None
    param_grad_rms: float | None = None
    grad_to_weight: float | None = None
    saturation: float | None = None
    dead_fraction: float | None = None
    forward_gain: float | None = None
    backward_gain: float | None = None
    predicted_second_moment: float | None = None
    predicted_grad_rms: float | None = None
    verdict: str = "healthy"

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass(frozen=True)
class Problem:
    """A finding: which layer(s), what kind, why in one line, and what to do."""

    layer: str
    kind: str
    message: str
    suggestion: str
    first: int = -1
    last: int = -1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


VERDICTS = ("healthy", "vanishing", "exploding", "saturated", "dead", "non-finite")


__all__ = ["InitSummary", "LayerInit", "LayerStats", "ParamInit", "Problem", "Report", "VERDICTS",
           "text_table"]


@dataclass(frozen=True)
class Report:
    """The result of :func:`signalprop.check`.

    ``verdict`` is one of :data:`VERDICTS`; ``layers`` has one
    :class:`LayerStats` per module call in execution order; ``problems`` the
    findings, worst first; ``summary`` the model-level numbers (first/last
    gradient ratio, mean backward gain per layer, bounds, what was
    backpropagated); ``spectrum`` the Jacobian reading when asked for.
    """

    verdict: str
    layers: tuple[LayerStats, ...]
    problems: tuple[Problem, ...]
    summary: dict[str, Any]
    spectrum: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _clean({
            "verdict": self.verdict,
            "summary": self.summary,
            "problems": [p.to_dict() for p in self.problems],
            "layers": [l.to_dict() for l in self.layers],
            "spectrum": self.spectrum,
        })

    def to_json(self, path: Any = None, indent: int = 2) -> str:
        import json

        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            from pathlib import Path

            Path(path).write_text(text)
        return text

    def save_html(self, path: Any) -> Any:
        """One self-contained HTML file with the tables and embedded plots."""
        from .report.html import save_html

        return save_html(self, path)

    def _repr_html_(self) -> str:
        from .report.html import render_html

        return render_html(self, standalone=False)

    def __str__(self) -> str:
        from .report.terminal import render_text

        return render_text(self)
