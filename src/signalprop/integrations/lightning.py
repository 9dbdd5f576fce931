"""``SignalpropCallback`` for Lightning: ``sp.monitor`` driven by the Trainer.

::

    from signalprop.integrations.lightning import SignalpropCallback

    cb = SignalpropCallback(every=50)
    trainer = lightning.Trainer(max_steps=1000, callbacks=[cb])
    trainer.fit(model, loader)
    cb.monitor.report().save_html("monitor.html")

A checkpoint carries the monitor (``state_dict``/``load_state_dict``): a
``fit(ckpt_path=...)`` continues its step count, alert baselines and alerts;
from a checkpoint saved without it, the step count continues from the
trainer's.

Hook points: the monitor is created when training starts (after the
sanity check, on the module's final device) and closed when it ends; each
micro-batch's loss is taken in ``on_before_backward`` and the step is closed
in ``on_before_optimizer_step`` -- after every backward of the step
(gradient accumulation) and after a precision plugin's ``GradScaler`` has
unscaled the gradients, before the optimizer.  With ``agc`` the gradients are
clipped there, before the optimizer uses them.  Scalars go to the trainer's
logger (a TensorBoard logger's ``SummaryWriter`` directly, any other logger
through ``log_metrics``); alerts are logged as warnings on the
``lightning.pytorch.callbacks.signalprop`` logger of rank zero.  With
several callbacks in one Trainer (``module="G"`` and ``module="D"``), each
one's tags start ``signalprop.<module>/`` instead of ``signalprop/``.

Requires ``lightning`` (``pip install 'signalprop[lightning]'``), imported
when this module is.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("signalprop.integrations.lightning needs Lightning: pip install 'signalprop[lightning]'") from e

import torch

from ..monitor import Monitor
from ..monitor.core import check_options
from ..monitor.loss_scale import scale_of
from ..records import Alert
from .tensorboard import Tagged

log = logging.getLogger("lightning.pytorch.callbacks.signalprop")


class _LoggerWriter:
    """``add_scalar``/``add_text`` onto a Lightning logger that has no
    ``SummaryWriter`` (CSV, W&B, MLflow ...): scalars of one step go out in
    one ``log_metrics`` call; text goes to the Python log."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self._step: int | None = None
        self._pending: dict[str, float] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        self._pending[tag] = float(value)

    def add_text(self, tag: str, text: str, step: int) -> None:
        log.info("%s (step %d): %s", tag, step, text)

    def flush(self) -> None:
        if self._pending:
            self.logger.log_metrics(self._pending, step=self._step)
        self._pending = {}


class SignalpropCallback(pl.Callback):
    """Watch a LightningModule during ``fit`` with :func:`signalprop.monitor`.

    ``every``, ``agc`` and the other keywords are the monitor's.  ``module``:
    the name of the submodule to watch (``"net"``) when ``training_step``
    does not call the LightningModule itself (``self(x)``) -- the monitor
    replays and measures the module whose ``forward`` runs.  ``log_scalars``:
    write the per-layer scalars to the trainer's logger.  After ``fit``,
    ``.monitor`` holds the history, the alerts and ``report()``.
    """

    def __init__(self, every: int = 50, *, agc: float | None = None, module: str | None = None,
                 log_scalars: bool = True, **monitor_kwargs: Any) -> None:
        if "writer" in monitor_kwargs:
            raise TypeError("SignalpropCallback writes to the trainer's logger; pass log_scalars=False to turn it off")
        # a wrong argument fails here, not when fit starts
        check_options(every, agc=agc, who=type(self).__name__, **monitor_kwargs)
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module takes the name of the submodule to watch (\"net\"), got {type(module).__name__}")
        if not isinstance(log_scalars, bool):
            raise TypeError(f"log_scalars must be True or False, got {log_scalars!r}")
        self.every = int(every)  # (a NumPy integer from a config: the checkpoint's values are plain)
        self.agc = agc
        self.module = module
        self.log_scalars = log_scalars
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._restored: dict[str, Any] | None = None  # a checkpoint's monitor state, applied when training starts
        self._losses: list[torch.Tensor] = []
        self._stepped = False
        self._count_pending = False  # the step count of a resumed fit, to be read at its first batch
        self._writer: Any = None
        self._logger_writer: _LoggerWriter | None = None  # the one to flush after each step
        self._watched: Any = None  # a weak reference to the module the last fit watched
        self._params: set[int] = set()  # ids of the watched module's parameters
        self._steps_it: dict[int, bool] = {}  # by optimizer id: whether it holds any of them
        self._chosen = False  # the monitor's optimizer is the one this callback found (not the user's)

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: with ``module``,
        one per watched submodule, so that callbacks watching a GAN's two
        networks share a Trainer (and a checkpoint)."""
        return type(self).__qualname__ if self.module is None else self._generate_state_key(module=self.module)

    @property
    def _legacy_state_key(self) -> Any:
        # a checkpoint saved before the key named the module holds the state under the class's name: Lightning
        # reads it from there when the key above is missing (it also warns that the callback is not present)
        return type(self).__qualname__

    def _target(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        return pl_module.get_submodule(self.module) if self.module else pl_module

    def _make_writer(self, trainer: pl.Trainer) -> Any:
        if not self.log_scalars or trainer.logger is None:
            return None
        exp = getattr(trainer.logger, "experiment", None)
        if hasattr(exp, "add_scalar") and hasattr(exp, "add_text"):
            return exp  # TensorBoardLogger's SummaryWriter (a dummy on ranks other than zero)
        return _LoggerWriter(trainer.logger)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._writer = self._make_writer(trainer)
        self._logger_writer = self._writer if isinstance(self._writer, _LoggerWriter) else None
        if self._writer is not None and self.module and \
                any(isinstance(c, SignalpropCallback) and c is not self for c in getattr(trainer, "callbacks", [])):
            self._writer = Tagged(self._writer, self.module)
        kwargs = dict(self.monitor_kwargs)
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # "16-mixed": its gradients arrive scaled
        if scaler is not None and "scaler" not in kwargs:
            kwargs["scaler"] = scaler
        target = self._target(pl_module)
        if self.monitor is not None and not self._restored and self._watched is not None and self._watched() is target:
            # a second fit of the same module (more epochs after a first fit): the monitor goes on
            self._restored = self.monitor.state_dict()
        self._watched = weakref.ref(target)
        self._params = {id(p) for p in target.parameters()}
        self._steps_it = {}
        if "optimizer" not in kwargs and "skip" not in kwargs:
            # the optimizer that trains the watched module, when one does: the update statistics it
            # makes possible (the update over the learning rate, Adam's second-moment lag)
            mine = [o for o in trainer.optimizers if self._steps(o)]
            if len(mine) == 1:
                kwargs["optimizer"] = mine[0]
        self._chosen = kwargs.get("optimizer") is not None and "optimizer" not in self.monitor_kwargs
        self.monitor = Monitor(target, self.every, writer=self._writer, agc=self.agc, **kwargs)
        if self._restored:
            self.monitor.load_state_dict(self._restored)
            self._restored = None
        else:  # resumed from a checkpoint saved without this callback's state: the trainer's count goes on,
            # read at the first batch (see on_train_batch_start)
            self._count_pending = True

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state (step count, alert baselines, alerts), saved in
        the trainer's checkpoints so that a resumed ``fit`` continues it."""
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._restored or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._stepped = False
        if self._count_pending:
            # the batches that stepped, Lightning's logging step, as it numbers this batch (global_step counts
            # every optimizer's steps, twice a batch in a GAN, where the monitor steps once).  Read here, not
            # when training starts: a checkpoint saved at a batch's end holds the count before that batch,
            # which Lightning moves on by one as it resumes (the monitor's steps were one behind its own)
            self._count_pending = False
            done = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", None)
            done = done if isinstance(done, int) else trainer.global_step
            if done > 0 and self.monitor is not None and not self.monitor.steps:
                self.monitor.start_at(done)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        scale = scale_of(getattr(trainer.precision_plugin, "scaler", None))
        # the loss arrives multiplied by the GradScaler's scale: divided on its device (no host sync)
        self._losses.append(loss.detach() / scale if scale is not None else loss.detach())

    def _steps(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` holds any of the watched module's parameters."""
        key = id(optimizer)
        if key not in self._steps_it:
            groups = getattr(optimizer, "param_groups", None) or []
            self._steps_it[key] = any(id(p) in self._params for g in groups for p in g.get("params", []))
        return self._steps_it[key]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.monitor is None or self._stepped:
            self._losses = []  # a second optimizer of the same batch: the step is already closed
            return
        if not self._steps(optimizer) and any(self._steps(o) for o in trainer.optimizers):
            # another network's optimizer (a GAN's discriminator, this callback watching the generator): the
            # step closes at the watched module's own, and the losses so far were the other network's
            self._losses = []
            return
        self._stepped = True
        if self._chosen and self.monitor.optimizer is not optimizer and self._steps(optimizer):
            # the trainer made its optimizers anew (strategy.setup_optimizers, after unfreezing a backbone): the
            # update statistics follow the one that steps now, not the abandoned one's state
            self.monitor.optimizer = optimizer
        # losses arrive divided by accumulate_grad_batches: their sum is the step's mean loss
        loss = torch.stack(self._losses).sum() if self._losses else None
        self._losses = []
        new = self.monitor.step(loss)
        if self._logger_writer is not None:
            try:
                self._logger_writer.flush()
            except Exception as e:  # the logger's own failure (a rejected name, a network error): not the run's
                self.monitor._warn("the logger failed to record this step's values; they are in the history", e,
                                   kind="the logger failed")
        if trainer.is_global_zero:
            for a in new:
                _log_alert(a)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close()


def _log_alert(a: Alert) -> None:
    log.warning("signalprop: %s", a)


__all__ = ["SignalpropCallback"]
