"""Monitor records as TensorBoard scalars and text.

Works with any writer that has ``add_scalar(tag, value, step)`` and
``add_text(tag, text, step)`` -- ``torch.utils.tensorboard.SummaryWriter``,
tensorboardX's -- so nothing here imports TensorBoard.  Tags are stable:
``signalprop/loss``, ``signalprop/grad_norm`` every step that has them;
``signalprop/<quantity>/<layer>`` on sampled steps for gradient RMS, gradient
RMS relative to the output's, forward second moment, saturation and dead
share; ``signalprop/update_ratio/<module>`` when an update is measured;
alerts as text under ``signalprop/alerts``.
"""

from __future__ import annotations

import math
from typing import Any

LAYER_QUANTITIES = ("grad_rms", "relative_grad_rms", "forward_second_moment", "saturation", "dead_fraction")


def _scalar(writer: Any, tag: str, value: float | None, step: int) -> None:
    if value is not None and math.isfinite(value):
        writer.add_scalar(tag, value, step)


def write_step(writer: Any, mon: Any, step: int, alerts: list[Any]) -> None:
    """What ``mon.step`` learned at ``step``."""
    _scalar(writer, "signalprop/loss", mon.losses[-1], step)
    _scalar(writer, "signalprop/grad_norm", mon.grad_norms[-1], step)
    h = mon.history[-1] if mon.history else None
    if h is not None and h.step == step:
        seen = set()
        for layer in h.layers:
            if layer.name in seen:  # a module called twice: its first call
                continue
            seen.add(layer.name)
            for q in LAYER_QUANTITIES:
                _scalar(writer, f"signalprop/{q}/{layer.name or '(root)'}", getattr(layer, q), step)
    for h in reversed(mon.history[-3:]):  # an update measured at this step belongs to a sample 2 steps back
        if h.update_ratios and h.step not in mon._written_updates:
            mon._written_updates.add(h.step)
            for name, r in h.update_ratios:
                _scalar(writer, f"signalprop/update_ratio/{name or '(root)'}", r, h.step)
    for a in alerts:
        writer.add_text("signalprop/alerts", str(a), step)
