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

import json
import logging
import sys
import uuid
import weakref
from typing import Any

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("signalprop.integrations.transformers needs transformers: pip install 'signalprop[hf]'") from e

import torch

from ..monitor import Monitor
from ..monitor.core import check_options
from ..probe.inputs import in_own_pass

log = logging.getLogger("transformers.signalprop")


def _output_loss(out: Any) -> torch.Tensor | None:
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _json_value(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


# live callbacks by key: the Trainer's checkpoint restore rebuilds a callback from its saved arguments and
# sets its attributes; it gets the user's own instance back (see __new__), not a copy nobody holds
_LIVE: weakref.WeakValueDictionary[str, SignalpropCallback] = weakref.WeakValueDictionary()


class SignalpropCallback(TrainerCallback, ExportableState):
    """Watch the model a HuggingFace ``Trainer`` trains with :func:`signalprop.monitor`.

    ``every``, ``agc``, ``writer`` and the other keywords are the monitor's.
    After ``train()``, ``.monitor`` holds the history, the alerts and
    ``report()``.  Checkpoints carry the monitor's state
    (``TrainerState.stateful_callbacks``): ``train(resume_from_checkpoint=...)``
    continues its step count, alert baselines and alerts, in this same
    callback object; from a checkpoint saved without them, the step count
    continues from the Trainer's.
    """

    def __new__(cls, *args: Any, _key: str | None = None, **kwargs: Any) -> SignalpropCallback:
        if _key is not None:  # the Trainer restoring a checkpoint: hand back the callback it restores into
            # the callback this Trainer holds, which its restore loop is replacing: the user's own object
            # (a callback of an earlier run in the same process, still alive in a notebook, has the saved key)
            caller = sys._getframe(1)
            own = caller.f_locals.get("callback") if caller.f_code.co_name == "_load_callback_state" else None
            if isinstance(own, cls):
                return own
            live = list(_LIVE.values())
            inst = _LIVE.get(_key) or (live[0] if len(live) == 1 else None)
            if inst is not None:
                return inst
        return super().__new__(cls)

    def __init__(self, every: int = 50, *, agc: float | None = None, writer: Any = None, _key: str | None = None,
                 **monitor_kwargs: Any) -> None:
        if getattr(self, "_key", None) is not None and _key is not None:
            return  # the live callback handed back by __new__: keep it as it is
        check_options(every, agc=agc, writer=writer, who=type(self).__name__,
                      **monitor_kwargs)  # a wrong argument fails here, not in train()
        self._key = uuid.uuid4().hex
        _LIVE[self._key] = self
        self._restored: dict[str, Any] | None = None
        self.every = int(every)  # (a NumPy integer from a config: the checkpoint's values are plain)
        self.agc = agc
        self.writer = writer
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._losses: list[torch.Tensor] = []
        self._summed = False
        self._hook: Any = None

    def _keep_loss(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        # not an evaluation pass, nor signalprop's own pass through the model (the monitor replaying a NaN step
        # to locate it: its loss was taken for the next step's, whose healthy update skip= then skipped too)
        if torch.is_grad_enabled() and not in_own_pass():
            loss = _output_loss(out)
            if loss is not None:
                self._losses.append(loss.detach().float().reshape(()))
                self._summed = kwargs.get("num_items_in_batch") is not None

    def state(self) -> dict[str, Any]:
        """What the Trainer saves in a checkpoint: the arguments to rebuild
        this callback (JSON values; a ``writer`` is not saved) and the
        monitor's :meth:`~signalprop.monitor.Monitor.state_dict`."""
        return {"args": {**self._arguments(), "_key": self._key},
                "attributes": {"_restored": self.monitor.state_dict() if self.monitor is not None
                               else self._restored}}

    def _arguments(self) -> dict[str, Any]:
        """The arguments a checkpoint saves to rebuild this callback (JSON values), but its key."""
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in self.monitor_kwargs.items()}
        kwargs = {k: v for k, v in kwargs.items() if _json_value(v)}  # a process group is not saved: given again
        return {"every": self.every, "agc": self.agc, **kwargs}

    def _start(self, state: Any, model: torch.nn.Module | None, optimizer: Any = None) -> None:
        if model is None:
            raise ValueError("SignalpropCallback: the Trainer passed no model")
        # a train() that ended in an exception (an interrupt, an OOM) never reached on_train_end, for which
        # the Trainer has no event: its monitor and loss hook go before the next train() starts its own
        self._stop()
        self._losses = []
        kwargs = dict(self.monitor_kwargs)
        # fp16 training: accelerate's optimizer wrapper holds the GradScaler that scales the gradients
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and "scaler" not in kwargs:
            kwargs["scaler"] = scaler
        if optimizer is not None and "optimizer" not in kwargs and "skip" not in kwargs:
            # the statistics of the optimizer's own update (over the learning rate, Adam's second-moment lag)
            kwargs["optimizer"] = optimizer
        self.monitor = Monitor(model, self.every, writer=self.writer if state.is_world_process_zero else None,
                               agc=self.agc, **kwargs)
        self._hook = model.register_forward_hook(self._keep_loss, with_kwargs=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       **kwargs: Any) -> None:
        self._start(state, model, kwargs.get("optimizer"))
        stateful = getattr(state, "stateful_callbacks", None)
        if getattr(state, "global_step", 0) > 0:
            # resumed from a checkpoint: its saved state, read here (the Trainer restores callbacks only with
            # restore_callback_states_from_checkpoint=True, and from a list of several callbacks' states it
            # takes the first ones, the states saved when the first run began)
            saved = self._saved_state(stateful if isinstance(stateful, dict) else {})
            if saved is not None:
                self._restored = saved
            elif self._restored is None and self.monitor is not None:  # saved without this callback
                self.monitor.start_at(int(state.global_step))
        if isinstance(stateful, dict):
            self._register(stateful)

    def _register(self, stateful: dict[str, Any]) -> None:
        """An entry for this callback in the Trainer's ``stateful_callbacks``
        where its state read from a checkpoint saved without this callback
        has none (the Trainer's next save raised KeyError looking it up), or
        only another live callback's of this class (the Trainer's save then
        overwrote one callback's state with the other's): a list, to which
        each save appends every callback's state."""
        name = type(self).__name__
        entry = stateful.get(name)
        if entry is None:
            stateful[name] = self.state()
            return
        entries = entry if isinstance(entry, list) else [entry]
        keys = {e.get("args", {}).get("_key") for e in entries if isinstance(e, dict)}
        if self._key not in keys and any(_LIVE.get(k) not in (None, self) for k in keys):
            stateful[name] = [*entries, self.state()]

    def _saved_state(self, stateful: dict[str, Any]) -> dict[str, Any] | None:
        """This callback's monitor state in a checkpoint's ``stateful_callbacks``:
        the entry saved by this callback object (its key), else by a callback
        with its arguments, else any; the latest of them (the Trainer appends
        each save's states to a list when a run has several callbacks of this
        class, after the states taken when the run began)."""
        saved = stateful.get(type(self).__name__)
        entries = [e for e in (saved if isinstance(saved, list) else [saved]) if isinstance(e, dict)]
        ours = self._arguments()  # (not state(): that also copies the monitor's whole state)
        mine = [e for e in entries if e.get("args", {}).get("_key") == self._key] or \
            [e for e in entries if {k: v for k, v in e.get("args", {}).items() if k != "_key"} == ours] or entries
        states = [e.get("attributes", {}).get("_restored") for e in mine]
        return next((st for st in reversed(states) if st), None)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:  # rebuilt by a checkpoint restore after on_train_begin
            self._start(state, kwargs.get("model"), kwargs.get("optimizer"))
        assert self.monitor is not None
        if self._restored:  # the Trainer restores callbacks after on_train_begin: applied before the first step
            self.monitor.load_state_dict(self._restored)
            self._restored = None
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
        self._stop()

    def _stop(self) -> None:
        """The loss hook off the model and the monitor closed (its history stays)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None and not self.monitor._closed:
            self.monitor.close()


__all__ = ["SignalpropCallback"]
