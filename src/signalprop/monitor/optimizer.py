"""What the optimizer did to each layer: the update it applied, Adam's lagging second moment, update spikes.

Measured on the step after each sample, from the sampled entries the
update/weight ratio reads there (no copy of the weights; see
:mod:`signalprop.monitor.update`):

* **update RMS**: ||w after - w before|| / sqrt(n) per module -- the step the
  optimizer *applied* (Adam's m/sqrt(v) times the learning rate plus weight
  decay, SGD's momentum buffer times the rate, after clipping), not the
  gradient; and the same over the learning rate when the monitor knows the
  optimizer (``monitor(..., optimizer=opt)`` or ``skip=opt``), which takes
  the schedule out: Adam's normalised step is about 1 or less.
* **Adam's second-moment lag** (Wortsman et al. 2023b, "Stable and
  low-precision training for large-scale vision-language models",
  arXiv:2304.13013, section 3.4): per module, RMS_t = sqrt(mean(g_t^2 / v_t))
  with v_t the bias-corrected second moment after this step's gradient (as
  Adam forms it, from its state before the step).  When the gradient stays
  on the scale v has averaged, RMS_t is about 1; when the gradient jumps
  after a stretch of small ones, v is "stuck in the past", g^2 / v is large
  and so is the update: the paper finds RMS_t spikes a few iterations before
  loss spikes, and StableAdamW divides the learning rate by max(1, RMS_t).
  For parameters with ``exp_avg_sq`` in their optimizer state (Adam, AdamW,
  NAdam, RAdam, fused or not); others have none.
* **update spikes** (:class:`UpdateBaselines`): a layer's update RMS over
  the learning rate ``UPDATE_SPIKE = 10`` times the median of its own last
  ``SPIKE_BASELINE = 8`` measured updates (at least ``SPIKE_MIN_SAMPLES = 3``):
  a step an order of magnitude beyond the layer's own recent ones.  Relative
  to the layer, because update scales differ by orders of magnitude between
  layers and optimizers; relative to the learning rate when it is known, so
  a warm-up or a decay is not a spike; rolling, because a healthy run's
  updates drift slowly (Adam's normalised step falls as the gradient noise
  grows relative to its mean).  The threshold is from the early-warning
  benchmark (``benchmarks/bench_early_warning.py``): on its healthy runs
  the largest ratio was well under 10 (the JSON records each run's largest).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..records import Alert
from ..words import module_label

UPDATE_SPIKE = 10.0
SPIKE_BASELINE = 8
SPIKE_MIN_SAMPLES = 3
LAG_CHUNK = 1 << 24  # entries per fused pass: the temporaries stay under 2 x 64 MB in float32
# entries of a tensor read for Adam's lag: a larger tensor is read at a fixed stride (its RMS is a mean, well
# estimated from 16,384 entries; its max is the max of those).  Reading all of a 5M-parameter MLP's
# gradients and second moments took 28% of an AdamW step on one CPU core (single-threaded passes)
LAG_SAMPLE = 1 << 14


def check_optimizer(opt: Any, what: str) -> None:
    """``opt`` must be a torch optimizer (or quack like one)."""
    if not (isinstance(getattr(opt, "param_groups", None), list) and hasattr(opt, "state")
            and callable(getattr(opt, "step", None)) and callable(getattr(opt, "state_dict", None))):
        raise TypeError(f"{what} takes a torch.optim.Optimizer (param_groups, state, step(), state_dict()), got "
                        f"{type(opt).__name__}")


def learning_rates(opt: Any) -> dict[nn.Parameter, float]:
    """Each parameter's learning rate now (a float; a tensor rate is read once, on the host)."""
    out: dict[nn.Parameter, float] = {}
    for group in opt.param_groups:
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if isinstance(lr, (int, float)):
            for p in group["params"]:
                out[p] = float(lr)
    return out


def _adam_terms(opt: Any, params: Sequence[nn.Parameter]) -> list[tuple[int, torch.Tensor, torch.Tensor, float,
                                                                          float, Any]]:
    """(index in ``params``, gradient, exp_avg_sq, beta2, eps, step) for each of
    ``params`` with a gradient and Adam's second moment in its state."""
    group_of = {p: g for g in opt.param_groups for p in g["params"]}
    out = []
    for i, p in enumerate(params):
        st = opt.state.get(p)
        g = group_of.get(p)
        if not st or g is None or p.grad is None or "exp_avg_sq" not in st or "betas" not in g \
                or p.grad.layout != torch.strided or not p.grad.numel():
            # (a sparse gradient: SparseAdam moves only the rows it holds; an empty parameter, nn.Linear(0, k)'s
            # weight, has no entry to compare)
            continue
        v = st["exp_avg_sq"]
        if v.shape != p.grad.shape:
            continue
        beta2 = g["betas"][1]
        beta2 = float(beta2) if not isinstance(beta2, torch.Tensor) else float(beta2.item())
        out.append((i, p.grad.detach(), v.detach(), beta2, float(g.get("eps", 1e-8)), st.get("step", 0)))
    return out


def first_moment_filling(opt: Any, k: int) -> frozenset[int]:
    """The parameters (their ``id``) whose coming step under an Adam-family
    optimizer (one whose groups have ``betas``) averages fewer than
    ``1 / (1 - beta1)`` gradients in their first moment (10 at beta1 = 0.9):
    until then Adam's bias-corrected ``m / sqrt(v)`` is about +-1 per entry
    whatever the gradient's noise, so the step moves every weight by about
    the learning rate -- as on its first step -- and its size says nothing
    yet about the rate the run keeps (an ``every=1`` monitor saw a healthy
    Adam run's second and third steps above the update-too-large bound,
    which its tenth is not).  Each parameter's count is its own state's
    (``state["step"]``: a resumed run is past it at once; a layer unfrozen
    mid-run in a group whose other layers trained has none, and is at its
    first step) when it is a number or a CPU tensor, else ``k``, the
    monitor's steps, for the whole group (reading a device tensor would wait
    for the device); a parameter without state is at its first step where it
    has a gradient, and takes no step where it has none (a frozen backbone
    in its own group)."""
    out: set[int] = set()
    for group in opt.param_groups:
        betas = group.get("betas")
        if not isinstance(betas, (tuple, list)) or not betas:
            continue
        b1 = betas[0]
        b1 = float(b1) if isinstance(b1, (int, float)) or (isinstance(b1, torch.Tensor) and b1.is_cpu) else 0.9
        if not 0 < b1 < 1:
            continue
        horizon = 1 / (1 - b1)
        steps: list[tuple[int, float]] = []
        device = False  # a count on a device, which reading would wait for
        for p in group["params"]:
            st = opt.state.get(p)
            step = st.get("step") if st else None
            if isinstance(step, torch.Tensor):
                if not step.is_cpu:
                    device = True
                    break
                step = float(step)
            if isinstance(step, (int, float)):
                steps.append((id(p), float(step)))
            elif p.grad is not None:  # no state yet: its first step comes
                steps.append((id(p), 0.0))
        if device:
            if k + 1 < horizon:
                out.update(id(p) for p in group["params"])
            continue
        out.update(i for i, step in steps if step + 1 < horizon)
    return frozenset(out)


def adam_lag(opt: Any, params: Sequence[nn.Parameter], local: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per parameter index with Adam state: (||g / sqrt(v_hat)||, max |g| / sqrt(v_hat)) as 0-d device
    tensors (no host transfer), where v_hat = (beta2 v + (1 - beta2) g^2) / (1 - beta2^(t + 1)) is the
    bias-corrected second moment Adam forms from its state and this step's gradient, ``eps^2`` added
    under the root as Adam adds ``eps`` to it; on at most ``LAG_SAMPLE`` (16,384) entries of each tensor (a fixed
    stride).  ``local``: a tensor's local part (sharded parameters)."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    terms = _adam_terms(opt, params)
    chunk: list[Any] = []
    size = 0
    for t in terms + [None]:
        if t is not None:
            chunk.append(t)
            size += min(t[1].numel(), LAG_SAMPLE)
        if chunk and (t is None or size >= LAG_CHUNK):
            _lag_chunk(chunk, local, out)
            chunk, size = [], 0
    return out


def _lag_chunk(chunk: list[Any], local: Any, out: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """g^2 / v_hat = c g^2 / (beta2 v + (1 - beta2) g^2 + c eps^2), c = 1 - beta2^(t + 1), in fused passes
    (no square root, no infinity norm: neither is vectorised on a CPU); its sum and largest entry per
    tensor, then their roots."""
    with torch.no_grad():
        gs = [_wide(_sample(_real(local(g)))) for _, g, _, _, _, _ in chunk]
        vs = [_wide(_sample(_real(local(v)))) for _, _, v, _, _, _ in chunk]
        # a sampled tensor's sum of g^2 / v stands for its whole: scaled by entries / entries read
        scale = [local(g).numel() / max(x.numel(), 1) for (_, g, *_), x in zip(chunk, gs)]
        corr: list[Any] = []
        for _, _, _, b, _, step in chunk:
            # a step counter on the device (capturable/fused Adam) is used there: no host read
            t = float(step) if not isinstance(step, torch.Tensor) or step.device.type == "cpu" else None
            corr.append(1.0 - b ** (t + 1.0) if t is not None else 1.0 - b ** (step.float() + 1.0))
        den = torch._foreach_mul(vs, [b for _, _, _, b, _, _ in chunk])
        torch._foreach_addcmul_(den, gs, gs, [1.0 - b for _, _, _, b, _, _ in chunk])
        for j, ((*_, eps, _), c) in enumerate(zip(chunk, corr)):
            den[j].add_(c * (eps * eps))
        r = torch._foreach_mul(gs, gs)
        torch._foreach_div_(r, den)
        for (i, *_), x, c, f in zip(chunk, r, corr, scale):
            out[i] = ((x.sum() * (c * f)).sqrt(), (x.amax() * c).sqrt())


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts, as Adam steps them
    (``torch.optim.Adam`` keeps a second moment per part of a complex parameter)."""
    return torch.view_as_real(t) if t.is_complex() else t


def _sample(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened, or every k-th of its entries when it has more than
    ``LAG_SAMPLE``: a fixed stride (no random numbers drawn), a view (no copy)
    where ``t`` is contiguous."""
    flat = t.reshape(-1)
    n = flat.numel()
    return flat if n <= LAG_SAMPLE else flat[::-(-n // LAG_SAMPLE)]


class UpdateBaselines:
    """Each layer's last ``SPIKE_BASELINE`` measured updates (both
    ``update_lr_rms`` and ``update_rms``), kept as the samples' updates
    arrive: what :meth:`alerts` compares a new update with.  Kept rather
    than read off the history at each sample, which made that read grow with
    the run (the samples times their rows at every sample: a 10-row MLP
    sampled every step slowed from 10 to 73 ms a step over 3,500 steps).
    A layer's baseline is its last updates whatever ``max_history`` drops;
    :meth:`Monitor.load_state_dict` refills it from the restored samples."""

    ATTRS = ("update_lr_rms", "update_rms")

    def __init__(self) -> None:
        self._past: dict[str, dict[str, deque[float]]] = {a: {} for a in self.ATTRS}
        self._kinds: dict[str, str] = {}

    def add(self, layers: Sequence[Any]) -> None:
        """A sample's rows, its update statistics on the first row of each
        module (see :func:`~.update.with_update`): their positive finite
        updates join each layer's baseline."""
        seen: set[str] = set()
        for layer in layers:
            if layer.name in seen:
                continue
            seen.add(layer.name)
            self._kinds[layer.name] = layer.kind
            for attr in self.ATTRS:
                v = layer.stats.get(attr)
                if v is not None and math.isfinite(v) and v > 0:
                    past = self._past[attr].get(layer.name)
                    if past is None:
                        past = self._past[attr][layer.name] = deque(maxlen=SPIKE_BASELINE)
                    past.append(v)

    def alerts(self, step: int, current: Sequence[tuple[str, float]], attr: str,
               spike: float = UPDATE_SPIKE) -> list[Alert]:
        """A layer whose update (``attr``: ``update_lr_rms`` when the learning
        rate is known, else ``update_rms``) of the optimizer step at ``step``
        is ``spike`` times the median of its baseline (at least
        ``SPIKE_MIN_SAMPLES`` updates; the samples added before this one).
        One alert, naming the layer that jumped most and how many did."""
        past = self._past[attr]
        jumped: list[tuple[float, str, float, float, int]] = []
        for name, v in current:
            base = past.get(name)
            if base is None or len(base) < SPIKE_MIN_SAMPLES or not math.isfinite(v):
                continue
            b = statistics.median(base)
            if b > 0 and v > spike * b:
                jumped.append((v / b, name, v, b, len(base)))
        if not jumped:
            return []
        f, name, v, b, n = max(jumped)
        what = "update RMS over the learning rate" if attr == "update_lr_rms" else "update RMS"
        label = module_label(name, self._kinds.get(name))
        return [Alert(step, "update-spike", name,
                      f"the optimizer step changed {label}'s weights {f:.3g}x more than its last steps did ({what} "
                      f"{v:.3g} against a median {b:.3g} over its last {n} samples; {len(jumped)} layer(s) above "
                      f"{spike:g}x): large runs show update spikes like this ahead of loss spikes",
                      "lower the learning rate or clip the update (sp.clip.agc_, monitor(..., agc=0.01)); with Adam, "
                      "a larger eps or a higher beta2 keeps the second moment from lagging, or use an update "
                      "clipped by its RMS (StableAdamW, Adafactor's update clipping)", "update")]
