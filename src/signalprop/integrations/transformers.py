"""``SignalpropCallback`` for the HuggingFace ``Trainer``: ``sp.monitor`` driven by its events.

::

    from signalprop.integrations.transformers import SignalpropCallback

    cb = SignalpropCallback(every=50)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    cb.monitor.report().save_html("monitor.html")

Hook points: the monitor is created in ``on_train_begin`` on the model the
Trainer trains and closed in ``on_train_end``; the step is closed in
``on_pre_optimizer_step`` (after every backward of the step, before the
optimizer).  The loss is the model output's ``loss`` (HF models return it
when the batch has labels) over the step's micro-batches: their mean, or
their sum when the Trainer passed ``num_items_in_batch`` (then each
micro-batch's loss is already divided by the whole step's token count); a
``compute_loss`` that does not go through ``outputs.loss`` leaves the loss
series empty, the rest works.  The Trainer clips gradients
(``max_grad_norm``, default 1.0) *before* ``on_pre_optimizer_step``, so the
monitor's global gradient norm is the clipped one; the per-layer gradients
of sampled steps are read during the backward pass, before clipping.
``writer``: a TensorBoard ``SummaryWriter`` for the per-layer scalars (the
Trainer's own TensorBoard callback keeps its writer private).  Alerts are
logged as warnings by the main process.

Requires ``transformers`` (``pip install 'signalprop[hf]'``), imported
when this module is.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("signalprop.integrations.transformers needs transformers: pip install 'signalprop[hf]'") from e

import torch

from ..monitor import Monitor

log = logging.getLogger("transformers.signalprop")


def _output_loss(out: Any) -> torch.Tensor | None:
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class SignalpropCallback(TrainerCallback):
    """Watch the model a HuggingFace ``Trainer`` trains with :func:`signalprop.monitor`.

    ``every``, ``agc``, ``writer`` and the other keywords are the monitor's.
    After ``train()``, ``.monitor`` holds the history, the alerts and
    ``report()``.
    """

    def __init__(self, every: int = 50, *, agc: float | None = None, writer: Any = None,
                 **monitor_kwargs: Any) -> None:
        self.every = every
        self.agc = agc
        self.writer = writer
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._losses: list[torch.Tensor] = []
        self._summed = False
        self._hook: Any = None

    def _keep_loss(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        if torch.is_grad_enabled():  # not an evaluation pass
            loss = _output_loss(out)
            if loss is not None:
                self._losses.append(loss.detach().float().reshape(()))
                self._summed = kwargs.get("num_items_in_batch") is not None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       **kwargs: Any) -> None:
        if model is None:
            raise ValueError("SignalpropCallback: the Trainer passed no model to on_train_begin")
        self.monitor = Monitor(model, self.every, writer=self.writer if state.is_world_process_zero else None,
                               agc=self.agc, **self.monitor_kwargs)
        self._hook = model.register_forward_hook(self._keep_loss, with_kwargs=True)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        loss = None
        if self._losses:
            stacked = torch.stack(self._losses)
            loss = stacked.sum() if self._summed else stacked.mean()
        self._losses = []
        new = self.monitor.step(loss)
        if state.is_world_process_zero:
            for a in new:
                log.warning("signalprop: %s", a)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self.monitor.close()


__all__ = ["SignalpropCallback"]
