"""Plain fixed-width text for records that print without rich (InitSummary,
MonitorReport), made to fit the terminal's width (:func:`terminal_width`)."""

from __future__ import annotations

from typing import Any

from .layout import _cell, terminal_width, text_table, wrap_words


def _table(header: list[str], rows: list[list[Any]], width: int, **how: Any) -> list[str]:
    text, left_out = text_table(header, rows, width, **how)
    out = [text]
    if left_out:
        out += wrap_words(f"(not shown at {width} columns: {', '.join(left_out)}; every column is in to_dict())",
                          width)
    return out


def init_summary_text(s: Any, width: int | None = None) -> str:
    """What ``print(InitSummary)`` shows: per-layer choices, per-parameter
    draws, notes; no line longer than ``width`` (default: the terminal's).
    Notes and the activation wrap at spaces; when the tables are still too
    wide, columns with no value go first, then the per-layer table's kind,
    chi1, sigma_b2, scale and q*, and the per-parameter table's distribution,
    fan_out and shape; names are abbreviated only when nothing else fits."""
    width = width or terminal_width()
    parts = [f"InitSummary(scheme={s.scheme!r})"]
    if s.layers:
        parts += _table(
            ["layer", "kind", "activation", "sigma_w2", "sigma_b2", "q*", "chi1", "scale", "note"],
            [[x.name, x.kind, x.activation, x.sigma_w2, x.sigma_b2, x.q_star, x.chi1, x.scale, x.note]
             for x in s.layers], width, wrap=["activation", "note"],
            drop=["kind", "chi1", "sigma_b2", "scale", "q*"], shorten="layer")
    if s.params:
        parts += _table(
            ["parameter", "shape", "fan_in", "fan_out", "std", "distribution", "note"],
            [[p.name, p.shape, p.fan_in, p.fan_out, p.std, p.distribution, p.note] for p in s.params], width,
            wrap=["note"], drop=["note", "distribution", "fan_out", "shape"], shorten="parameter")
    if s.forward_passes:
        parts.append(f"forward passes: {s.forward_passes}")
    if s.skipped:
        parts += wrap_words("left untouched: " + ", ".join(s.skipped), width)
    for n in s.notes:
        parts += wrap_words(f"note: {n}", width)
    return "\n".join(parts)


def _steps(ks: tuple[int, ...], most: int = 12) -> str:
    """Step numbers, the first ``most`` of them and how many more."""
    return ", ".join(map(str, ks[:most])) + (f" and {len(ks) - most} more" if len(ks) > most else "")


def monitor_text(r: Any, width: int | None = None) -> str:
    """What ``print(MonitorReport)`` shows: steps seen, the alerts (each a
    heading line -- step, kind, module -- with its message and fix wrapped
    beneath it), and the sampled steps' verdicts; no line longer than
    ``width`` (default: the terminal's) unless one word is."""
    width = width or terminal_width()
    finite = [v for v in r.losses if v is not None]
    parts = ["\n".join(wrap_words(
        f"MonitorReport(model={r.model}, steps={len(r.steps)}, every={r.every}, sampled={len(r.history)}, "
        f"last loss={_cell(finite[-1]) if finite else '-'})", width))]
    if r.alerts:
        lines = [f"alerts ({len(r.alerts)}):"]
        for a in r.alerts:
            lines += wrap_words(f"step {a.step}  {a.kind}" + (f" ({a.phase})" if a.phase else "") + f"  {a.layer}",
                                width)
            lines += wrap_words(a.message, width, "    ")
            lines += wrap_words(f"fix: {a.suggestion}", width, "    ")
        parts.append("\n".join(lines))
    else:
        parts.append("no alerts")
    skips = [f"{why}: {_steps(ks)}" for why, ks in (("by skip=", r.skipped), (
        "by the GradScaler, its scaled gradients overflowing", r.scaler_skipped)) if ks]
    if skips:
        parts.append("\n".join(wrap_words("optimizer steps skipped " + "; ".join(skips), width)))
    if r.history:
        parts.append("\n".join(_table(["sampled step", "loss", "grad norm", "verdict", "problems"],
                                      [[h.step, h.loss, h.grad_norm, h.verdict, len(h.problems)] for h in r.history],
                                      width)))
        noted = [h for h in r.history if h.notes]
        if noted:  # what a sample's verdict left out; the same note at consecutive samples said once
            lines, last = [], None
            for h in noted:
                if h.notes != last:
                    for n in h.notes:
                        lines += wrap_words(f"note (step {h.step}): {n}", width)
                last = h.notes
            parts.append("\n".join(lines))
    return "\n\n".join(parts)
