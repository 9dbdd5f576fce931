"""Alert rules over time: pure functions of what the monitor measured.

Two clocks.  Every step gives the loss and the global gradient norm (read in
the one host transfer the non-finite watch needs anyway); the rules on them
(:mod:`signalprop.monitor.divergence`, where their mechanism and measured
thresholds are) warn of divergence: the run giving back most of what it had
learned, several steps in a row (``loss-spike``); one bad batch is not that.  Sampled steps give the per-layer statistics of
:func:`signalprop.check`; their rules compare a layer with its own baseline
(the median of its first few samples), so a layer that was always small is
not "vanishing" over time.

The thresholds of the sampled rules and the reasons for them:

* ``DRIFT = 100``: a layer's gradient RMS relative to the output's (as
  check judges it) changing by two orders of magnitude from its baseline
  (check's trend limit); relative, because a converging run's gradients
  all shrink with its loss.
* saturated / dead shares: above ``CREEP_LIMIT = 0.9`` and up by ``CREEP``
  from the baseline.  Check's 50% is a verdict on an initialization; in
  training, ReLU units specialise and a share of them legitimately stays
  silent on one batch, so only a layer that has almost entirely stopped is news.
* update/weight ratio: the usual band is 1e-4 to 1e-2 per step; above
  ``UPDATE_HIGH = 0.1`` an optimizer step rewrites a tenth of a layer's
  weights, which no stable run does for long (the run's first optimizer
  step is not judged: Adam's moves every entry by the learning rate, SGD's
  follows the run's largest gradients; a rate that stays too high shows at
  the next sample.  With the optimizer known to be Adam-family, no step is
  judged until its first moment averages ``1 / (1 - beta1)`` gradients:
  :func:`.optimizer.first_moment_filling`).  Below the band is common and
  intended (fine-tuning at small learning rates), so it is only alerted when
  the median weight layer moves less than ``UPDATE_LOW = 1e-7`` -- among the
  layers meant to move (not those the optimizer holds at rate 0, nor those
  without a gradient that step), and not once the loss has fallen to
  ``CONVERGED = 1e-6`` of where it started (a noiseless fit's weights stop).
* overflow risk (:func:`overflow_alerts`): a module's largest output or
  output-gradient entry within ``HEADROOM = 16`` (four doublings) of the
  largest finite value of the format it computes in -- 65504 in float16,
  which an activation growing 2x per sample crosses within four samples.
* "Too large" is judged only for modules whose weights are at the scale of
  an initialization (:func:`established`: RMS at least ``ESTABLISHED = 0.1``
  / sqrt(fan-in), where Xavier, He, LeCun, PyTorch's default and GPT-2's
  0.02 give 0.2-1.4): a parameter that starts at or near zero (a zero
  positional embedding, adaLN-Zero and ControlNet's zero layers, LayerScale
  at 1e-6, ReZero) is rewritten by its first updates by design, and its
  ratio says nothing about the learning rate until it has grown.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import cast

import torch

from ..layers import tensor_fans
from ..records import Alert, AlertKind, LayerStats, MonitorStep
from ..words import module_label, times
from . import divergence as D
from .spikes import batch_spike

DRIFT = 100.0
BASELINE_SAMPLES = 3
UPDATE_HIGH = 0.1
UPDATE_LOW = 1e-7
ESTABLISHED = 0.1
CREEP = 0.3  # a saturated/dead share must rise by this much from its baseline to be news
CREEP_LIMIT = 0.9
FLOAT16_MAX = 65504.0  # torch.finfo(torch.float16).max
HEADROOM = 16.0
WINDOW = D.WINDOW  # the monitor repeats a loss or gradient-norm alert at most once per WINDOW steps
WARMUP = D.WARMUP


def scalar_alerts(step: int, loss: float | None, grad_norm: float | None, losses: Sequence[float | None],
                  grad_norms: Sequence[float | None], worst_param: str | None, update: float | None = None,
                  updates: Sequence[float | None] = ()) -> list[Alert]:
    """Divergence warnings at ``step`` from the loss and the relative update
    (``update``: ``||dw|| / ||w||`` of the last optimizer step), against the
    previous steps' values (``losses``, ``updates`` exclude the current
    step; None where a step did not read it), and one bad batch
    (``batch-spike``, :mod:`signalprop.monitor.spikes`) where there is no
    divergence warning.  The gradient norm and the parameter whose gradient
    grew most are passed for rules over them; none judges them (measured:
    they add no early warning, see :mod:`signalprop.monitor.divergence`)."""
    out: list[Alert] = []
    g = D.update_growth_alarming(updates, update, losses, loss) if updates or update is not None else None
    if g is not None:
        out.append(Alert(step, "update-growth", "(model)",
                         f"each optimizer step now changes the weights by {g.level:.2%} of their norm (median of "
                         f"the last {D.SMOOTH} steps), {g.level / g.earlier:.3g}x the {g.earlier:.2%} of "
                         f"{D.UPDATE_SPAN} steps ago, rising for {D.UPDATE_PERSIST} steps while the loss made no "
                         f"progress over {D.UPDATE_SPAN}: past the stable learning rate larger weights give larger "
                         "gradients and larger steps, and the loss turns non-finite within tens of steps",
                         "lower the learning rate (with a warm-up: the rate reached about here is past the stable "
                         "one; a longer warm-up), or clip (sp.clip.agc_, monitor(..., agc=0.01))"))
    u = D.unlearned(losses, loss) if loss is not None else None
    if u is not None:
        out.append(Alert(step, "loss-spike", "(loss)",
                         f"the loss ({u.level:.4g}, median of the last {D.SMOOTH} steps) has given back "
                         f"{u.share:.0%} of what training had gained: it started at {u.start:.4g} and had reached "
                         f"{u.best:.4g}; a run past its stable learning rate un-learns like this before its loss "
                         "turns non-finite",
                         "lower the learning rate (with a warm-up: the rate reached about here is past the stable "
                         "one), or clip (sp.clip.agc_, monitor(..., agc=0.01)); if several batches in a row were "
                         "bad, check the data", "forward"))
    x = D.loss_explosion(losses, loss) if loss is not None and u is None else None
    if x is not None:
        out.append(Alert(step, "loss-spike", "(loss)",
                         f"the loss ({x.level:.4g}, median of the last {D.SMOOTH} steps) is {times(x.level / x.start)} "
                         f"where this run started ({x.start:.4g}) and has grown {x.growth:.3g}x or more at each of "
                         f"its last {D.SMOOTH} steps: a run past its stable learning rate from its first steps (a "
                         "fine-tuning or resumed run at too high a rate) grows like this until it turns non-finite",
                         "lower the learning rate (for fine-tuning, well below the pre-training rate), or clip "
                         "(sp.clip.agc_, monitor(..., agc=0.01))", "forward"))
    s = batch_spike(losses, loss) if loss is not None and not out else None
    if s is not None:
        out.append(Alert(step, "batch-spike", "(loss)",
                         f"this step's loss {s.loss:.4g} is {s.sigmas:.3g} sigma above the last {D.WINDOW} steps' "
                         f"median {s.level:.4g} and above where training started ({s.start:.4g}): one bad batch "
                         "(a transient spike, not a divergence by itself)",
                         "check the batch's data (labels, tokens, padding); monitor(..., skip=optimizer) skips the "
                         "optimizer step of such a batch so its gradient never reaches the weights", "forward"))
    return out


def _baseline(base: Sequence[dict[str, LayerStats]], name: str, attr: str) -> float | None:
    """Median of ``attr`` of layer ``name`` over the baseline samples (each by name, :func:`_by_name`)."""
    vals = []
    for named in base:
        layer = named.get(name)
        if layer is not None:
            v = getattr(layer, attr)
            if v is not None and math.isfinite(v) and v > 0:
                vals.append(v)
    return statistics.median(vals) if vals else None


def _by_name(layers: Sequence[LayerStats]) -> dict[str, LayerStats]:
    out: dict[str, LayerStats] = {}
    for layer in layers:
        out.setdefault(layer.name, layer)  # a module called twice: its first call
    return out


def _fell(f: float) -> str:
    """``fell 400x``, or ``fell to exactly 0`` for a gradient that is gone (an unbounded factor)."""
    return f"fell {times(f)}" if math.isfinite(f) else "fell to exactly 0"


def sampled_alerts(current: MonitorStep, history: Sequence[MonitorStep], drift: float = DRIFT) -> list[Alert]:
    """Per-layer drift of gradient RMS (by more than ``drift``, the monitor's
    ``trend``), creeping saturation and dead shares, comparing ``current``
    with the first samples of ``history`` (which does not contain
    ``current``).  One alert per kind per sample, naming the layer that moved
    most and how many moved."""
    out: list[Alert] = []
    if len(history) < 1:
        return out
    # each baseline sample's layers by name, once: a lookup per layer instead of a scan (O(rows^2) a sample)
    base_hist = [_by_name(h.layers) for h in history[:BASELINE_SAMPLES]]
    grew: list[tuple[float, str]] = []
    shrank: list[tuple[float, str]] = []
    by_name = _by_name(current.layers)
    for name, layer in by_name.items():
        # relative to the output's gradient: a converging run's gradients all shrink with
        # its loss, which is no vanishing; a layer falling behind the output's is
        v = layer.relative_grad_rms
        b = _baseline(base_hist, name, "relative_grad_rms")
        if v is None or b is None or not math.isfinite(v):
            continue
        if v > drift * b:
            # and the gradient itself grew as much: a converging transformer's output gradient falls 4-10x with its
            # loss while attention starts routing more to the first blocks (10-30x) -- healthy ViTs read 60-160x
            # relative after a few hundred steps, and only an absolute growth says the gradient exploded
            g, gb = layer.grad_rms, _baseline(base_hist, name, "grad_rms")
            if g is None or not gb or g > drift * gb:
                grew.append((v / b, name))
        elif v < b / drift:
            shrank.append((b / v if v > 0 else math.inf, name))
    if grew:
        f, name = max(grew)
        label = module_label(name, by_name[name].kind)
        out.append(Alert(current.step, "exploding", name,
                         f"The gradient at {label} grew {times(f)} since the first samples. Its RMS relative to the "
                         f"gradient at the model's output moved more than the {drift:g}x allowed "
                         f"({_layers(len(grew))} past it).",
                         "lower the learning rate for this layer's group, clip (sp.clip.agc_), or add "
                         "normalisation / a residual path", "backward"))
    if shrank:
        f, name = max(shrank)
        label = module_label(name, by_name[name].kind)
        out.append(Alert(current.step, "vanishing", name,
                         f"The gradient at {label} {_fell(f)} since the first samples. Its RMS relative to the "
                         f"gradient at the model's output moved more than the {drift:g}x allowed "
                         f"({_layers(len(shrank))} past it).",
                         "look for saturating or dying units upstream (this report's saturation/dead columns); "
                         "a smaller learning rate or a different initialization (sp.init.critical_)", "backward"))
    for kind, attr, limit in (("saturated", "saturation", CREEP_LIMIT), ("dead", "dead_fraction", CREEP_LIMIT)):
        moved: list[tuple[float, str, float, float]] = []
        for name, layer in _by_name(current.layers).items():
            v = getattr(layer, attr)
            base = [getattr(named[name], attr) for named in base_hist if name in named]
            base = [b for b in base if b is not None]
            if v is None or not base:
                continue
            b = statistics.median(base)
            if v > limit and v - b > CREEP:
                moved.append((v - b, name, b, v))
        if moved:
            _, name, b, v = max(moved)
            label = module_label(name, by_name[name].kind)
            what = "saturated outputs" if kind == "saturated" else "dead units"
            out.append(Alert(current.step, cast(AlertKind, kind), name,
                             f"{label} is {kind}: its share of {what} rose from {b:.0%} at the first samples to "
                             f"{v:.0%}, past {limit:.0%} ({_layers(len(moved))} past it).",
                             "lower the learning rate; for saturation, normalise the pre-activations or use "
                             "a non-saturating activation; for dead units, a leaky activation or smaller steps",
                             "forward"))
    return out


def established(params: Sequence[torch.Tensor], norms: Sequence[float], fan_ins: Sequence[int] | None = None) -> bool:
    """Whether a module's parameters are at the scale of an initialization:
    each matrix/filter (each 1-D parameter when it has none) with RMS at
    least ``ESTABLISHED / sqrt(fan_in)``, from its norm ``norms[i]``.
    ``fan_ins``: each parameter's fan-in from the module's wiring
    (:func:`signalprop.layers.param_fan_ins`); default torch's tensor rule."""
    mats = [i for i, p in enumerate(params) if p.dim() >= 2]
    for i in mats or range(len(params)):
        p = params[i]
        n = max(p.numel(), 1)
        fan_in = fan_ins[i] if fan_ins is not None else tensor_fans(p)[0] if p.dim() >= 2 else 1
        if not norms[i] / math.sqrt(n) >= ESTABLISHED / math.sqrt(max(fan_in, 1)):
            return False
    return True


def _layers(n: int) -> str:
    return "1 layer" if n == 1 else f"{n} layers"


def update_alerts(step: int, ratios: Sequence[tuple[str, float]], weight_layers: set[str],
                  judged: set[str] | None = None, kinds: Mapping[str, str] | None = None,
                  converged: bool = False) -> list[Alert]:
    """The update/weight ratio of the optimizer step taken at ``step``;
    ``judged``: the modules whose ratio may be too large (see
    :func:`established`; default all); ``kinds``: each module's class, to
    name an unnamed Sequential child as ``Linear #18``; ``converged``: the
    loss has fallen by :data:`CONVERGED` of where it started (a noiseless
    fit reaching 1e-14), so weights that barely move are the fit's end, not
    a rate too small."""
    out: list[Alert] = []
    finite = [(r, n) for n, r in ratios if math.isfinite(r)]
    if not finite:
        return out
    high = [(r, n) for r, n in finite if r > UPDATE_HIGH and (judged is None or n in judged)]
    if high:
        r, n = max(high)
        label = module_label(n, (kinds or {}).get(n))
        out.append(Alert(step, "update-too-large", n,
                         f"The optimizer step changed {label}'s weights by {r:.3g} of their norm. That is above "
                         f"{UPDATE_HIGH:g}, where the usual band is 1e-4 to 1e-2 "
                         f"({'1 module' if len(high) == 1 else f'{len(high)} modules'} above it).",
                         "lower the learning rate for this group (or use warm-up); clip (sp.clip.agc_)", "update"))
    weights = [r for r, n in finite if n in weight_layers]
    if weights and not converged and statistics.median(weights) < UPDATE_LOW:
        med = statistics.median(weights)
        # not moved at all: no optimizer step reached them between the two reads -- parameters the optimizer
        # does not hold, or mon.step called between the micro-batches of one optimizer step
        out.append(Alert(step, "update-too-small", "(model)",
                         f"The weights barely moved. The median weight layer changed by {med:.3g} of its norm in one "
                         f"step, below {UPDATE_LOW:g}, where the usual band is 1e-4 to 1e-2.",
                         "check that the optimizer holds these parameters; with gradient accumulation, call mon.step "
                         "once per optimizer step (after the last micro-batch's backward), not once per micro-batch"
                         if med == 0 else
                         "raise the learning rate, or check that the optimizer holds these parameters", "update"))
    return out


# a loss at this share of where it started (or below) has converged: its weights stop moving by design
CONVERGED = 1e-6


def converged(losses: Sequence[float | None], start: float | None) -> bool:
    """Whether the last finite loss is at most ``CONVERGED`` times ``start`` (a positive starting level)."""
    last = next((v for v in reversed(losses) if v is not None and math.isfinite(v)), None)
    return start is not None and start > 0 and last is not None and abs(last) <= CONVERGED * start


# input_absmax is measured only where no module wrote the input: the tensor a parent's own code made
OWN_CODE_INPUT = "input (made by its parent's own code, not by a module)"
# (what, statistic, phase) of the largest |value| entries the headroom rules watch
HEADROOM_QUANTITIES = (("output", "forward_absmax", "forward"), ("gradient", "grad_absmax", "backward"),
                       (OWN_CODE_INPUT, "input_absmax", "forward"))


def headroom_quantities(sample: MonitorStep) -> tuple[tuple[str, str, str], ...]:
    """The quantities whose headroom ``sample`` is judged on: under a
    GradScaler (``sample.loss_scale``) not the gradients, whose float16 range
    the scaler manages (it raises its scale until they overflow, then skips
    that step and halves it; their statistics are the true, unscaled ones)."""
    if sample.loss_scale is None:
        return HEADROOM_QUANTITIES
    return tuple(q for q in HEADROOM_QUANTITIES if q[2] != "backward")


def overflow_alerts(current: MonitorStep, limit: float = FLOAT16_MAX, headroom: float = HEADROOM) -> list[Alert]:
    """Overflow risk on a sampled step: the module whose largest output or
    output-gradient entry (``forward_absmax``, ``grad_absmax``) is within
    ``headroom`` of ``limit``, the largest finite value of the dtype it
    computes in (float16: 65504; the caller passes the run's -- the autocast
    dtype or the parameters' -- since float32 and bfloat16, at 3.4e38, never
    come near).  One alert per sample, naming the module with the least
    headroom and how many are within it."""
    close: list[tuple[float, str, str]] = []
    quantities = headroom_quantities(current)
    for name, layer in _by_name(current.layers).items():
        for what, attr, _ in quantities:
            v = layer.stats.get(attr)
            if v is not None and math.isfinite(v) and v > 0 and limit / v < headroom:
                close.append((limit / v, name, what))
    if not close:
        return []
    room, name, what = min(close)
    layer = _by_name(current.layers)[name]
    n = len({n for _, n, _ in close})
    return [Alert(current.step, "overflow-risk", name,
                  f"The {what} of {module_label(name, layer.kind)} is {math.log2(room):.1f} doublings from "
                  f"overflowing. Its largest |{what}| entry is 1/{room:.3g} of the largest finite value of its "
                  f"format ({limit:g}), within the {headroom:g}x headroom "
                  f"({'1 module' if n == 1 else f'{n} modules'} within it).",
                  "with float16, use a GradScaler for gradients, or bfloat16 (float32's range); scale the "
                  "module's input or output down (normalise it), or lower the learning rate if it is growing",
                  "backward" if what == "gradient" else "forward")]
