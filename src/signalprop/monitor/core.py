"""``signalprop.monitor``: check's diagnosis during training, on sampled steps.

What runs when:

* **Every step** (one forward pre-hook and one forward hook on the root
  module, one tensor hook on its output): the call's arguments are kept by
  reference (so a failing step can be replayed), the RNG state and autocast
  state are noted, and ``step(loss)`` reads the loss, the norm of every
  parameter's gradient (``torch._foreach_norm``, one fused kernel per device
  and dtype) and the gradient norm at the output in **one** host transfer.
  That is the non-finite watch and the loss/gradient-norm series.
* **Sampled steps** (``every``): check's :class:`~signalprop.probe.recorder.Recorder`
  is attached before the step's first forward and removed after it (and
  attached again for the next forward while the recorded one has fed no
  backward: the sample is of the last forward before the step's first
  backward, or of a later forward where the gradients were zeroed in
  between, as in SAM's second pass), so the
  forward and backward of that pass are measured layer by layer exactly as
  :func:`signalprop.check` measures them (same statistics, same verdict
  rules), with the real loss's gradient.  Between samples no module hook
  but the root's is installed.
* **The two steps after a sample**: when ``update_ratio`` is on, the
  modules (and the optimizer's learning rates and Adam state) are taken at
  the first step after the sample, before its optimizer step, and that
  optimizer step's ||w after - w before|| / ||w before|| of each module is
  read at the next from the sampled entries the relative update reads at
  every step (:mod:`.relative_update`; no copy of the weights), recorded
  with the sample.

When the loss or a gradient first turns non-finite, the step is replayed
from its saved arguments, RNG and autocast state with check's exact pass, so
the alert names the module where the NaN/Inf started and whether in the
forward or the backward pass -- whether or not the step was sampled.

The monitor never changes training: no random numbers are drawn from the
global generators (the replay restores them), gradients are read, not
written (unless ``agc`` is set, which is its job), modes are left alone.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
import re
import statistics
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..formats import name_of
from ..layers import own_parameters
from ..probe.attention import logits_of, output_logit_sums
from ..probe.diagnose import diagnose
from ..probe.distributed import GRAD_NORM, MEAN, NORM, SUM, Reduction, local, norm_kind, resolve_group, unwrap
from ..probe.gather import finalise, gather
from ..probe.inputs import CallArgs, ModelError, in_own_pass, tensors_of
from ..probe.norms import ParamNorms, norms
from ..probe.pipeline import (
    check_limits,
    check_materialised,
    check_model,
    frozen_note,
    initialisable,
    measured_modules,
    run_pass,
    transformed_note,
    unreached_note,
    untrained_note,
    zero_gates,
)
from ..probe.recorder import Hook, Recorder, builds_graph, model_output
from ..probe.rows import layer_stats
from ..probe.state import preserved
from ..probe.stats import Part
from ..records import FORMATS, Alert, LogitStats, MonitorReport, MonitorStep, evolve
from ..statistics import HEADROOM, MAX, STATISTICS
from ..words import count, module_label
from . import alerts as A
from . import divergence as D
from .logit_alerts import attention_closing_in, first_attention_logits, logit_alerts
from .loss_scale import LossScale
from .optimizer import SPIKE_BASELINE, UpdateBaselines, check_optimizer
from .precision_alerts import RECENT, closing_in, output_closing_in, precision_alerts
from .relative_update import RelativeUpdate
from .update import UpdateMeter, with_update

# entries of the witness parameter's .grad read for an in-place zero_grad (a prefix: zeroed means all of it)
ZERO_PROBE = 4096
MAX_REPLAY_CALLS = 64  # forward calls per step kept for replay (gradient accumulation)
# recordings a step's later forwards displaced before any backward reached them, kept until the step closes
# (see Monitor._take_fallback): a target pass and a metric pass after the training forward are two
MAX_FALLBACKS = 8
# Reading every gradient is one fused kernel on a GPU (~1% of a step) but a
# memory-bound pass on a CPU (~4% of a step of a 100 x 512 MLP on 2 cores):
# there the gradient norms are read every 4th step (and on every sampled
# step); the loss and the output's gradient are read every step.
GRAD_EVERY_CPU = 4


def grad_interval(every: int) -> int:
    """The CPU's default ``grad_every`` for samples every ``every`` steps:
    the smallest divisor of ``every`` from 4 to 6, so that the sampled
    steps, which read the gradients anyway, are among the reads (every=10:
    every 5th step, one read between samples rather than two; 11 ms of a
    10-step window of ~1.95 s on a 100 x 512 MLP), else :data:`GRAD_EVERY_CPU`."""
    return next((d for d in range(GRAD_EVERY_CPU, 7) if every % d == 0), GRAD_EVERY_CPU)


def _bad_values(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a NaN or +inf (a complex one: any non-finite
    part); -inf alone is the usual additive mask (read with a host sync:
    only while locating a NaN/Inf)."""
    if t.is_complex():
        return not bool(torch.isfinite(t).all())
    if not t.is_floating_point():
        return False
    return bool((torch.isnan(t) | (t == math.inf)).any())


class _Call:
    """One forward call of the root module during the current step."""

    __slots__ = ("args", "rng", "cuda_rng", "autocast", "out_norm", "out_numel", "extra_rng", "out_absmax",
                 "sampled", "out_graph")

    def __init__(self, args: CallArgs, rng: torch.Tensor, cuda_rng: list[tuple[int, torch.Tensor]],
                 autocast: list[tuple[str, torch.dtype]]) -> None:
        self.args = args
        self.rng = rng
        self.cuda_rng = cuda_rng
        self.autocast = autocast
        self.out_norm: torch.Tensor | None = None
        self.out_numel = 0
        self.out_absmax: torch.Tensor | None = None  # a low-precision output's largest |entry|, read every step
        self.extra_rng: dict[str, Any] | None = None  # Python's and NumPy's, when dumping (monitor.dump)
        self.sampled = False  # the call the step's sample measured (its output's gradient is the sample's)
        self.out_graph = False  # out_norm came from a backward with create_graph=True


_CALL_IMPL = nn.Module._call_impl.__code__


def _call_frame() -> Any:
    """The frame of the ``Module._call_impl`` whose hook is running (a few
    frames up), or None where torch calls hooks some other way (compiled code)."""
    f: Any = sys._getframe(2)
    for _ in range(8):
        if f is None or f.f_code is _CALL_IMPL:
            return f
        f = f.f_back
    return None


def _still_running(frames: list[Any]) -> int:
    """How many of ``frames`` (the calls entered, outermost first) are still
    on the stack: the rest were left by an exception that ran no forward
    hook (KeyboardInterrupt, SystemExit: torch's ``always_call`` hooks run
    for ``Exception`` only).  A call whose frame was not found counts as
    running."""
    on = set()
    f: Any = sys._getframe(1)
    while f is not None:
        on.add(id(f))
        f = f.f_back
    return next((i for i, fr in enumerate(frames) if fr is not None and id(fr) not in on), len(frames))


def _in_transform() -> bool:
    """Whether this runs inside a ``torch.func`` transform (vmap, grad, jacrev): a call there is a
    transform's view of the model (a Jacobian penalty), neither the step's training forward nor replayable."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _grads_have_graph(params: Any) -> bool:
    """Whether the first parameter with a ``.grad`` has one that requires grad: the loss's own
    ``backward(create_graph=True)`` filled it (the rows read theirs from their own modules' parameters:
    ``signalprop.probe.recorder._count_backward``)."""
    g = next((p.grad for p in params if p.grad is not None), None)
    return g is not None and g.requires_grad


def _witness(rows: list[Any]) -> nn.Parameter | None:
    """A trainable parameter of the recorded pass that its backward reached
    early (the last row's, nearest the output), whose ``.grad`` tells
    whether gradients were zeroed since.  A leaf only: inside
    ``torch.func.functional_call`` a module holds the tensors it was called
    with (a MAML loop's fast weights, made from the parameters), whose
    ``.grad`` torch never fills and warns about reading."""
    for r in reversed(rows):
        if r.bwd and r.module is not None:
            for p in r.module._parameters.values():
                if p is not None and p.requires_grad and p.is_leaf:
                    return p
    return None


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    out = []
    for dev in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(dev):
                out.append((dev, torch.get_autocast_dtype(dev)))
        except (RuntimeError, TypeError):  # device type unknown to this build
            continue
    return out


@contextlib.contextmanager
def _autocast(state: list[tuple[str, torch.dtype]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for dev, dtype in state:
            stack.enter_context(torch.autocast(dev, dtype=dtype))
        yield


# alerts whose step's gradients skip= keeps from the weights: a transient spike, the run giving back what it
# learned, or a NaN/Inf
SKIP_ON = ("batch-spike", "loss-spike", "grad-surge", "non-finite")
# per-step series (steps, losses, grad_norms) keep at most this many steps: the first ones (the level
# training started at, which the alerts compare with) and the most recent; ~10 MB of Python floats
MAX_SERIES = 100_000
# without max_history, the samples kept hold at most this many rows in all (a row measured ~0.9 KB: ~0.5 GB),
# and at least HISTORY_MIN samples: a 100-row model keeps 5,242 samples, one of 2,000 rows 262; unbounded, a
# monitor left on a long run grew by a sample's rows at every sample (GPT-2's ~150 rows every 10 steps: 13 GB
# over a million steps)
HISTORY_ROWS = 1 << 19
HISTORY_MIN = 64


def _format_of(autocast: list[tuple[str, torch.dtype]], params: Any) -> str | None:
    """The low-precision format a forward computes in: autocast's dtype
    (``autocast``, as :func:`_autocast_state` reads it), else a parameter's
    when one is a low-precision format (float16, bfloat16, FP8); None for
    float32/float64."""
    dtypes = [d for _, d in autocast] + list({p.dtype for p in params})
    return next((n for n in map(name_of, dtypes) if n is not None), None)


def _logit_stats(v: list[float]) -> LogitStats:
    """:class:`LogitStats` from the gathered :func:`~signalprop.probe.attention.output_logit_sums`."""
    sq, n, top, lse, positions = v
    return LogitStats(math.sqrt(sq / max(n, 1.0)), top, lse / max(positions, 1.0))


# the samples after the baseline that a saved state keeps (see Monitor.state_dict): as many as any rule
# compares a new sample with
RECENT_SAMPLES = max(SPIKE_BASELINE, RECENT + 1)


def _trainable_own(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in own_parameters(m) if p.requires_grad]


def _wrapper_islands(rows: list[Any], named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Modules that are not rows but hold trainable parameters of their own
    (an adapter's low-rank matrices on the layer it wraps, a class token)
    whose every row ran without autograd while none of those parameters got
    a gradient: the same island as a row's, one level up."""
    mods = {id(r.module) for r in rows if r.module is not None}
    out = []
    for name, m in named:
        own = _trainable_own(m) if name and id(m) not in mods else []
        if not own:
            continue
        inside = [r for r in rows if r.name.startswith(name + ".")]
        if inside and not any(r.wants_grad for r in inside) and all(p.grad is None for p in own):
            out.append((name, m))
    return out


def missing_gradients(rows: list[Any], named: list[tuple[str, nn.Module]] | None = None) -> str:
    """Why a recorded pass cannot be judged, or "": no row received a
    gradient although some required one (the pass fed no backward), or
    trainable layers ran without autograd (their gradients never exist:
    reentrant activation checkpointing recomputes them during the backward,
    outside the recorded pass).  Anywhere in the pass, the first layers too:
    a reentrantly checkpointed first block, whose input does not require
    grad, gets no gradient at all.  Layers whose parameters are all frozen
    need none.  ``named``: the model's modules, for trainable parameters held
    by modules that are not rows (:func:`_wrapper_islands`)."""
    if not any(r.wants_grad for r in rows):
        return ""  # nothing in the pass requires grad (a frozen model): nothing was missed
    if not any(r.bwd for r in rows):
        return ("no gradient reached the recorded forward pass: it did not feed this step's backward (a forward "
                "without backward, or an evaluation pass with gradients on and no training pass after it)")
    # a module whose gradient another call of this pass measured is no island: its call under no_grad was
    # besides the training one (a BYOL target computed with the online encoder, a logging probe of a layer)
    measured = measured_modules(rows)
    islands = [(r.name, r.module) for r in rows if not r.wants_grad and r.module is not None
               and id(r.module) not in measured and _trainable_own(r.module)]
    islands += _wrapper_islands(rows, named) if named is not None else []
    if not islands:
        return ""
    names = list(dict.fromkeys(n or "(root)" for n, _ in islands))
    said = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    trainable = [p for _, m in islands for p in _trainable_own(m)]
    if all(p.grad is None for p in trainable):
        return (f"{len(names)} trainable layer(s) ran without autograd and got no gradient at all ({said}), so "
                "they are not measured and do not train: a block under reentrant activation checkpointing whose "
                "input does not require grad (use torch.utils.checkpoint.checkpoint(..., use_reentrant=False)) or "
                "torch.no_grad() inside forward (freeze those layers with requires_grad_(False) if that is meant)")
    return (f"{len(names)} trainable layer(s) ran without autograd inside the forward ({said}), so their gradients "
            "cannot be measured: reentrant activation checkpointing (use torch.utils.checkpoint.checkpoint(..., "
            "use_reentrant=False)) or torch.no_grad() inside forward")


def repeated_backwards(rows: list[Any]) -> str:
    """Why a sample has no verdict when several backwards ran through its
    forward (``loss1.backward(retain_graph=True); loss2.backward()``): each
    row's statistics are of the last backward's gradient, while ``.grad``
    and the optimizer hold their sum, whose RMS no single backward's gives;
    "" otherwise.  Only backwards that fill ``.grad`` count, from its last
    zeroing on (a saliency map's ``autograd.grad`` does not; nor does a GAN's
    discriminator loss whose gradients ``zero_grad()`` cleared before the
    generator's backward): see ``Row.bwd_calls``."""
    n = max((r.bwd_calls for r in rows), default=0)
    if n < 2:
        return ""
    return (f"{n} backward passes ran through the sampled forward (backward(retain_graph=True) on several losses): "
            "each layer's gradient statistics would be the last backward's alone, while .grad and the optimizer "
            "hold their sum -- backpropagate the losses' sum once to have the step measured")


def check_options(every: int = 50, *, writer: Any = None, agc: float | None = None,
                  bounds: tuple[float, float] = (1e-6, 1e3), trend: float = 100.0, update_ratio: bool = True,
                  max_history: int | None = None, grad_every: int | None = None, group: Any = None,
                  skip: Any = None, histograms: bool = True, dump_on_nonfinite: Any = None,
                  optimizer: Any = None, loss_fn: Any = None, scaler: Any = None, tag: str | None = None,
                  who: str = "monitor",
                  **unknown: Any) -> LossScale | None:
    """The checks :class:`Monitor` makes of its arguments other than the
    model, with the same errors, and a ``TypeError`` naming ``who`` for a
    keyword the monitor does not take: the Lightning and HF callbacks make
    them when they are built, not when training starts.  Returns the
    ``scaler``'s reader (None without one)."""
    if unknown:
        takes = [n for n in inspect.signature(check_options).parameters if n not in ("who", "unknown")]
        raise TypeError(f"{who}() got an unexpected keyword argument {next(iter(unknown))!r}; the monitor's "
                        f"arguments are {', '.join(takes)}")
    # (numbers.Integral: a NumPy integer from a config or a sweep is one)
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"every must be a positive integer (sample one step in `every`), got {every!r}")
    if grad_every is not None and (isinstance(grad_every, bool) or not isinstance(grad_every, numbers.Integral)
                                   or grad_every < 1):
        raise ValueError(f"grad_every must be a positive integer or None, got {grad_every!r}")
    if agc is not None and not (isinstance(agc, (int, float)) and not isinstance(agc, bool) and agc > 0
                                and math.isfinite(agc)):
        raise ValueError(f"agc must be a positive clipping factor such as 0.01, or None; got {agc!r}")
    check_limits(bounds, trend)
    if writer is not None and not (callable(getattr(writer, "add_scalar", None))
                                   and callable(getattr(writer, "add_text", None))):
        raise TypeError(f"writer must have add_scalar(tag, value, step) and add_text(tag, text, step) (a "
                        f"TensorBoard SummaryWriter), got {type(writer).__name__}")
    if tag is not None and not (isinstance(tag, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", tag)):
        raise ValueError(f"tag takes a name for this monitor's TensorBoard section (letters, digits, '_', '.', '-'; "
                         f"its tags then start signalprop.<tag>/), got {tag!r}")
    if dump_on_nonfinite is not None and not isinstance(dump_on_nonfinite, (str, os.PathLike)):
        raise TypeError(f"dump_on_nonfinite takes a folder path, got {type(dump_on_nonfinite).__name__}")
    scale = LossScale(scaler) if scaler is not None else None  # checks it
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, targets), got {type(loss_fn).__name__}")
    if not isinstance(histograms, bool):
        raise TypeError(f"histograms must be True or False, got {histograms!r}")
    if not isinstance(update_ratio, bool):
        raise TypeError(f"update_ratio must be True or False, got {update_ratio!r}")
    if max_history is not None and (isinstance(max_history, bool) or not isinstance(max_history, numbers.Integral)
                                    or max_history <= A.BASELINE_SAMPLES):
        raise ValueError(f"max_history must be None or an integer > {A.BASELINE_SAMPLES} (the first "
                         f"{A.BASELINE_SAMPLES} samples are every layer's baseline and stay, and at least one more "
                         f"is kept), got {max_history!r}")
    if skip is not None and not callable(getattr(skip, "step", None)):
        raise TypeError(f"skip takes the optimizer whose step to skip on a spike, surge or NaN/Inf (it has a "
                        f"step() method), got {type(skip).__name__}")
    if skip is not None and isinstance(skip, (torch.optim.lr_scheduler.LRScheduler,
                                              torch.optim.lr_scheduler.ReduceLROnPlateau)):
        # (a scheduler has a step() too: skipping it would leave the weights' update alone)
        raise TypeError(f"skip takes the optimizer whose step to skip, got the learning-rate scheduler "
                        f"{type(skip).__name__}: pass its optimizer (skip=scheduler.optimizer)")
    if optimizer is not None:
        check_optimizer(optimizer, "optimizer")
    if group is not None and not (torch.distributed.is_available()
                                  and isinstance(group, torch.distributed.ProcessGroup)):
        raise TypeError(f"group takes a torch.distributed process group (dist.new_group(...), dist.group.WORLD) "
                        f"or None for the default one, got {type(group).__name__}")
    if dump_on_nonfinite is not None and os.path.exists(dump_on_nonfinite) and not os.path.isdir(dump_on_nonfinite):
        raise ValueError(f"dump_on_nonfinite takes a folder to write into, and {os.fspath(dump_on_nonfinite)!r} "
                         "is a file")
    return scale


_WRITING: weakref.WeakSet[Monitor] = weakref.WeakSet()  # open monitors with a writer: the sections in use


def _own_section(writer: Any, tag: str | None, model_name: str) -> Any:
    """``writer`` as the monitor writes to it: its tags under
    ``signalprop.<tag>/`` with ``tag`` (a :class:`~signalprop.integrations.tensorboard.Tagged`
    writer); without one under ``signalprop/``, unless another open monitor
    writes there on the same writer -- then under ``signalprop.<model class>/``
    (numbered if that is taken too), with a warning that says so: two
    monitors' losses and same-named layers would otherwise share series.  A
    ``tag`` another open monitor uses on this writer is refused."""
    from ..integrations.tensorboard import Tagged, inner, root

    base = inner(writer)
    taken = {root(m.writer) for m in list(_WRITING) if m.writer is not None and inner(m.writer) is base}
    if tag is not None:
        writer = Tagged(base, tag)
        if writer.root in taken:
            raise ValueError(f"another open monitor writes to this writer under {writer.root}: give each monitor "
                             "its own tag=")
        return writer
    if root(writer) not in taken:
        return writer
    name, k = model_name, 2
    while f"signalprop.{name}/" in taken:
        name, k = f"{model_name}{k}", k + 1
    writer = Tagged(base, name)
    warnings.warn(f"another open monitor writes to this writer under signalprop/: this one's tags start "
                  f"{writer.root} (pass tag= to name its section)", UserWarning, stacklevel=4)
    return writer


class Monitor:
    """Watches a model during training; see :func:`monitor` and the module docstring."""

    def __init__(self, model: nn.Module, every: int = 50, *, writer: Any = None, agc: float | None = None,
                 bounds: tuple[float, float] = (1e-6, 1e3), trend: float = 100.0, update_ratio: bool = True,
                 max_history: int | None = None, grad_every: int | None = None, group: Any = None,
                 skip: Any = None, histograms: bool = True, dump_on_nonfinite: Any = None,
                 optimizer: Any = None, loss_fn: Any = None, scaler: Any = None, tag: str | None = None) -> None:
        check_model(unwrap(model) if isinstance(model, nn.Module) else model, "monitor")
        check_materialised(unwrap(model).named_modules(), "monitor")
        scale = check_options(every, writer=writer, agc=agc, bounds=bounds, trend=trend, update_ratio=update_ratio,
                              max_history=max_history, grad_every=grad_every, group=group, skip=skip,
                              histograms=histograms, dump_on_nonfinite=dump_on_nonfinite, optimizer=optimizer,
                              loss_fn=loss_fn, scaler=scaler, tag=tag)
        if not any(True for _ in model.parameters()):
            raise ValueError(f"{type(model).__name__} has no parameters: nothing to monitor")
        if optimizer is None and skip is not None and isinstance(getattr(skip, "param_groups", None), list) \
                and hasattr(skip, "state"):
            optimizer = skip
        # plain ints (a NumPy integer would reach the state_dict, which is plain JSON values)
        every = int(every)
        grad_every = int(grad_every) if grad_every is not None else None
        max_history = int(max_history) if max_history is not None else None
        model = unwrap(model)  # DDP calls the module it wraps: its hooks fire, its names are the model's
        self.model = model
        self._model_name = type(model).__name__
        g = resolve_group(group)
        self.red = Reduction(g) if g is not None else None
        self.every = every
        self.writer = _own_section(writer, tag, type(model).__name__) if writer is not None else None
        self.agc = agc
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.trend = float(trend)
        self.update_ratio = update_ratio
        self.max_history = max_history
        self.optimizer = optimizer  # for the update over the learning rate and Adam's second-moment lag
        on_gpu = any(p.is_cuda for p in model.parameters())
        # with skip=, every step's gradients: a NaN gradient from a finite loss at a step that did not read them
        # would reach the weights before the next step's loss showed it
        self.grad_every = grad_every if grad_every is not None else (
            1 if on_gpu or skip is not None else grad_interval(every))
        self.history: list[MonitorStep] = []
        self._update_baselines = UpdateBaselines()  # each layer's last updates (the update-spike rule)
        self.alerts: list[Alert] = []
        self.steps: list[int] = []
        self.losses: list[float | None] = []
        self.grad_norms: list[float | None] = []
        # ||dw|| / ||w|| of the optimizer step before each step (sampled entries, monitor.relative_update)
        self.relative_updates: list[float | None] = []
        self._relative: RelativeUpdate | None = RelativeUpdate()
        self._step = 0
        self._dense_until = -1  # every step up to this one is sampled (a low-precision run closing in on its range)
        self._sampled_out_absmax: float | None = None  # the output's largest |entry| at the last sample
        self._low_format: str | None = None  # the format a sample's rows computed in under autocast entered inside forward
        self.skipped: list[int] = []  # steps whose optimizer step was skipped (skip=)
        # steps whose optimizer step the GradScaler skipped (its scaled gradients overflowed: monitor.loss_scale)
        self.scaler_skipped: list[int] = []
        self._scale = scale
        self._skip_now: int | None = None  # the step whose optimizer step skip= is to skip, until the next step()
        self._skip_opt: Any = None
        self._skip_guard: _SkipGuard | None = None
        self._replaying = False  # the monitor's own replay of a step: the root hooks stand aside
        self._mode: Any = None  # the recorder's functional-capture mode while the sampled forward runs
        self._logits: list[torch.Tensor | float] | None = None  # the sampled forward's output-logit sums
        self._warned: set[str] = set()
        self._calls: list[_Call] = []
        self._rec: Recorder | None = None
        # the recordings later forwards of the step displaced before any backward reached them (see
        # _root_pre_guarded), oldest first, each with its sampled calls and logit sums: the sample is the latest
        # whose rows got gradients where the last one's got none
        self._fallback: list[tuple[Recorder, list[_Call], Any]] = []
        self._recording = False
        self._updates = UpdateMeter(model)  # each module's update of the step after each regular sample
        self._snapshot_due: int | None = None  # a sampled step whose following update is still to measure
        # optimizer steps the skip= guard let through, and whether the step the update snapshot was taken at
        # had anything to step with: (the count then, its gradient was exactly 0 -- a loss of exactly 0, every
        # example masked out)
        self._opt_steps = 0
        self._snapshot_at: tuple[int, bool] = (0, False)
        self._nonfinite_seen = False
        self._paused = False
        # the root's calls entered and not yet left: (frame of Module._call_impl, len(_calls) at entry, the
        # exception being handled where it was called -- a call inside the loop's own except block -- or None)
        self._open: list[tuple[Any, int, BaseException | None]] = []
        self._recomputing = 0  # calls of the model during a backward that recompute the recorded forward
        # a hook on a parameter of the sampled pass, from the next forward on: a gradient arriving there while its
        # .grad is None means the sampled pass's gradient was zeroed since (it is not in this step's gradient)
        self._witness_hook: Any = None
        self._zeroed_seen = False
        self._closed_steps = 0  # steps this monitor closed (its first may have run its forward before it existed)
        self._guard_seen = 0  # _closed_steps when the skip= optimizer's step last asked (see _SkipGuard)
        # zero_grad(set_to_none=False) zeroes .grad in place: the largest |entry| of its first entries when the
        # next gradient arrives (0: zeroed), read with the step's values
        self._zero_probe: torch.Tensor | None = None
        self._last_pass = False  # sample the step's last forward that fed a backward (see _root_pre_guarded)
        self._closed = False
        self._alerted: set[tuple[str, str]] = set()
        # each attention layer's largest logit at the first sample with a verdict that measured it: the
        # growth alert's baseline, kept apart from the history, whose middle is trimmed (a layer that first
        # runs after the baseline samples -- a block added by progressive growing -- is judged against it)
        self._attn_first: dict[str, float] = {}
        self._written_updates: set[int] = set()
        self._written_skips: set[int] = set()  # scaler-skipped steps written to the writer
        self._last_scalar_alert: dict[str, int] = {}
        self._prev_gvals: dict[nn.Parameter, float] = {}
        self._cuda_devices: list[int] = []
        self._param_names: dict[nn.Parameter, str] = {}
        self._owner: dict[nn.Parameter, str] = {}
        self._modules: list[tuple[str, nn.Module]] = []
        self._opt_params = -1  # how many parameters the known optimizer's groups held at the last refresh
        self._refresh_params()
        for what, opt in (("skip", skip), ("optimizer", optimizer if optimizer is not skip else None)):
            groups = getattr(opt, "param_groups", None)
            if isinstance(groups, list) and groups and \
                    not any(p in self._param_names for g in groups for p in g.get("params", [])):
                raise ValueError(f"{what} holds none of {self._model_name}'s parameters: pass the optimizer that "
                                 "trains this model")
        # the post-hook also when the forward raises (always_call): the recording mode a sample entered for
        # the forward is left there, not at the next forward or step, so code the loop runs after catching the
        # error goes through no mode and records nothing
        # a non-finite step's replay files (monitor.dump): written once, at the first NaN/Inf
        self._dump_dir = dump_on_nonfinite
        self._dump_optimizer = optimizer if optimizer is not None else skip
        self._dump_loss_fn = loss_fn
        self._dumped: str | None = None
        self._targets: Any = None
        self._histograms: Any = None  # per-layer histograms for the writer (monitor.histograms)
        self._handles = [model.register_forward_pre_hook(Hook(self._root_pre), with_kwargs=True),
                         model.register_forward_hook(Hook(self._root_post), always_call=True)]
        try:
            self._start(histograms, writer, skip)
        except BaseException:  # a monitor that failed to start leaves no hook on the model
            self.close()
            raise

    def _start(self, histograms: bool, writer: Any, skip: Any) -> None:
        """The construction's steps after the root hooks: the recorder armed, the
        histogram tap, the skip guard on the optimizer's step (last)."""
        self._arm()
        if self.writer is not None:
            _WRITING.add(self)
        if histograms and writer is not None:
            from ..integrations.tensorboard import writes_histograms

            if writes_histograms(writer):
                from .histograms import HistogramTap

                self._histograms = HistogramTap(self)
        if skip is not None:  # last: a monitor that failed to start leaves the optimizer as it was
            self._skip_opt, self._skip_guard = skip, _SkipGuard(self, skip)

    # -- context manager -------------------------------------------------------
    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _skips(self) -> bool:
        """Whether the ``skip=`` optimizer's step now is to be skipped (once
        after an alert that calls for it: the gradients of a spike or a NaN
        never reach the weights).  The step is listed in ``skipped`` here,
        when its optimizer step is skipped: a loop that skipped it itself (a
        NaN guard, a GradScaler on overflow) never calls it, and the next
        ``step()`` drops the skip."""
        self._guard_seen = self._closed_steps
        if self._skip_now is None:
            return False
        self.skipped.append(self._skip_now)
        self._skip_now = None
        return True

    def close(self) -> None:
        """Remove every hook and drop every saved reference; history and alerts stay."""
        if self._scale is not None and self.steps and not self._closed:
            try:
                self._last_skip()
            except Exception as e:
                self._warn("the GradScaler's last step was not read", e)
        self._exit_mode()  # a sampled forward interrupted (KeyboardInterrupt) left it entered
        _WRITING.discard(self)  # its section of the writer is free for a later monitor
        self._open.clear()
        self._drop_witness()
        if self._skip_guard is not None:  # the optimizer's own step back
            self._skip_guard.remove()
            self._skip_opt = self._skip_guard = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._histograms is not None:
            tap, self._histograms = self._histograms, None
            tap.close()
            try:
                tap.flush(self.writer)  # the last sample's histograms and update
            except Exception as e:
                self._warn("the last histograms were not written", e)
        if self._rec is not None:
            self._rec.detach()
            self._rec.release()
        self._rec = None
        self._drop_fallback()
        self._calls.clear()
        self._updates.close()  # the trained modules it had found
        self.optimizer = None
        # the model (a DDP wrapper holds its process group) and the group itself: a closed
        # monitor kept alive to read its history must not keep them past destroy_process_group,
        # or the group's threads are torn down during interpreter exit (SIGABRT, seen under DDP)
        self.model = None  # type: ignore[assignment]
        self.red = None
        self._param_names.clear()
        self._owner.clear()
        self._modules.clear()
        self._prev_gvals.clear()
        self._relative = None  # its views hold every trained parameter's storage
        self._closed = True

    @property
    def sampled(self) -> bool:
        """Whether the step in progress is measured layer by layer: one step in
        ``every``, and every step for ``every`` steps after a sample found a
        module closing in on a limit: a low-precision format's largest value
        (:func:`.precision_alerts.closing_in`) or the attention-logit bound
        (:func:`.logit_alerts.attention_closing_in`)."""
        return self.regular or self._step <= self._dense_until

    @property
    def regular(self) -> bool:
        """Whether the step in progress is one of the regular samples (one in
        ``every``): those measure the update after them and write histograms."""
        return self._step % self.every == 0

    # -- hooks -----------------------------------------------------------------
    def _arm(self) -> None:
        if getattr(self.model, "_compiled_call_impl", None) is not None:
            self._warn("the model was compiled in place (model.compile()) after the monitor started: no step is "
                       "sampled from here on (compiled code runs through the hooks a sample needs)")
            return
        if self.sampled:
            if self._rec is not None:
                self._rec.detach()
            # functional capture where the model computes attention or activations by call (logits of
            # F.scaled_dot_product_attention and softmax, F.gelu rows): its mode is entered for the forward
            # (the largest |value| statistics: measured unless the root's forward starts outside any
            # low-precision format, see _root_pre_guarded)
            self._rec = Recorder(self.model, unit_vectors=self.red is not None, safe=True)
            self._rec.running = self._forward_alive
            self._rec.attach()
            self._recording = True
            for c in self._calls:  # measured anew from the next call (see _root_pre_guarded)
                c.sampled = False
            # the root's post-hook after the recorder's: a bare module is itself a row, and the recorder
            # must measure its output before the monitor detaches it (hooks run in the order registered)
            self._handles[1].remove()
            self._handles[1] = self.model.register_forward_hook(Hook(self._root_post), always_call=True)

    def _root_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._replaying or in_own_pass():
            # (signalprop's own pass through the model: sp.check inside the loop, another monitor's replay of a NaN
            # step -- no forward of the training's, and the post-hook below stands aside as this one does)
            return
        if self._rec is not None and not self._recording and self._rec.recomputing():
            # called during a backward, after the recorded forward: activation checkpointing (non-reentrant)
            # recomputing that forward -- its rows get their gradients through the original graph
            self._recomputing += 1
            return
        frame = _call_frame()
        live = _still_running([f for f, _, _ in self._open]) if self._open else 0
        try:
            if live < len(self._open):
                self._interrupted(live, args)
            self._open.append((frame, len(self._calls), sys.exc_info()[1]))
            if len(self._open) > 1:  # the model called inside its own forward: part of the outer call
                return
            self._root_pre_guarded(args, kwargs)
        except Exception as e:  # a guest in the forward: its failure skips the sample, never the step
            self._fail(e)

    def _arrives(self, p: nn.Parameter, g: torch.Tensor) -> None:
        """A gradient reaches the witness parameter: with its ``.grad`` gone
        (``zero_grad()``) since the sampled pass's backward filled it."""
        if in_own_pass():  # the backward of signalprop's own pass (sp.check in the loop): not the training's
            return
        if p.grad is None:
            self._zeroed_seen = True
        elif self._zero_probe is None and not self._zeroed_seen:
            with torch.no_grad():
                self._zero_probe = p.grad.detach().reshape(-1)[:ZERO_PROBE].abs().amax().float()

    def _drop_witness(self) -> None:
        if self._witness_hook is not None:
            self._witness_hook.remove()
            self._witness_hook = None
        self._zeroed_seen = False
        self._zero_probe = None

    def _forward_alive(self) -> bool:
        """Whether the model's outermost call is still running (True where
        the loop calls its submodules rather than the model): the recording
        mode records nothing after a KeyboardInterrupt left that call."""
        return not self._open or _still_running([self._open[0][0]]) == 1

    def _interrupted(self, live: int, args: tuple[Any, ...]) -> None:
        """An earlier call of the model never returned (a KeyboardInterrupt
        inside its forward, caught by the loop; torch ran no hook): its saved
        call, its rows and whatever the loop ran after it under the sample's
        recording are not this step's -- dropped, and this call is recorded
        in their place when the step is sampled.  ``live``: how many of the
        calls entered are still running."""
        del self._calls[self._open[live][1]:]
        del self._open[live:]
        self._exit_mode()
        if self._rec is not None and not self._open:
            self._arm()
            if self._rec is not None:
                self._rec.entered(self.model, args)

    def _root_pre_guarded(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _in_transform():
            # the model inside torch.func (a Jacobian penalty after the training forward): a transform's view,
            # which no statistic reads and no replay can repeat -- neither sampled instead nor kept as a call
            # (where every call of a step is one, the recorder armed for it counts them: see _close_step)
            return
        rec = self._rec
        if rec is not None and not self._recording and not rec.rows and not rec.transformed \
                and torch.is_grad_enabled():
            # the sampled forward recorded nothing: it raised before its first layer ran (an input check, a
            # batch of the wrong shape, caught by the loop and retried), so this one is measured in its place
            self._arm()
            if self._rec is not None:
                self._rec.entered(self.model, args)
        elif rec is not None and not self._recording and rec.rows and torch.is_grad_enabled():
            # a backward with create_graph=True through the pass (a PINN's du/dt, a gradient penalty) makes a
            # derivative the loss is built from: the pass feeds the loss, whose backward comes later, and that
            # derivative's backward fills no .grad (no witness reads it)
            derivative = any(r.bwd_graph for r in rec.rows)
            fed = derivative or any(r.bwd for r in rec.rows)
            witness = _witness(rec.rows) if fed and not self._last_pass and not derivative else None
            if not fed or self._last_pass or (witness is not None and witness.grad is None):
                # the forward recorded so far fed no backward (an evaluation pass with gradients on, a forward
                # abandoned before its backward), or its gradients were zeroed since (a GAN's generator pass
                # through this model, then this model's own step), or the step's last pass is the one sampled:
                # measure this one instead -- the sample is of the pass that trains.  Where it fed no backward
                # *yet*, it is kept: a second forward before the backward (a target computed with gradients on
                # and detached, a metric's pass) gets none, and the first is then the sample (see _close_step)
                if fed or self._last_pass:
                    self._drop_fallback()
                    keep = None
                else:
                    keep = (rec, [c for c in self._calls if c.sampled], self._logits)
                self._arm()
                if keep is not None and self._rec is not rec:  # (not where no new recording was armed)
                    self._fallback.append(keep)
                    if len(self._fallback) > MAX_FALLBACKS:
                        self._fallback.pop(0)[0].release()
                if self._rec is not None:  # attached inside the root's call: the root has entered already
                    self._rec.entered(self.model, args)
            elif witness is not None and self._witness_hook is None:
                self._witness_hook = witness.register_hook(Hook(functools.partial(self._arrives, witness)))
        self._exit_mode()  # one a forward that raised left behind
        if self._recording and torch.is_grad_enabled() and self._rec is not None:
            # the largest |value| statistics only where a low-precision format computes (autocast's dtype
            # now, or the parameters'), the only runs whose headroom rules read them
            # (under autocast entered inside the forward the first low-precision row turns them on: Recorder)
            self._rec.set_headroom(_format_of(_autocast_state(), self._param_names) is not None)
            self._mode = self._rec.functional_mode()
            if self._mode is not None:
                self._mode.__enter__()
        if not torch.is_grad_enabled():  # an evaluation pass between training steps: not this step's
            if self._recording:
                self._rec.detach()  # type: ignore[union-attr]
                self._rec, self._paused = None, True
            return
        if len(self._calls) >= MAX_REPLAY_CALLS:
            return
        self._calls.append(_Call(CallArgs(tuple(args), dict(kwargs)), torch.get_rng_state(),
                                 [(d, torch.cuda.get_rng_state(d)) for d in self._cuda_devices],
                                 _autocast_state()))
        self._calls[-1].sampled = self._recording
        if self._dump_dir is not None and not self._dumped:
            from .dump import extra_rng_state

            self._calls[-1].extra_rng = extra_rng_state()

    def _root_post(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._replaying or in_own_pass():
            return
        if self._recomputing:
            self._recomputing -= 1
            return
        if self._open:
            _, first, handling = self._open.pop()
            if self._open:  # a call inside the model's own forward returned: the outer one goes on
                return
            raised = sys.exc_info()[1]
            if out is None and raised is not None and raised is not handling:
                # the forward raised (torch runs an always_call hook with no result, inside its handler; not the
                # exception the loop was handling where it called the model): no computation of the step came
                # from it, and a replay of the step must not run it again
                del self._calls[first:]
        try:
            self._root_post_guarded(out)
        except Exception as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        """A failure of the monitor's own inside the user's forward: the
        step's sample is dropped (one warning at ``step``), training goes on."""
        if self._rec is not None:
            self._rec.errors.append(e)

    def _warn(self, what: str, e: BaseException | None = None, kind: str | None = None) -> None:
        """One warning per kind of failure (a failure that repeats every step warns once).  ``kind``: the
        failure's name without the step number ``what`` says (else each step's would be a new kind)."""
        key = (kind or what) + (type(e).__name__ if e is not None else "")
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(f"signalprop monitor: {what}" + (f" ({type(e).__name__}: {e})" if e is not None else "")
                      + "; training is unaffected", RuntimeWarning, stacklevel=3)

    def _exit_mode(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def _root_post_guarded(self, out: Any) -> None:
        self._exit_mode()
        if self._paused:  # after an evaluation pass: measure the next training forward instead
            self._paused = False
            self._arm()
            return
        if not torch.is_grad_enabled() or _in_transform():  # (a call inside torch.func: see _root_pre_guarded)
            return
        if self._recording and self._rec is not None:
            self._rec.detach()  # the step's first forward is the sampled one; its gradient hooks stay
            self._recording = False
            y = logits_of(out)
            self._logits = output_logit_sums(y) if y is not None else None
        if not self._calls:
            return
        call = self._calls[-1]
        y = model_output(out)  # the logits, not the loss a model called with labels= returns first
        if y is not None and name_of(y.dtype) is not None and call.out_absmax is None:
            with torch.no_grad():  # one reduction (no |y| copy), in low-precision runs only: the output's headroom
                call.out_absmax = torch.linalg.vector_norm(y.detach(), float("inf")).float()
        if y is not None and y.requires_grad and call.out_norm is None:
            call.out_numel = y.numel()
            mon = weakref.ref(self)  # (the graph a kept loss holds does not hold the monitor)

            def hook(g: torch.Tensor | None, call: _Call = call) -> None:
                if g is None:
                    return
                graph = builds_graph(g)
                try:  # inside the training's backward: a failure here is a missing value, never the step's
                    if call.out_graph and not graph and (m := mon()) is not None and _grads_have_graph(m._param_names):
                        return  # the loss's backward(create_graph=True) came first; this one runs through its gradients
                    with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
                        call.out_norm = torch.linalg.vector_norm(g, dtype=torch.float32 if g.dtype in (
                            torch.float16, torch.bfloat16) else g.dtype)
                    call.out_graph = graph
                except Exception:
                    call.out_norm = None

            fn = y.grad_fn
            if fn is not None:  # a pre-hook of the node that made y: after any tensor hook on y, as the rows'
                fn.register_prehook(lambda grads, nr=y.output_nr: hook(grads[nr]))
            else:
                y.register_hook(hook)

    # -- the step --------------------------------------------------------------
    def step(self, loss: Any = None, *, targets: Any = None) -> list[Alert]:
        """Close the step in progress: call after ``loss.backward()`` (all of
        them, with gradient accumulation) and before ``optimizer.step()``.
        Returns the alerts raised at this step (also appended to ``alerts``).

        Never raises into the training loop for a failure of its own: that
        becomes one warning and a skipped sample (a wrong ``loss`` argument,
        the caller's error, is still a ``TypeError``/``ValueError``).

        ``targets``: the step's targets, kept (by reference, for this step
        only) for a ``dump_on_nonfinite`` dump, so that a replay computes the
        loss as ``loss_fn(output, targets)``."""
        if self._closed:
            raise RuntimeError("this monitor is closed; create a new one with sp.monitor(model)")
        if isinstance(loss, (np.generic, np.ndarray)):  # a NumPy loss (np.float32, loss.detach().numpy()): its value
            if loss.size != 1 or loss.dtype.kind not in "fiu":
                raise TypeError(f"step() takes the scalar loss, got a NumPy {loss.dtype} of shape {loss.shape}")
            loss = float(loss.reshape(()).item()) if isinstance(loss, np.ndarray) else float(loss)
        loss_t = self._loss_scalar(loss)
        # a skip is for the optimizer step of the step that raised it: one the loop did not take (it skipped
        # that step itself) is not carried over to this step's healthy update
        self._skip_now = None
        self._targets = targets
        k = self._step
        try:
            # the measurements of a run going non-finite overflow on purpose: numpy's warnings about it are
            # not the user's (and under a warnings-as-errors filter they would abort the step's alerts)
            with np.errstate(all="ignore"):
                return self._close_step(k, loss, loss_t)
        except Exception as e:
            self._warn(f"step {k} was not measured", e, kind="a step was not measured")
            self._updates.snapshot = self._snapshot_due = None
            if len(self.steps) == len(self.losses) == len(self.grad_norms) == len(self.relative_updates) and \
                    (not self.steps or self.steps[-1] != k):
                self.steps.append(k)
                self.losses.append(None)
                self.grad_norms.append(None)
                self.relative_updates.append(None)
            self._next_step()
            return []

    def _drop_fallback(self) -> None:
        fbs, self._fallback = self._fallback, []
        for fb in fbs:
            fb[0].release()

    def _take_fallback(self, rec: Recorder | None) -> Recorder | None:
        """The step's sample: ``rec`` (the last forward recorded), or the
        latest one it and the forwards before it displaced where only that
        one's rows got gradients (``rec``'s forward fed no backward, or
        recorded nothing -- it raised before its first layer: target or
        metric passes with gradients on after the training forward)."""
        fbs, self._fallback = self._fallback, []
        pick = None
        if rec is None or not any(r.bwd for r in rec.rows):
            pick = next((fb for fb in reversed(fbs) if not fb[0].errors and any(r.bwd for r in fb[0].rows)), None)
        for fb in fbs:
            if fb is not pick:
                fb[0].release()
        if pick is None:
            return rec
        prev, calls, logits = pick
        if rec is not None:
            rec.detach()
            rec.release()
        self._rec = prev
        for c in self._calls:
            c.sampled = any(c is d for d in calls)
        self._logits = logits
        return prev

    def _next_step(self) -> None:
        self._closed_steps += 1
        self._exit_mode()
        self._open.clear()
        self._recomputing = 0
        self._drop_witness()
        self._drop_fallback()
        self._logits = None
        if self._rec is not None:
            self._rec.detach()
            self._rec.release()
        self._rec = None
        self._recording = False
        self._calls = []
        self._targets = None
        self._step += 1
        self._arm()

    def _optimizer_params(self) -> int:
        return sum(len(g["params"]) for g in self.optimizer.param_groups) if self.optimizer is not None else -1

    def _refresh_params(self) -> None:
        """The model's parameters and the module each belongs to, read anew at
        each sample and whenever the known optimizer's groups change size
        (``add_param_group``): a layer added after the monitor started is in
        the gradient norm and the non-finite watch from then on."""
        model = self.model
        self._param_names = {p: n for n, p in model.named_parameters()}
        self._modules = list(model.named_modules())  # (the walk a sample's judgement reads too)
        self._owner = {p: mn for mn, m in self._modules for p in m.parameters(recurse=False)}
        self._opt_params = self._optimizer_params()

    def _close_step(self, k: int, loss: Any, loss_t: torch.Tensor | None) -> list[Alert]:
        self._exit_mode()
        rec = self._rec
        if rec is not None and self._recording:
            # the root module's forward never ran (the loop called its submodules, as a LightningModule's
            # training_step calling self.net(x) does): what the step ran is recorded all the same
            rec.detach()
            self._recording = False
        rec = self._take_fallback(rec)
        if rec is not None and rec.errors:
            self._warn("a sample was skipped: the recorder failed", rec.errors[0])
            rec = None
        sampled = rec is not None and bool(rec.rows)
        if self.regular and not sampled and rec is not None and rec.transformed:
            self._warn(f"step {k} was due for a sample, but {self._model_name}'s forward ran inside torch.func "
                       f"transforms (vmap, grad: {rec.transformed} calls), whose per-sample views no statistic reads: "
                       "no layer is measured, only the loss and gradient norms", kind="forward inside torch.func")
        elif self.regular and not sampled and rec is not None and self._closed_steps:
            if any(p.grad is not None and p.grad.grad_fn is None for p in self._param_names) and \
                    not torch.is_inference_mode_enabled():
                # gradients reached the parameters, so a forward ran: through code that skips module hooks
                self._warn(f"step {k} was due for a sample, but none of {self._model_name}'s module hooks ran in "
                           "it although its parameters have gradients: its forward ran through code that skips "
                           "them -- a torch.compile wrapper whose code was compiled before this monitor existed "
                           "(create the monitor before the wrapper's first call) -- or was not called this step: no "
                           "layer is measured, only the loss and gradient norms",
                           kind="no forward to sample")
            else:
                self._warn(f"step {k} was due for a sample, but no forward of {self._model_name} with gradients "
                           "enabled ran in it (called under torch.no_grad() or inference_mode -- an EMA copy "
                           "evaluated that way -- or not called): no layer is measured until one does, only the "
                           "loss and gradient norms", kind="no forward to sample")
        # (also where a sample's update is taken this step: the relative update reads its parameters as they are)
        if sampled or self._snapshot_due is not None or \
                (self.optimizer is not None and self._optimizer_params() != self._opt_params):
            self._refresh_params()
        read_grads = sampled or k % self.grad_every == 0
        params = [p for p in self._param_names if p.grad is not None] if read_grads else []
        # (is_cuda and get_device() are read in C: .device built a torch.device per parameter at every step)
        self._cuda_devices = sorted({p.get_device() for p in self._param_names if p.is_cuda})
        with torch.no_grad():
            grads = [cast(torch.Tensor, p.grad) for p in params]  # sparse ones: norms() reads their values
            gnorms = norms(grads) if params else []
            # the output gradient of the call the sample measured (a penalty's forward may come first)
            outs = ([c for c in self._calls if c.sampled and c.out_norm is not None][:1] if sampled else []) or \
                [c for c in self._calls if c.out_norm is not None][:1]
            extra: list[torch.Tensor | Part | float] = [*gnorms, *([loss_t] if loss_t is not None else []),
                                                 *[x for c in outs for x in (cast(torch.Tensor, c.out_norm),
                                                                             float(c.out_numel))]]
            kinds = ([norm_kind(g) for g in grads] + ([MEAN] if loss_t is not None else [])
                     + [GRAD_NORM, SUM] * len(outs))
            pn = ParamNorms.of(rec.rows, dict(zip(params, grads)),  # type: ignore[union-attr]
                               known={id(g): n for g, n in zip(grads, gnorms)}) if sampled else None
            rel = self._relative_scalars()
            # the update of the optimizer step since the last step, from the samples the relative update just read
            upd = self._updates.scalars(self._relative) if self._updates.snapshot is not None else None
            logit_sums = self._logits if sampled and self._logits is not None else []
            absmax = [c.out_absmax for c in self._calls[:1] if c.out_absmax is not None]
            # the GradScaler's scale, last: the backward's gradients are that many times the true ones
            scale_t = [t for t in (self._scale.tensor(),) if t is not None] if self._scale is not None else []
            probe = [self._zero_probe] if sampled and self._zero_probe is not None else []
            # the parameters whose .grad unscale_() divided already
            unscaled = self._scale.unscaled([self.optimizer, self._skip_opt]) if self._scale is not None else None
            more: list[torch.Tensor | Part | float] = [*(pn.scalars if pn is not None else []),
                                                *(upd[0] if upd is not None else []), *logit_sums, *absmax, *rel,
                                                *scale_t, *probe]
            kinds += (pn.kinds if pn is not None else []) + (upd[1] if upd is not None else []) \
                + ([SUM, SUM, MAX, SUM, SUM] if logit_sums else []) + [MAX] * len(absmax) + [NORM] * len(rel) \
                + [MAX] * len(scale_t) + [MAX] * len(probe)
            if sampled:
                assert rec is not None
                vals, ex = finalise(rec.rows, extra + more, self.red, kinds, rec.batched())
            else:
                vals, ex = [], gather(extra + more, kinds, self.red) if extra or more else []
        rest = list(ex)
        if probe and rest.pop() == 0:  # the witness's .grad was all zeros when the next gradient arrived
            self._zeroed_seen = True
        scale = rest.pop() if scale_t else None
        scale = scale if scale is not None and math.isfinite(scale) and scale > 0 else None
        # the scaler lowers its scale only after an optimizer step it skipped: the previous step's, if this
        # model's weights did not move in it (the scaler may be shared with another model's optimizer)
        moved = RelativeUpdate.ratio(*rest[len(rest) - 2:])
        prev_skipped = self._scale is not None and self._scale.skipped(scale, moved)
        # the true gradients: the backward's (rows, the output's) were scaled, .grad unless unscale_() ran
        row_div = scale or 1.0

        def param_div(p: nn.Parameter) -> float:
            return 1.0 if unscaled is None or unscaled(p) else row_div

        n = len(gnorms)
        gvals = [v / param_div(p) for v, p in zip(ex[:n], params)]
        loss_v = ex[n] if loss_t is not None else (float(loss) if isinstance(loss, (int, float)) else None)
        i = n + (1 if loss_t is not None else 0)
        out_v = ex[i] / row_div if outs else None
        out_numel = ex[i + 1] if outs else 0.0
        rest = rest[i + (2 if outs else 0):]
        # non-finite gradients from a finite loss under a GradScaler still scaling (>= 1): its routine overflow
        loss_finite = loss_v is None or math.isfinite(loss_v)
        finite = loss_finite and all(math.isfinite(v) for v in gvals)
        overflow = not finite and loss_finite and scale is not None and scale >= 1
        grad_norm = math.sqrt(sum(v * v for v in gvals)) if read_grads and gvals and not overflow else None
        new: list[Alert] = []
        if prev_skipped:
            self._scaler_skip(k - 1)

        # 1. the update of the previous step's optimizer step, when it was saved
        m = len(pn.scalars) if pn is not None else 0
        u = len(upd[0]) if upd is not None else 0
        logits = _logit_stats(rest[m + u:m + u + 5]) if logit_sums else None
        # (of the previous optimizer step: none when the GradScaler skipped it)
        relative = None if prev_skipped else moved
        out_absmax = rest[len(rest) - len(rel) - 1] if absmax else None
        if upd is not None and prev_skipped:  # the weights saved before a step the scaler skipped: saved again now
            self._snapshot_due = cast(Any, self._updates.snapshot).sample
            self._updates.snapshot = None
        elif upd is not None:
            new += self._finish_update(rest[m:m + u])
        # 2. non-finite watch (the loss and output gradient every step, parameter gradients when read)
        if overflow:
            self._scaler_skip(k)
        elif not finite and not self._nonfinite_seen:
            self._nonfinite_seen = True
            new.append(self._locate(k, loss_v, gvals, params, out_v, out_numel))
            if scale is not None and loss_finite:
                new[-1] = evolve(new[-1], message=f"{new[-1].message}; the GradScaler's scale is down to "
                                 f"{scale:g}: these gradients are non-finite without loss scaling, not a scaled "
                                 "overflow")
            if self._dump_dir is not None and not self._dumped:
                new[-1] = self._dump(k, loss_v, new[-1])
        elif finite:
            self._nonfinite_seen = False
        # 3. loss and gradient-norm rules (the gradient-norm one on steps that read gradients)
        if finite or overflow:
            worst = self._worst_growth(params, gvals) if read_grads and not overflow else None
            new += A.scalar_alerts(k, loss_v, grad_norm, self.losses, self.grad_norms, worst, relative,
                                   self.relative_updates)
        self.steps.append(k)
        self.losses.append(loss_v)
        self.grad_norms.append(grad_norm)
        self.relative_updates.append(relative)
        self._trim_series()
        # 4. the sampled step in full
        if sampled:
            assert rec is not None and pn is not None
            out_rms = out_v / math.sqrt(max(out_numel, 1.0)) if out_v else None
            why = (f"the GradScaler's scaled gradients overflowed at scale {scale:g} (routine: it skips this "
                   "optimizer step and halves its scale)") if overflow else self._zeroed(k)
            sample = self._sample(k, loss_v, grad_norm, rec, vals, pn, rest, out_rms, scale, param_div, why)
            if logits is not None:
                sample = evolve(sample, output_logits=logits)
            if finite and not sample.incomplete:
                complete = self._complete_ends()
                new += A.sampled_alerts(sample, complete, self.trend) + \
                    logit_alerts(sample, complete, self._attn_first)
                fmt = self._format()
                new += precision_alerts(sample, complete, fmt, self.every)
                if fmt is not None and closing_in(sample, complete, FORMATS[fmt].max) or \
                        attention_closing_in(sample, complete, self._attn_first):
                    self._dense_until = k + self.every
            if not sample.incomplete:
                first_attention_logits(sample, self._attn_first)
            self.history.append(sample)
            keep = self.max_history if self.max_history is not None else \
                max(HISTORY_MIN, HISTORY_ROWS // max(len(sample.layers), 1))
            while len(self.history) > keep:
                del self.history[self._trim_at()]  # the baseline samples stay
            self._sampled_out_absmax = out_absmax
        elif out_absmax is not None and self._sampled_out_absmax and finite and \
                output_closing_in(out_absmax, self._sampled_out_absmax, self._format()):
            self._dense_until = k + self.every  # the output doubled since the last sample: sample from the next step
        # 5. the weights before this step's optimizer step, when an earlier sample waits for its update
        # (a sample sets _snapshot_due below, after this, so it is always a step before this one)
        if self._snapshot_due is not None and finite:
            try:
                self._updates.take(self._snapshot_due, k, self.optimizer)
                self._snapshot_at = (self._opt_steps, loss_v == 0.0 or grad_norm == 0.0)
            except Exception as e:  # the update's own failure loses that update, not this step's alerts
                self._updates.snapshot = None
                self._warn(f"the update after the sample at step {self._snapshot_due} was not measured", e,
                           kind="update not measured")
            self._snapshot_due = None
        if sampled and self.update_ratio and finite and k % self.every == 0:
            self._snapshot_due = k
        if read_grads and not overflow:
            self._prev_gvals = dict(zip(params, gvals))
        if self.agc is not None:
            from ..clip import agc_

            # gradients still multiplied by the loss scale: their ratio to the weights is too
            by_div: dict[float, list[nn.Parameter]] = {}
            for p in self.model.parameters():
                by_div.setdefault(param_div(p), []).append(p)
            for div, ps in by_div.items():
                agc_(ps, clipping=self.agc * div)
        new = self._fresh(new)
        if self._skip_opt is not None and (any(a.kind in SKIP_ON for a in new) or (not finite and not overflow)):
            # the optimizer's next step() (this step's) is skipped: decided from the values this step's one
            # host transfer already read, so skipping adds no synchronisation with the device.  On a step that
            # raised one of those alerts (after repeats were dropped: a rule that stays alarming skips the step
            # it is alerted on, not every step until it is quiet), and on every non-finite step, whose gradients
            # must never reach the weights (its alert comes once per episode)
            self._skip_now = k
            new = [evolve(a, message=a.message + "; this step's optimizer step was skipped (skip=)")
                   if a.kind in SKIP_ON else a for a in new]
        self.alerts += new
        if self.writer is not None:
            from ..integrations.tensorboard import write_step

            try:
                write_step(self.writer, self, k, new)
            except Exception as e:  # the step was measured and its alerts stand: only the writing failed
                self._warn(f"the writer failed at step {k}; its values are in the history", e,
                           kind="the writer failed")
        self._next_step()
        return new

    def _format(self) -> str | None:
        """The low-precision format the sampled step computed in: autocast's
        dtype at its first forward that fed the backward (read when it ran;
        the first forward when none is known to), else the parameters' when
        one is a low-precision format (float16, bfloat16, FP8), else the
        format a sample's rows put out (autocast entered inside the model's
        own forward, which the call's state does not show); None for
        float32/float64 runs."""
        return self._call_format() or self._low_format

    def _call_format(self) -> str | None:
        """The format the call said: autocast's dtype around it, or the parameters'."""
        trained = [c for c in self._calls if c.out_norm is not None][:1] or self._calls[:1]
        return _format_of([a for c in trained for a in c.autocast], self._param_names)

    def _complete_history(self) -> list[MonitorStep]:
        """The samples that carry a verdict: the baseline of the drift rules."""
        return [h for h in self.history if not h.incomplete]

    def _trim_at(self) -> int:
        """The sample a bounded history drops: the first without a verdict
        ahead of the first ``BASELINE_SAMPLES`` with one, else the one after
        those.  Those are the drift rules' baseline (see :meth:`_complete_ends`),
        which stays; dropping the sample after the first ``BASELINE_SAMPLES``
        whatever their verdict let a run whose first sample had none (a
        GradScaler's first overflow, a first step without gradients) take
        its third baseline sample from the latest ones, anew at each drop."""
        n = 0
        for i, h in enumerate(self.history):
            if h.incomplete or n == A.BASELINE_SAMPLES:
                return i
            n += 1
        return A.BASELINE_SAMPLES

    def _complete_ends(self) -> list[MonitorStep]:
        """What the sample rules read of :meth:`_complete_history`: all of it
        while it holds at most ``BASELINE_SAMPLES + 1`` + ``RECENT + 1``
        samples, else its first ``BASELINE_SAMPLES + 1`` and last
        ``RECENT + 1`` (the drift, logit and precision rules compare a sample
        with the first ones and the last few, and ask at most whether
        ``BASELINE_SAMPLES`` are there), found from both ends: the whole list,
        rebuilt at every sample, grew with the run (2.7 ms a sample after
        4,000 samples)."""
        h, head_n, tail_n = self.history, A.BASELINE_SAMPLES + 1, RECENT + 1
        head: list[MonitorStep] = []
        i = 0
        while i < len(h) and len(head) < head_n:
            if not h[i].incomplete:
                head.append(h[i])
            i += 1
        tail: list[MonitorStep] = []
        j = len(h) - 1
        while j >= i and len(tail) < tail_n:
            if not h[j].incomplete:
                tail.append(h[j])
            j -= 1
        return head + tail[::-1]

    def _trim_series(self) -> None:
        """Keep the per-step series bounded (:data:`MAX_SERIES` steps): the
        first values, which hold the level training started at (the alerts'
        reference), and the most recent ones."""
        if len(self.steps) <= MAX_SERIES + MAX_SERIES // 10:
            return
        head = max(D.head_end(self.losses), D.head_end(self.grad_norms))
        cut = len(self.steps) - MAX_SERIES + head
        for series in (self.steps, self.losses, self.grad_norms, self.relative_updates):
            del series[head:cut]

    def _fresh(self, new: list[Alert]) -> list[Alert]:
        """Drop repeats: a (kind, layer) already alerted stays quiet (per-layer
        drift, saturation, dead, update ratios); loss spikes, gradient surges
        and update growth once per WINDOW steps.  Non-finite alerts come once per
        episode (again only after the values were finite in between)."""
        out = []
        for a in new:
            if a.kind in ("loss-spike", "grad-surge", "update-growth"):
                last = self._last_scalar_alert.get(a.kind)
                if last is not None and a.step - last < A.WINDOW:
                    continue
                self._last_scalar_alert[a.kind] = a.step
            elif a.kind not in ("non-finite", "batch-spike"):  # each bad batch is its own event
                if (a.kind, a.layer) in self._alerted:
                    continue
                self._alerted.add((a.kind, a.layer))
            out.append(a)
        return out

    def _relative_scalars(self) -> list[torch.Tensor | float]:
        """This step's two norms for the relative update (:mod:`.relative_update`);
        two zeros (no value) once it failed (one warning, the rest of the monitor goes on)."""
        if self._relative is None:
            return [0.0, 0.0]  # always two values: every rank sends as many to the all-reduce
        try:
            return self._relative.scalars(list(self._param_names))
        except Exception as e:  # an exotic parameter (a subclass without strided views): no relative update
            self._relative = None
            self._warn("the relative update per step is not measured", e)
            return [0.0, 0.0]

    def _loss_scalar(self, loss: Any) -> torch.Tensor | None:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"step() takes the scalar loss, got a tensor of shape {tuple(loss.shape)}")
            return loss.detach().reshape(()).float() if loss.dtype != torch.float64 else loss.detach().reshape(())
        if loss is None or (isinstance(loss, (int, float)) and not isinstance(loss, bool)):
            return None
        raise TypeError(f"step() takes the loss as a tensor, a float (Python or NumPy) or None, got "
                        f"{type(loss).__name__}")

    def _worst_growth(self, params: list[nn.Parameter], gvals: list[float]) -> str | None:
        """The parameter whose gradient norm grew most since the previous step."""
        prev = self._prev_gvals
        if not prev:
            return None
        best, where = 0.0, None
        for p, v in zip(params, gvals):
            b = prev.get(p)
            if b and b > 0 and v / b > best:
                best, where = v / b, self._param_names.get(p)
        return where

    def _sample(self, k: int, loss: float | None, grad_norm: float | None, rec: Recorder, vals: list[dict[str, Any]],
                pn: ParamNorms, rest: list[float], out_rms: float | None, scale: float | None = None,
                param_div: Callable[[nn.Parameter], float] = lambda p: 1.0, why: str = "") -> MonitorStep:
        """The sampled step's record; under a GradScaler (``scale``) the
        backward's statistics divided by the scale, the parameters' gradients
        by ``param_div`` of the module's first (1 once ``unscale_`` ran); ``why``: the reason the
        sample gets no verdict, when the step itself gave one."""
        rows = rec.rows
        if scale is not None:
            scaled = [s.name for s in STATISTICS if s.unit == "gradient"]
            vals = [{**v, **{key: v[key] / scale for key in scaled if v.get(key) is not None}} for v in vals]
        self._low_format = rec.low_format  # the format this sample's rows put out, if one was low
        if rec.low_format is not None and self._call_format() is None:
            # autocast entered inside the forward: the modules that ran in float32 around it are not at
            # the low format's limits (their largest values are not judged against them)
            vals = [v if r.low else {key: x for key, x in v.items() if key not in HEADROOM}
                    for r, v in zip(rows, vals)]
        m = len(pn.scalars)
        pgrads = {}
        for mod, (g, gw) in pn.values(rest[:m]).items():
            first = next(mod.parameters(recurse=False), None)
            first = first if first is not None else next(mod.parameters(), None)  # a compiled row's: inside it
            div = param_div(first) if first is not None else 1.0
            pgrads[mod] = (g / div, gw / div)
        if not out_rms:  # no root output to compare with (submodules called directly): the last row with a gradient
            out_rms = next((v["grad_rms"] for v in reversed(vals) if v.get("grad_rms")), None)
        layers = layer_stats(rows, vals, pgrads, out_rms or 1.0)
        # (the modules as _refresh_params read them at this sampled step)
        why = why or missing_gradients(rows, self._modules) or repeated_backwards(rows)
        # (every row empty; or the last one, with no gradient anywhere -- a learned position table's row is not
        # empty on an empty batch)
        if not why and rows and (all(0 in r.shape for r in rows) or
                                 (0 in rows[-1].shape and not any(layer.grad_rms for layer in layers))):
            why = ("the sampled step's batch is empty: the model put out 0 entries, so there is nothing to "
                   "measure (an empty shard of a filtered or bucketed loader)")
        if not why and not any(layer.grad_rms for layer in layers) \
                and any(layer.grad_rms is not None for layer in layers):
            why = ("every gradient of the sampled pass is exactly 0, at the model's output too: there is no backward "
                   "signal to judge (a loss of exactly 0 -- every example of the batch masked out, a saturated "
                   "softmax -- or a loss that does not depend on the output)")
        if why:  # no verdict from rows that could not see their gradients
            return MonitorStep(k, loss, "incomplete", tuple(layers), (), grad_norm, out_rms, incomplete=why,
                               loss_scale=scale)
        verdict, problems, layers, judged = diagnose(layers, None, self.bounds, self.trend,
                                                     zero_gated=zero_gates(self.model, rows, layers),
                                                     initialisable=initialisable(self.model))
        notes = [*judged["notes"], unreached_note(rows, "the loss"), *self._frozen_or_untrained(rows),
                 transformed_note(rec.transformed)]
        return MonitorStep(k, loss, verdict, tuple(layers), tuple(problems), grad_norm, out_rms, loss_scale=scale,
                           notes=tuple(n for n in notes if n))

    def _frozen_or_untrained(self, rows: list[Any]) -> list[str]:
        """The sample's note on what does not train: the rows nothing before
        them trains (:func:`~signalprop.probe.pipeline.frozen_note`) -- unless
        trainable parameters outside the rows got gradients (a LoRA adapter's
        matrices applied in its own code: "every parameter it used is frozen"
        would be false) -- and the trainable parameters that got no gradient
        while others did (a detached branch, an expert no token reached:
        they do not train this step)."""
        trainable = [(n, p) for p, n in self._param_names.items() if p.requires_grad]
        got = [n for n, p in trainable if p.grad is not None]
        out = []
        frozen = frozen_note(rows)
        if frozen and not any(r.wants_grad for r in rows) and got:
            frozen = (f"no recorded layer's output required a gradient, yet {count(len(got), 'trainable parameter')} "
                      f"got one ({', '.join(got[:3])}{', ...' if len(got) > 3 else ''}): they are used outside the "
                      "recorded layers (an adapter's matrices applied in its parent's own code), so no gradient is "
                      "measured layer by layer")
        if frozen:
            out.append(frozen)
        untrained = untrained_note(trainable, {id(p) for _, p in trainable if p.grad is None}, rows, " in this step")
        if untrained:
            out.append(untrained)
        return out

    def _zeroed(self, k: int) -> str:
        """Why the sample is not of this step's gradient, or "": the sampled
        pass's gradients were zeroed after its backward (a later backward
        found its parameter's ``.grad`` gone, or all zeros where
        ``zero_grad(set_to_none=False)`` zeroed it in place: the first
        :data:`ZERO_PROBE` entries read), so the step's gradient comes
        from later passes -- another loss's pass through this model came
        first (a GAN's generator step through its discriminator, after the
        discriminator's ``mon.step``).  From then on the monitor samples each
        step's last forward that fed a backward, and the next step is sampled."""
        if not self._zeroed_seen:
            return ""
        self._last_pass = True
        self._dense_until = max(self._dense_until, k + 1)
        return ("the sampled forward's gradients were zeroed before this step's backward, so they are not in this "
                "step's gradient: another loss's pass through this model came first (a GAN's generator step through "
                "its discriminator after the discriminator's mon.step), or a step interrupted after its backward "
                "(KeyboardInterrupt) was run again; the monitor samples each step's last forward from the next "
                "step on")

    def _last_skip(self) -> None:
        """Whether the GradScaler skipped the last step's optimizer step,
        which no later ``step()`` will see: its scale fell since and this
        model's sampled weights did not move (read once, at ``close()``)."""
        ls = cast(LossScale, self._scale)
        scale = ls.tensor()
        moved = RelativeUpdate.ratio(*[float(v) for v in self._relative_scalars()])
        if ls.skipped(float(scale) if scale is not None else None, moved):
            self._scaler_skip(self.steps[-1])

    def _scaler_skip(self, k: int) -> None:
        """Step ``k``'s optimizer step was skipped by the GradScaler (listed once)."""
        if k >= 0 and (not self.scaler_skipped or self.scaler_skipped[-1] < k):
            self.scaler_skipped.append(k)

    # -- update / weight ratio -------------------------------------------------
    def _finish_update(self, vals: list[float]) -> list[Alert]:
        """The update of the step the snapshot was taken before: its alerts,
        and the sample it belongs to given its ratios and per-module statistics."""
        u = self._updates.finish(vals)
        if u is None:
            return []
        kinds: dict[str, str] = {}
        for j in range(len(self.history) - 1, -1, -1):
            if self.history[j].step == u.sample:
                kinds = {layer.name: layer.kind for layer in self.history[j].layers}  # to name Linear #18
                break
        # the run's first optimizer step is not judged too large: Adam's first step moves every entry by the
        # learning rate whatever the gradient (bias correction), SGD's follows the largest gradients of the run
        # (the loss at its highest); the next sample judges the rate the run keeps
        # no optimizer step to judge: skip= skipped it, or the loop did not call the guarded optimizer's step (a
        # step it skips itself)
        idle = u.k in self.skipped[-8:] or (self._skip_guard is not None and self._opt_steps == self._snapshot_at[0])
        out = [] if idle else A.update_alerts(u.k, u.ratios, u.weight_layers, set() if u.sample == 0 else u.judged,
                                              kinds, A.converged(self.losses, D.start_level(self.losses)))
        if self._snapshot_at[1]:
            # a step without gradient (a loss of exactly 0): weights that did not move at all are no rate too
            # small -- momentum or Adam's first moment still moves them, and that update is judged as any other
            moved = [r for n, r in u.ratios if n in u.weight_layers and math.isfinite(r)]
            if moved and statistics.median(moved) == 0:
                out = [a for a in out if a.kind != "update-too-small"]
        for j in range(len(self.history) - 1, -1, -1):
            if self.history[j].step == u.sample:
                h = self.history[j]
                self.history[j] = evolve(h, update_ratios=tuple(u.ratios), layers=with_update(h.layers, u.per_module))
                if not h.incomplete:
                    per_module = u.per_module
                    attr = "update_lr_rms" if any("update_lr_rms" in v for v in per_module.values()) else "update_rms"
                    cur = [(m, v[attr]) for m, v in per_module.items() if attr in v]
                    out += self._update_baselines.alerts(u.k, cur, attr)
                    self._update_baselines.add(self.history[j].layers)
                break
        return out

    # -- the non-finite origin -------------------------------------------------
    def _locate(self, k: int, loss: float | None, gvals: list[float], params: list[nn.Parameter],
                out_v: float | None, out_numel: float = 1.0) -> Alert:
        """Replay the step's forward calls with check's exact pass to find
        where the first NaN/Inf appeared.  Under ``torch.distributed`` every
        rank replays its own calls together and the replay's statistics are
        combined as the step's were, so all ranks name the same module even
        when only one rank's data turned non-finite."""
        fix = ("lower the learning rate or clip gradients (sp.clip.agc_, monitor(..., agc=0.01)); "
               "with mixed precision, use a GradScaler or bfloat16")
        with torch.no_grad():
            named = [(n, p) for n, p in self.model.named_parameters()]
            pvals = gather(norms([p.detach() for _, p in named]),
                            [norm_kind(p) for _, p in named], self.red) if named else []
        # a norm past float32's range (entries ~1e19 and up) is not yet a non-finite weight: the entries say
        bad_w = [n for (n, p), v in zip(named, pvals) if not math.isfinite(v)
                 and not bool(torch.isfinite(local(p.detach())).all())]
        if bad_w:
            return Alert(k, "non-finite", bad_w[0].rpartition(".")[0] or bad_w[0],
                         f"step {k}: the weights themselves are non-finite ({len(bad_w)} tensor(s), first "
                         f"{bad_w[0]}): an earlier optimizer step overflowed them", fix, "update")
        call = self._culprit()
        report = None
        if call is not None:
            try:
                report = self._replay(call)
            except (ModelError, ValueError, RuntimeError) as e:
                self._warn(f"step {k}'s forward could not be replayed to locate the NaN/Inf", e,
                           kind="a forward could not be replayed")
        p = next((p for p in report.problems if p.kind == "non-finite"), None) if report is not None else None
        if p is not None and report is not None:
            # (a NaN/Inf made by a module's own code after the last row leaves every row finite: its message says
            # where the forward signal turned, as every forward finding's does)
            forward = p.layer == "input" or any(layer.nonfinite_fraction > 0 for layer in report.layers) or \
                p.message.startswith("The forward signal")
            if forward or out_v is None or math.isfinite(out_v):  # else the loss's own gradient: said below
                return Alert(k, "non-finite", p.layer, f"step {k}: {p.message}", f"{p.suggestion}; {fix}",
                             "forward" if forward else "backward")
        if loss is not None and not math.isfinite(loss) and out_v is not None and out_v == 0 and out_numel == 0:
            return Alert(k, "non-finite", "(loss)", f"step {k}: the loss is {loss} on an empty batch (the model's "
                         "output has no entries): a mean over 0 examples is 0/0",
                         "skip empty batches (filter the loader, or step only when the batch has examples), or "
                         "reduce the loss by a sum", "forward")
        if loss is not None and not math.isfinite(loss) and out_v is None and call is None:
            # no forward of the root was seen (its submodules called directly) and none was replayed: whether the
            # output was finite is not known
            return Alert(k, "non-finite", "(loss)", f"step {k}: the loss is {loss}; where the first NaN/Inf "
                         "appeared is not known: the model's own forward was not seen this step (its submodules "
                         "called directly, or compiled code that skips module hooks), so neither its output nor its "
                         "layers could be replayed",
                         f"check the batch (torch.isfinite(x).all()) and the loss's argument; {fix}", "")
        if loss is not None and not math.isfinite(loss) and (out_v is None or math.isfinite(out_v)):
            # the replayed pass's last row is the model's output: finite, but its square past float32's range
            top = report.layers[-1].stats.get("forward_absmax") if report is not None and report.layers else None
            if top is not None and math.isfinite(top) and top * top > torch.finfo(torch.float32).max:
                return Alert(k, "non-finite", "(loss)", f"step {k}: the loss is {loss} while the model's output "
                             f"is finite, but its largest |value| is {top:.3g}: a loss that squares it (mean squared "
                             "error) or exponentiates it overflows float32 (largest 3.4e38)",
                             f"the outputs grew out of range: {fix}", "forward")
            return Alert(k, "non-finite", "(loss)", f"step {k}: the loss is {loss} while the model's output is "
                         "finite: the loss function turned it non-finite (log of 0, division by 0)",
                         f"clamp the loss's argument (e.g. log(p + eps)) or use a fused loss; {fix}",
                         "forward")
        # a float16 run's finite loss with non-finite gradients: what a GradScaler's routine overflow looks like
        scaled = ("; if a GradScaler scales this loss, this is its routine overflow (it skips the step): pass "
                  "sp.monitor(..., scaler=scaler)") if self._scale is None and loss is not None and \
            math.isfinite(loss) and self._format() == "float16" else ""
        if out_v is not None and not math.isfinite(out_v):
            return Alert(k, "non-finite", "(loss)", f"step {k}: the gradient of the loss at the model's output is "
                         f"non-finite while the forward pass is finite{scaled}", f"look at the loss function; {fix}",
                         "backward")
        bad = [p for p, v in zip(params, gvals) if not math.isfinite(v)]
        # the last module in execution order is where the backward pass reaches first
        order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        worst = max(bad, key=lambda p: order.get(self._owner.get(p, ""), -1)) if bad else None
        where = self._owner.get(worst, "(model)") if worst is not None else "(model)"
        owner = dict(self.model.named_modules()).get(where)
        label = module_label(where, type(owner).__name__ if owner is not None else None)
        return Alert(k, "non-finite", where or "(root)",
                     f"step {k}: non-finite gradients in {len(bad)} parameter tensor(s), the output-nearest in "
                     f"{label}" + (f" ({self._param_names.get(worst)})" if worst is not None else "")
                     + (f"; loss {loss}" if loss is not None else "") + scaled, fix, "backward")

    def _culprit(self) -> _Call | None:
        """The one forward call of the step to replay: the first whose output's
        gradient is non-finite, else the first whose floating inputs hold a
        NaN or +inf, or whose output a NaN/Inf (a micro-batch with an inf
        that a tanh squashed shows only in the parameter gradients: the
        first call was replayed, and its clean batch blamed on a layer's
        backward), else the first (the replay runs the user's forward once,
        whatever the number of micro-batches)."""
        for c in self._calls:
            if c.out_norm is not None and not bool(torch.isfinite(c.out_norm)):
                return c
        if len(self._calls) > 1:
            for c in self._calls:  # (NaN or +inf: an additive -inf mask passed with every call is no fault)
                if any(_bad_values(t) for t in tensors_of(c.args)):
                    return c
            for c in self._calls:
                if c.out_absmax is not None and not bool(torch.isfinite(c.out_absmax)):
                    return c
        return self._calls[0] if self._calls else None

    def _replay(self, call: _Call) -> Any:
        """check's exact pass on one saved call, with the step's RNG and
        autocast state; the model, its Python attributes and the RNG come
        back as they were, and the monitor's own hooks stand aside (no
        re-entry, nothing added to the step)."""
        self._replaying = True
        try:
            with preserved(self.model, python_state=True):
                torch.set_rng_state(call.rng)
                for d, s in call.cuda_rng:
                    torch.cuda.set_rng_state(s, d)
                with _autocast(call.autocast):
                    return run_pass(self.model, call.args, None, None, self.bounds, self.trend, True, self.red)
        finally:
            self._replaying = False

    def _dump(self, k: int, loss: float | None, alert: Alert) -> Alert:
        """Save the non-finite step for :func:`signalprop.replay` (see
        :mod:`.dump`); the alert says where.  A dump that fails is a warning."""
        call = self._culprit()
        if call is None or self._dump_dir is None:
            self._warn(f"step {k} could not be dumped: the model's forward was not seen in this step")
            return alert
        from .dump import write_dump

        try:
            d = write_dump(self._dump_dir, step=k, loss=loss, alert=alert, model=self.model, args=call.args.args,
                           kwargs=call.args.kwargs, targets=self._targets, rng=call.rng, cuda_rng=call.cuda_rng,
                           extra_rng=call.extra_rng, autocast=call.autocast, optimizer=self._dump_optimizer,
                           loss_fn=self._dump_loss_fn)
        except Exception as e:  # a full disk, inputs that do not pickle
            self._warn(f"step {k} could not be dumped to {self._dump_dir}", e)
            return alert
        self._dumped = str(d)
        return evolve(alert, message=f"{alert.message}; the step is saved in {d}: replay it with "
                                     f"`signalprop replay {d} --model package.module:factory` or sp.replay")

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this monitor, in plain Python
        values (JSON- and ``torch.load(weights_only=True)``-safe): the step
        count, the alert baselines (the first samples, the level training
        started at, the last 272 steps' losses, gradient norms and relative
        updates: what the divergence rules read), the alerts so
        far and which ones were said.  Saved with a checkpoint by the
        Lightning and HF callbacks.  The history between the baseline and
        the last :data:`RECENT_SAMPLES` samples (the most any rule compares a
        new sample with) is not kept: ``report()`` of a resumed run starts
        with those."""
        keep = list(range(min(len(self.steps), max(D.head_end(self.losses), D.head_end(self.grad_norms)))))
        # the baseline: the samples up to the BASELINE_SAMPLES-th with a verdict (the drift rules' baseline, see
        # _complete_ends), without those before it that have none -- the first three whatever their verdict let a
        # resumed run whose first sample had none (a GradScaler's overflow at step 0) take a late sample for one
        base: list[MonitorStep] = []
        end = 0  # where the samples after the baseline begin
        for i, h in enumerate(self.history):
            if len(base) == A.BASELINE_SAMPLES:
                break
            if not h.incomplete:
                base.append(h)
                end = i + 1
        after = self.history[end:]
        # the recent samples: from the RECENT_SAMPLES-th last with a verdict (those the rules read, see
        # _complete_ends), with the samples without one between them
        start, n = len(after), 0
        while start > 0 and n < RECENT_SAMPLES:
            start -= 1
            n += not after[start].incomplete
        # the tail every rule reads: the un-learning rule's best level comes from the last LEARNED_WINDOW steps
        tail = max(A.WINDOW, D.LEARNED_WINDOW + D.WARMUP)
        keep += [i for i in range(max(len(self.steps) - tail, 0), len(self.steps)) if i not in keep]
        return {"version": 1, "step": self._step, "every": self.every,
                "steps": [self.steps[i] for i in keep], "losses": [self.losses[i] for i in keep],
                "grad_norms": [self.grad_norms[i] for i in keep],
                "relative_updates": [self.relative_updates[i] for i in keep],
                "baseline": [h.to_dict() for h in base],
                # the last samples the rules compare a new one with (a layer's update against the median of
                # its last SPIKE_BASELINE: against the baseline alone, an update grown gradually since was a
                # "spike" at the first sample after a resume)
                "recent": [h.to_dict() for h in after[start:]],
                "alerts": [a.to_dict() for a in self.alerts],
                "alerted": sorted([list(x) for x in self._alerted]),
                "last_scalar_alert": dict(self._last_scalar_alert), "nonfinite_seen": self._nonfinite_seen,
                "attention_baselines": dict(self._attn_first),
                "skipped": list(self.skipped), "scaler_skipped": list(self.scaler_skipped),
                "loss_scale": self._scale.last if self._scale is not None else None,
                # learned from a sample whose forward's gradients were zeroed before the step's backward (a GAN's
                # discriminator): which forward of a step to sample
                "last_pass": self._last_pass}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (before the first ``step`` of the
        resumed run, before or after its forward): the step count, baselines
        and alerts pick up where they were; the sampling schedule follows the
        restored step count."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("load_state_dict takes what Monitor.state_dict() returned (version 1), got "
                             f"{type(state).__name__}" + (f" version {state.get('version')!r}"
                                                          if isinstance(state, dict) else ""))
        if self.steps or self.history:
            raise RuntimeError("load_state_dict must come before this monitor's first step")
        self._step = int(state["step"])
        self.steps = [int(x) for x in state["steps"]]
        self.losses = [None if x is None else float(x) for x in state["losses"]]
        self.grad_norms = [None if x is None else float(x) for x in state["grad_norms"]]
        rel = state.get("relative_updates", [None] * len(self.steps))
        if len(rel) != len(self.steps):
            raise ValueError(f"load_state_dict: {len(rel)} relative updates for {len(self.steps)} steps; pass what "
                             "Monitor.state_dict() returned")
        self.relative_updates = [None if x is None else float(x) for x in rel]
        self.history = [MonitorStep.from_dict(h) for h in [*state["baseline"], *state.get("recent", [])]]
        self._update_baselines = UpdateBaselines()
        for h in self._complete_history():
            self._update_baselines.add(h.layers)
        self.alerts = [Alert.from_dict(a) for a in state["alerts"]]
        self._alerted = {(str(a), str(b)) for a, b in state["alerted"]}
        self._last_scalar_alert = {str(k): int(v) for k, v in state["last_scalar_alert"].items()}
        self._nonfinite_seen = bool(state["nonfinite_seen"])
        firsts = state.get("attention_baselines")
        if firsts is None:  # (a state saved before they were kept: the samples it holds, in order)
            firsts = {}
            for h in self._complete_history():
                first_attention_logits(h, firsts)
        self._attn_first = {str(k): float(v) for k, v in firsts.items()}
        self.skipped = [int(x) for x in state.get("skipped", [])]
        self.scaler_skipped = [int(x) for x in state.get("scaler_skipped", [])]
        self._last_pass = bool(state.get("last_pass", False))
        if self._scale is not None and state.get("loss_scale") is not None:
            self._scale.last = float(state["loss_scale"])  # a fall at the resumed run's first step is a skip
        self._renumbered()

    def start_at(self, step: int) -> None:
        """Number this monitor's steps from ``step`` on (before its first
        ``step()``): a run resumed from a checkpoint that holds no monitor
        state (saved before the monitor was added) continues the trainer's
        step count rather than starting at 0 again, so its history and a
        writer's steps do not overlap the first run's.  Baselines and alerts
        start afresh; :meth:`load_state_dict` continues them too."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"start_at takes a step count (an integer >= 0), got {step!r}")
        if self.steps or self.history:
            raise RuntimeError("start_at must come before this monitor's first step")
        self._step = step
        self._renumbered()

    def _renumbered(self) -> None:
        # the step in progress (the first of the resumed run, perhaps already past its forward) under its
        # restored number: recorded if that step is a sampled one, not otherwise
        if not self.sampled and self._rec is not None:
            self._rec.detach()
            self._rec = None
            self._recording = False
        elif self.sampled and self._rec is None:
            self._arm()

    # -- results ---------------------------------------------------------------
    def report(self) -> MonitorReport:
        """Everything seen so far, as a record with ``save_html``, ``to_json``, ``to_dict``."""
        return MonitorReport(self._model_name, self.every, tuple(self.steps), tuple(self.losses),
                             tuple(self.grad_norms), tuple(self.history), tuple(self.alerts), tuple(self.skipped),
                             self.bounds, tuple(self.relative_updates), tuple(self.scaler_skipped))

    def layer_series(self, attr: str = "grad_rms") -> dict[str, list[tuple[int, float | None]]]:
        """Per layer name: (step, value) over the sampled steps."""
        out: dict[str, list[tuple[int, float | None]]] = {}
        for h in self.history:
            for layer in h.layers:
                out.setdefault(layer.name, []).append((h.step, getattr(layer, attr)))
        return out


class _Skipped(BaseException):  # (not an Exception: an optimizer's `except Exception` around its closure passes it)
    """Ends a skipped optimizer step right after its first closure call
    (see :class:`_SkipGuard`); its args: the guard's token, the closure's result."""


class _SkipGuard:
    """The ``skip=`` optimizer's ``step`` while a monitor runs: a method of
    the optimizer (an instance attribute) that asks the monitor whether to
    skip and otherwise calls the step it replaced.  A method of the
    optimizer's own, not the monitor's: torch's LR schedulers rebind
    ``optimizer.step``'s function to the optimizer to count its calls (a
    monitor's method rebound so raised inside the loop), and a guard installed
    over a scheduler's wrapper keeps its mark (else the scheduler warns that
    ``step`` was overridden).  :meth:`remove` puts the replaced step back
    where the guard is still the optimizer's ``step``; where something wrapped
    it since (a scheduler made later, a second monitor), the guard stays in
    that chain and only passes calls on."""

    def __init__(self, mon: Monitor, opt: Any) -> None:
        self.opt = opt
        prev = vars(opt).get("step")  # an instance attribute replaced (a scheduler's wrapper), or none
        self.prev = prev
        mon_ref = weakref.ref(mon)
        live = [True]
        self.live = live

        def step(_opt: Any, *args: Any, **kwargs: Any) -> Any:
            if _opt is not opt:  # a copy of the optimizer (copy.deepcopy copies this method): its own step
                return type(_opt).step(_opt, *args, **kwargs)
            m = mon_ref() if live[0] else None
            closure = kwargs["closure"] if "closure" in kwargs else args[0] if args else None
            if m is not None and callable(closure) and m._guard_seen == m._closed_steps:
                # step(closure) with no mon.step() since the last optimizer step: it runs inside the closure
                # (Lightning's automatic optimisation: forward, backward, mon.step).  The optimizer runs as it
                # would, in its own order (its pre-hooks, SAM's perturbation, then its closure); right after its
                # first call of the closure the skip is decided -- decided before it, the NaN step's update went
                # through and the next step was skipped without its closure -- and a skipped step ends there,
                # before the optimizer changed anything, returning the closure's loss
                first = [True]
                token = object()
                raised = [False]

                def watched(*a: Any, **k: Any) -> Any:
                    try:
                        out = closure(*a, **k)
                    except _Skipped:  # another monitor's guard on this optimizer skips it: this one is asked too
                        if first[0]:
                            first[0] = False
                            m._skips()
                        raise
                    if first[0]:
                        first[0] = False
                        if m._skips():
                            raised[0] = True
                            raise _Skipped(token, out)
                    return out

                if "closure" in kwargs:
                    kwargs = {**kwargs, "closure": watched}
                else:
                    args = (watched, *args[1:])
                try:
                    out = prev(*args, **kwargs) if prev is not None else type(opt).step(opt, *args, **kwargs)
                    m._opt_steps += 1
                except _Skipped as e:
                    if e.args[0] is not token:
                        raise
                    return e.args[1]
                finally:
                    # this step is decided whatever its closure did (raised after mon.step, the loop catching it;
                    # or called mon.step at each of LBFGS's evaluations): the next step asks afresh
                    m._guard_seen = m._closed_steps
                if raised[0]:  # the optimizer caught the skip and stepped all the same: not skipped
                    if m.skipped:
                        m.skipped.pop()
                    m._warn(f"{type(opt).__name__}.step caught the exception that ends a skipped step and updated "
                            "the weights all the same: skip= cannot skip its steps when it is given a closure "
                            "that calls mon.step()", kind="skip caught")
                return out
            if m is not None and m._skips():  # mon.step() came first (a loop's usual order): decided there
                return None
            out = prev(*args, **kwargs) if prev is not None else type(opt).step(opt, *args, **kwargs)
            if m is not None:
                m._opt_steps += 1
            return out

        if getattr(prev, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        step._signalprop_guard = self  # type: ignore[attr-defined]
        self.method = types.MethodType(step, opt)
        opt.step = self.method

    def remove(self) -> None:
        self.live[0] = False
        d = vars(self.opt)
        if d.get("step") is not self.method:
            return
        prev = self.prev
        while prev is not None:  # guards removed while this one was over them go too
            g = getattr(prev, "_signalprop_guard", None)
            if g is None or g.live[0]:
                break
            prev = g.prev
        if prev is not None:
            d["step"] = prev
        else:
            del d["step"]


def monitor(model: nn.Module, every: int = 50, *, writer: Any = None, agc: float | None = None,
            bounds: tuple[float, float] = (1e-6, 1e3), trend: float = 100.0, update_ratio: bool = True,
            max_history: int | None = None, grad_every: int | None = None, group: Any = None,
            skip: Any = None, histograms: bool = True, dump_on_nonfinite: Any = None, optimizer: Any = None,
            loss_fn: Any = None, scaler: Any = None, tag: str | None = None) -> Monitor:
    """Watch ``model`` during training.

    ::

        mon = sp.monitor(model, every=50)       # or: with sp.monitor(model) as mon:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad(); loss.backward()
            mon.step(loss)                      # after backward, before opt.step()
            opt.step()
        mon.close()

    ``every``: one step in ``every`` (the first included) is measured layer by
    layer as :func:`signalprop.check` does; every step's loss and gradient
    norms are read for the non-finite watch and the loss/gradient-norm
    alerts.  ``agc``: apply :func:`signalprop.clip.agc_` with this clipping
    factor after the measurements of each step (before the optimizer).
    ``writer``: a TensorBoard ``SummaryWriter`` (scalars per layer, alerts as
    text, a custom-scalars layout with one chart per statistic and, with
    ``histograms`` on and a writer that has ``add_histogram_raw``, per-layer
    histograms of activations, their gradients, weights, gradients and
    updates on sampled steps, each sample's written at the next step and the
    last one's at ``close`` -- use ``with`` or call ``close()`` to have it;
    see :mod:`signalprop.monitor.histograms`; ``histograms=False``: none).  ``tag``: this monitor's section of the
    writer, its tags starting ``signalprop.<tag>/`` (default ``signalprop/``;
    a second open monitor on one writer without a tag gets
    ``signalprop.<model class>/`` and a warning).  ``grad_every``: read every parameter's
    gradient norm (the global norm series ``mon.grad_norms`` and the
    non-finite watch on gradients; no alert rule judges it, see
    :mod:`signalprop.monitor.divergence`) on every n-th step and on sampled
    steps; default 1 for models on a GPU and with ``skip``, 4 to 6 on the CPU
    (a memory-bound pass there: the smallest divisor of ``every`` from 4 to
    6, so that the sampled steps are among the reads, else 4; the loss is
    read every step, and a non-finite gradient shows in the next step's loss
    at the latest -- after the optimizer step, which is why ``skip`` reads
    every step's gradients).
    ``update_ratio``: measure each module's ||dw|| / ||w|| of an optimizer
    step after each sample (that of the step after the sample, from the
    entries of each tensor the relative update samples at every step, see
    :mod:`signalprop.monitor.relative_update`: no copy of the weights;
    recorded with the sample, alerted at the step whose update it is).  ``max_history``: keep at most this many
    sampled steps (the first ones, the baseline, always stay, and the latest); by default as many as hold
    :data:`HISTORY_ROWS` rows in all (~0.5 GB; a 100-row model keeps its last 5,242 samples, at least
    :data:`HISTORY_MIN`), so that a monitor left on a long run does not grow without bound: pass a larger
    number to keep more.  The alert rules read the first samples and the last few, and each layer's update
    baseline is kept apart.  ``bounds`` and
    ``trend`` as in :func:`signalprop.check`.  ``skip``: an optimizer whose
    ``step()`` the monitor skips on a step that raised a batch-spike,
    loss-spike or non-finite alert (as OLMo-core's skip-step optimizers
    do), so that step's gradients never reach the weights (that step's
    ``step()`` only: a loop that takes none there, its own NaN guard or a
    GradScaler on overflow, carries no skip to the next); the skipped steps
    are listed in ``mon.skipped``; ``close()`` gives the optimizer its own
    ``step`` back.  Off by default: the monitor then never changes training.

    ``dump_on_nonfinite``: a folder where the first step whose loss or
    gradients turn non-finite is saved for :func:`signalprop.replay` (its
    forward's inputs, the targets given to ``step(loss, targets=...)``, the
    random states, the weights, ``optimizer``'s state and ``loss_fn`` when it
    pickles; see :mod:`signalprop.monitor.dump`).  ``optimizer``: the
    training's optimizer (default: ``skip``'s), also read on the step after
    each sample for the update each layer received over the learning rate
    and, for Adam-family optimizers, the second-moment lag (see
    :mod:`signalprop.monitor.optimizer`) and the ``update-spike`` alert.
    Dumping is off by default; on, each forward call also notes Python's
    and NumPy's random states (a few microseconds).

    ``scaler``: the ``torch.amp.GradScaler`` of a float16 run (call ``step``
    after ``scaler.scale(loss).backward()`` and before ``scaler.step(opt)``).
    The gradient statistics are then divided by its scale; the gradients it
    overflows on purpose (its routine back-off: that step is skipped and the
    scale halved) are listed in ``mon.scaler_skipped`` rather than alerted,
    the update of a step it skipped is not measured, and the gradients'
    float16 headroom is left to it (see :mod:`signalprop.monitor.loss_scale`).
    Without it, a GradScaler run's routine overflows are non-finite alerts.
    The Lightning and HF callbacks pass their trainer's scaler themselves.

    Under ``torch.distributed`` (DDP -- pass the wrapper or the module --, or
    FSDP2's ``fully_shard``), every statistic is combined over ``group``
    (default: the world) in one all-reduce per step, so every rank holds the
    same history and alerts, equal to what one process would measure on the
    concatenated batch; every rank must call ``step`` (and ``grad_every``
    must agree, as it does by default when all ranks use the same device type).
    """
    return Monitor(model, every, writer=writer, agc=agc, bounds=bounds, trend=trend, update_ratio=update_ratio,
                   max_history=max_history, grad_every=grad_every, group=group, skip=skip,
                   histograms=histograms, dump_on_nonfinite=dump_on_nonfinite, optimizer=optimizer, loss_fn=loss_fn,
                   scaler=scaler, tag=tag)


__all__ = ["Monitor", "monitor"]
