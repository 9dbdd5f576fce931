"""Plain fixed-width text for records that print without rich (InitSummary)."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else str(v)
    return str(v)


def text_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width table."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def init_summary_text(s: Any) -> str:
    """What ``print(InitSummary)`` shows: per-layer choices, per-parameter draws, notes."""
    parts = [f"InitSummary(scheme={s.scheme!r})"]
    if s.layers:
        parts.append(text_table(
            ["layer", "kind", "activation", "sigma_w2", "sigma_b2", "q*", "chi1", "scale", "note"],
            [[x.name, x.kind, x.activation, x.sigma_w2, x.sigma_b2, x.q_star, x.chi1, x.scale, x.note]
             for x in s.layers]))
    if s.params:
        parts.append(text_table(
            ["parameter", "shape", "fan_in", "fan_out", "std", "distribution", "note"],
            [[p.name, p.shape, p.fan_in, p.fan_out, p.std, p.distribution, p.note] for p in s.params]))
    if s.forward_passes:
        parts.append(f"forward passes: {s.forward_passes}")
    if s.skipped:
        parts.append("left untouched: " + ", ".join(s.skipped))
    parts += [f"note: {n}" for n in s.notes]
    return "\n".join(parts)


def monitor_text(r: Any) -> str:
    """What ``print(MonitorReport)`` shows: steps seen, the alerts, and the
    sampled steps' verdicts."""
    finite = [v for v in r.losses if v is not None]
    parts = [f"MonitorReport(model={r.model}, steps={len(r.steps)}, every={r.every}, sampled={len(r.history)}, "
             f"last loss={_fmt(finite[-1]) if finite else '-'})"]
    if r.alerts:
        parts.append(text_table(["step", "kind", "layer", "message", "suggestion"],
                                [[a.step, a.kind, a.layer, a.message, a.suggestion] for a in r.alerts]))
    else:
        parts.append("no alerts")
    if r.history:
        parts.append(text_table(["sampled step", "loss", "grad norm", "verdict", "problems"],
                                [[h.step, h.loss, h.grad_norm, h.verdict, len(h.problems)] for h in r.history]))
    return "\n\n".join(parts)
