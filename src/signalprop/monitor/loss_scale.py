"""Training under a ``torch.amp.GradScaler`` (``monitor(..., scaler=)``).

Loss scaling multiplies the loss by the scaler's scale S (65536 to start)
before the backward, so every gradient the backward computes is S times the
true one, and the scaler raises S until the scaled gradients overflow
float16: then it skips that optimizer step and halves S.  An overflow is the
scaler doing its job, not a divergence.  Given the scaler, the monitor

* reads S in the step's one host transfer (its tensor, no extra sync) and
  divides the per-layer gradient statistics by it -- the backward's always,
  the parameters' gradients unless ``scaler.unscale_(optimizer)`` already
  did (per optimizer where the monitor knows them: ``optimizer=``,
  ``skip=``; with several optimizers on one scaler and only some unscaled,
  pass the one this model trains) -- so history, TensorBoard and the
  verdicts see true gradients whatever S is at the moment;
* calls non-finite gradients at a finite loss a **loss-scale overflow**:
  no alert, the step is listed in ``scaler_skipped`` and its sample has no
  verdict.  Only at ``S < 1``, where no loss scaling is left to blame, are
  they the ``non-finite`` alert they are without a scaler -- the scaler
  halves S at every overflow, so gradients that are non-finite at any scale
  reach it after ``log2(S) + 1`` skipped steps (17 from the default), while the
  weights are kept safe by the skips;
* knows the optimizer step that follows a step was skipped when S fell
  between the two ``step()`` calls (the scaler lowers S only after a skipped
  step) and this model's sampled weights did not change at all (one scaler
  shared by a GAN's two optimizers falls when either skips), also on steps
  whose gradients it does not read: that step's update (the relative
  update, the update after a sample) is not measured, rather than measured
  as 0 ("the weights barely moved");
* leaves the gradients' float16 headroom to the scaler (it probes the limit
  by design); the activations' headroom is judged as before.

Call ``step()`` after ``scaler.scale(loss).backward()`` (and
``scaler.unscale_(optimizer)`` if the loop clips) and before
``scaler.step(optimizer)``, as without a scaler before ``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def scale_of(scaler: Any) -> torch.Tensor | None:
    """A GradScaler's scale as a 0-d tensor on its device (no host sync), or
    None: no scaler, a disabled one, one that has not scaled yet, or one of
    another make (whose ``get_scale()`` would synchronise)."""
    if scaler is None or not callable(getattr(scaler, "is_enabled", None)) or not scaler.is_enabled():
        return None
    s = getattr(scaler, "_scale", None)
    return s.detach().reshape(-1)[0] if isinstance(s, torch.Tensor) else None


def check_scaler(scaler: Any) -> None:
    if not (callable(getattr(scaler, "get_scale", None)) and callable(getattr(scaler, "is_enabled", None))):
        raise TypeError(f"scaler takes the torch.amp.GradScaler that scales this run's loss (it has get_scale() and "
                        f"is_enabled()), got {type(scaler).__name__}")


class LossScale:
    """The scale of one ``GradScaler`` as the monitor reads it at each step."""

    def __init__(self, scaler: Any) -> None:
        check_scaler(scaler)
        self.scaler = scaler
        self.last: float | None = None  # the scale read at the previous step()

    def tensor(self) -> torch.Tensor | None:
        """The scale as a tensor on its device (read with the step's other
        values), or None: a disabled scaler, or one that has not scaled yet."""
        return scale_of(self.scaler)

    def unscaled(self, optimizers: Sequence[Any]) -> Callable[[Any], bool]:
        """Which parameters' gradients ``unscale_`` has already divided by the
        scale since this step's backward (the scaler's stage per optimizer):
        a parameter of one of the known ``optimizers`` if that optimizer was
        unscaled; any other parameter if an optimizer not known here was
        (with none known: every parameter once any optimizer was)."""
        states = getattr(self.scaler, "_per_optimizer_states", None)
        done = {i for i, s in states.items() if isinstance(s, dict)
                and getattr(s.get("stage"), "name", None) == "UNSCALED"} if isinstance(states, dict) else set()
        if not done:
            return lambda p: False
        known = {id(o): o for o in optimizers if o is not None}
        mine = {p for i, o in known.items() if i in done for g in o.param_groups for p in g["params"]}
        held = {p for o in known.values() for g in o.param_groups for p in g["params"]}
        others = bool(done - known.keys())
        return lambda p: p in mine or (others and p not in held)

    def skipped(self, scale: float | None, moved: float | None) -> bool:
        """Whether the scaler skipped this model's optimizer step before this
        read: the scale fell since the previous read (the scaler lowers it only
        after a step it skipped) and the model's sampled weights did not move
        (``moved``, the relative update over that step: 0 or unknown) -- a
        scaler shared with another model's optimizer falls when either skips.
        Remembers ``scale`` for the next read."""
        last, self.last = self.last, scale
        return scale is not None and last is not None and scale < last and not moved
