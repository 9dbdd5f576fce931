"""One diagnosed pass, the engine both drivers share: capture (the
:class:`~.recorder.Recorder`'s hooks) -> accumulate (:mod:`.stats`, values
left on the device) -> gather (:mod:`.gather`: one transfer, or one
all-reduce) -> rows (:mod:`.rows`) -> judge (:mod:`.diagnose`).
:func:`signalprop.check` runs it once; the monitor runs its parts on sampled
steps and :func:`run_pass` itself to replay a step that turned non-finite."""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..layers import BATCHNORMS, WEIGHT_LAYERS, own_parameters
from ..records import InputStats, LayerStats, Report, Summary, evolve
from ..words import count
from .causes import explain
from .diagnose import diagnose
from .distributed import GRAD_NORM, MEAN, NORM, SUM, Reduction, is_ddp, is_sharded
from .gather import finalise, has_nonfinite, underflowed
from .inputs import COTANGENT_SEED, ModelError, as_own_pass, call_model, cotangent, prepare_inputs, shapes, tensors_of
from .norms import ParamNorms
from .predict import predictions
from .recorder import Recorder, Row, model_output, written_after
from .rows import layer_stats
from .stats import Part, acc, exact_acc


def check_model(model: Any, fn: str) -> None:
    """What check and monitor can hook: a plain ``nn.Module`` (TorchScript and
    ``torch.compile`` wrappers run their forward outside module hooks)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(f"{fn}() needs the Python module: a TorchScript module ({type(model).__name__}, from "
                         "torch.jit.trace/script) runs its graph without module hooks, so no layer could be "
                         "measured; pass the model you traced")
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise ValueError(f"{fn}() needs the Python module: torch.compile's wrapper runs compiled code without "
                         f"module hooks; pass model._orig_mod (the {type(model._orig_mod).__name__} it wraps) -- "
                         "calls through the wrapper then trace its hooks, with graph breaks and recompilations "
                         "on measured steps, when the wrapper is first called after this (code it compiled before "
                         "runs without them); to keep the compiled speed, compile the blocks instead "
                         "(model.blocks[i] = torch.compile(model.blocks[i])): each compiled block is measured as "
                         "one layer")
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError(f"{fn}() needs the Python module: this {type(model).__name__} was compiled in place "
                         "(model.compile()), which runs compiled code through the hooks a measurement needs; "
                         f"call {fn}() on an uncompiled instance (or before model.compile())")
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{fn}() cannot measure gradients under torch.inference_mode(): call it outside that block")


def check_materialised(named: Iterable[tuple[str, nn.Module]], fn: str) -> None:
    """A lazy module (``nn.LazyLinear``, ``LazyConv2d``) has no shape until its
    first forward, and parameters on the meta device have no values:
    refused with the module's name (``named``: the model's
    ``named_modules()``) rather than torch's error from deep inside the pass."""
    for name, m in named:
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"{fn}() needs the model's parameters, but {name or '(root)'} ({type(m).__name__}) is "
                             "lazy and not initialised yet: run one forward pass (model(x)) first, then call "
                             f"{fn}()")
        if any(p is not None and p.is_meta for p in m._parameters.values()):
            raise ValueError(f"{fn}() needs the model's parameters, but {name or '(root)'}'s are on the meta device "
                             "(no values): load or initialise the weights first (model.to_empty(device='cpu') then "
                             "an initialiser, or load_state_dict(..., assign=True)); a stateless template that "
                             "torch.func.functional_call fills (torch's model-ensembling recipe) holds no values by "
                             "design: keep it out of the model's registered modules (in a plain list attribute)")


def check_limits(bounds: tuple[float, float], trend: float) -> None:
    """The verdict's limits, as check and monitor take them: 0 < low < high, trend > 1."""
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
        raise ValueError(f"bounds must be (low, high), got {bounds!r}")
    lo, hi = bounds
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (lo, hi, trend)):
        raise TypeError(f"bounds and trend are numbers, got bounds={bounds!r} and trend={trend!r}")
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    if not 1 < trend < math.inf:
        raise ValueError(f"trend must be > 1, got {trend}")



def rng_states(params: list[nn.Parameter]) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"
                      and p.device.index is not None})
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


def set_rng_states(states: tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]) -> None:
    torch.set_rng_state(states[0])
    for d, s in states[1]:
        torch.cuda.set_rng_state(s, d)


def _forward(model: nn.Module, x: Any, inputs: Any, rec: Recorder) -> Any:
    mode = rec.functional_mode()
    try:
        with torch.enable_grad(), (mode if mode is not None else contextlib.nullcontext()):
            return call_model(model, x)
    except Exception as e:  # name the module where it failed, keep the original as cause
        where = rec.failed_in(e)
        where = "(model)" if where is None else where
        mod = dict(model.named_modules()).get(where)
        kind = type(mod).__name__ if mod is not None else "?"
        raise ModelError(
            f"forward failed in module '{where or '(root)'}' ({kind}) on inputs of shape "
            f"{shapes(inputs)}: {type(e).__name__}: {e}"
        ) from e


# Bytes of small outputs (see stats.Batches.fits) whose gradients one pass takes back from its own backward
# instead of through a hook per row (see Recorder.captured): they are all held until the backward ends, and
# the pages they take are faulted in anew on every call -- 256 MB of them (a 2,000 x 64 MLP at batch 256)
# cost 80 ms more in the backward than hooks on those rows did, while below a few MB the faults are noise
# and an edge costs a third of a hook's registration (the whole of a small model's rows); beyond it rows
# are hooked
CAPTURE_BYTES = 1 << 22


@as_own_pass
def run_pass(model: nn.Module, inputs: Any, loss_fn: Any, targets: Any, bounds: tuple[float, float],
         trend: float, exact: bool, red: Reduction | None = None, caller: nn.Module | None = None,
         known: tuple[list[nn.Parameter], list[tuple[str, nn.Module]]] | None = None,
         input_leaves: bool = True, precision: bool = False) -> Report | None:
    """One diagnosed pass; None when the fast pass met a non-finite value
    (the caller repeats it with ``exact=True``).  ``known``:
    ``(list(model.parameters()), list(model.named_modules()))`` when the
    caller has them already.  ``red``: combine every
    statistic across the process group; the backward pass then runs as
    training's does (``backward()``, so DDP and FSDP reduce the parameter
    gradients; the saved ``.grad`` comes back afterwards), through ``caller``
    (the DDP wrapper of ``model``) when given.  ``input_leaves``: make the
    floating inputs leaves that require grad (their gradient is measured);
    off, they reach the model exactly as passed.  ``precision``: also count
    every row's low-precision shares (see :mod:`signalprop.formats`)."""
    rec = Recorder(model, exact=exact, unit_vectors=red is not None, named=known[1] if known is not None else None,
                   capture_budget=CAPTURE_BYTES if red is None else 0, precision=precision)
    rec.attach()
    try:
        x, leaves, fed = prepare_inputs(inputs) if input_leaves else (inputs, [], [])
        # the input the statistics read: the first floating leaf, or without leaves the first floating input
        # as passed (its values and finite share are measured all the same, its gradient is not)
        read = leaves[:1] if input_leaves else [t for t in tensors_of(inputs) if t.is_floating_point()][:1]
        # where the first row reads it: the copy the model was fed (see prepare_inputs)
        read_ptr = fed[0].data_ptr() if fed else read[0].data_ptr() if read else 0
        out = _forward(caller if caller is not None else model, x, inputs, rec)
        rec.forward_done()
        y = model_output(out)  # the logits, not the loss a model called with labels= returns first
        if y is None:
            raise ValueError(f"{type(model).__name__} returned {type(out).__name__} with no floating-point "
                             "tensor: nothing to backpropagate")
        if loss_fn is not None:
            loss = loss_fn(out, targets) if targets is not None else loss_fn(out)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else \
                    f"{type(loss).__name__} {loss!r}"[:80]
                raise ValueError(f"loss_fn must return a scalar tensor that depends on the output (the loss to "
                                 f"backpropagate), got {what}; reduce it (e.g. .mean()) and keep it a tensor")
            root, cot = loss, None
            backprop = f"loss {getattr(loss_fn, '__name__', type(loss_fn).__name__)}"
        else:
            root, cot = y, cotangent(y)
            backprop = "a random unit-variance gradient on the output (no loss given)"
        params = [p for p in (model.parameters() if known is None else known[0]) if p.requires_grad]
        wrt = params + leaves + ([y] if loss_fn is not None and y.requires_grad else [])
        if not (params or leaves):
            raise ValueError("nothing in the model requires grad (all parameters frozen and no floating input): "
                             "no gradient to measure; set requires_grad=True on the parameters to diagnose")
        if not root.requires_grad:
            raise ValueError(f"the {'loss' if loss_fn is not None else 'output'} does not depend on any parameter "
                             "or floating input (a constant output, or computed under torch.no_grad()/detach() "
                             "inside forward): no gradient flows back to measure")
        grads: tuple[torch.Tensor | None, ...]
        try:
            if red is None:
                rec.settle_edges()
                # tensors and gradient edges in one list: the engine takes both (typed as either)
                grads = torch.autograd.grad(root, cast(Any, [*wrt, *rec.edges]), grad_outputs=cot,
                                            allow_unused=True)
                rec.captured(grads[len(wrt):])
                grads = grads[:len(wrt)]
            else:
                grads = _backward_synced(root, cot, params, leaves, y if loss_fn is not None else None,
                                         red, caller is not None and is_ddp(caller) or is_sharded(model))
        except Exception as e:  # also what a custom autograd Function's backward raises (HF Reformer's assert)
            # torch.utils.checkpoint(use_reentrant=True) in train mode
            if isinstance(e, RuntimeError) and "incompatible with .grad()" in str(e):
                raise ModelError("the model uses reentrant activation checkpointing (torch.utils.checkpoint with "
                                 "use_reentrant=True; HF's activation_checkpointing_enable()), which recomputes blocks "
                                 "outside the pass check measures: turn it off for check "
                                 "(model.activation_checkpointing_disable() in HF), use use_reentrant=False, or check "
                                 "an HF model in eval mode (HF checkpoints only in training)") from e
            raise ModelError(f"backward failed on inputs of shape {shapes(inputs)}: "
                             f"{'' if isinstance(e, RuntimeError) else type(e).__name__ + ': '}{e}") from e
    finally:
        rec.detach()
    if not rec.rows and rec.transformed:
        raise ValueError(f"check measured no layer of {type(model).__name__}: its forward ran inside torch.func "
                         f"transforms (vmap, grad: {rec.transformed} calls), whose per-sample views no statistic "
                         "reads; check the model the transform maps over (one member of an ensemble, with one set "
                         "of its parameters)")
    n_p, n_l = len(params), len(leaves)
    pnorms = ParamNorms.of(rec.rows, dict(zip(params, grads[:n_p])))
    input_grads = [g for g in grads[n_p:n_p + n_l] if g is not None]
    out_grad = cot if cot is not None else (grads[-1] if len(grads) > n_p + n_l else None)
    with torch.no_grad():
        extra: list[torch.Tensor | Part | float] = [*pnorms.scalars, *_input_scalars(read, input_grads, exact),
            torch.linalg.vector_norm(out_grad, dtype=exact_acc(out_grad) if exact else acc(out_grad))
            if out_grad is not None else 0.0,
            root.float().sum() if loss_fn is not None else 0.0,
            float(out_grad.numel()) if out_grad is not None else 0.0]
    kinds = pnorms.kinds + _INPUT_KINDS[:len(extra) - len(pnorms.scalars) - 3] + [GRAD_NORM, MEAN, SUM]
    # the output's largest entry where no row measured its values (code after the last layer made it, or wrote
    # it in place): NaN or +inf there is a failure no row shows (-inf, a mask, is not).  Across a process group
    # every rank sends one (0 where its rows saw the output: which rank's output is a row's may differ, and the
    # all-reduce must have the same entries on every rank), summed: a NaN on any rank reaches all of them (the
    # maximum of the ranks' values, read in Python, drops a NaN that follows a number)
    unseen = written_after(y, rec.rows)
    read_out = unseen or red is not None
    if read_out:
        with torch.no_grad():
            extra.append(_largest(y) if unseen else 0.0)
        kinds.append(SUM)
    vals, ex = finalise(rec.rows, extra, red, kinds, rec.batched())
    if not exact and has_nonfinite(vals, ex):
        return None
    out_bad = read_out and not math.isfinite(ex.pop())
    if red is None and out_grad is not None and ex[-3] == 0 and out_grad.numel():
        # float32's sum of squares underflowed (a loss scaled by 1e-25: every relative gradient was then 0,
        # "vanishing"; an overflow sends the pass to the exact one): the norm every row is judged against,
        # again in float64, as the exact pass reads it
        with torch.no_grad():
            ex[-3] = float(torch.linalg.vector_norm(out_grad, dtype=exact_acc(out_grad)))
    if not exact and underflowed(vals, bounds[0] * ex[-3] / math.sqrt(max(ex[-1], 1.0))):
        return None
    k = len(pnorms.scalars)
    inp = _input_stats(read, input_grads, ex[k:-3])
    out_rms = ex[-3] / math.sqrt(max(ex[-1], 1.0)) if out_grad is not None else 0.0
    if loss_fn is not None:
        backprop += f" = {ex[-2]:.6g}"
    # the theory's gradients are scaled to the last row's: the square of its reported grad_rms, so the last
    # row's prediction matches the record it sits in
    last_g = vals[-1].get("grad_rms") if vals else None
    pred = predictions(rec.rows, inp, last_g ** 2 if last_g else 0.0, pnorms.weight_norms, read_ptr)
    pgrads = pnorms.values(ex[:k])
    layers = layer_stats(rec.rows, vals, pgrads, out_rms, pred)
    # the gradient at the output is exactly 0 and so is every row's (a loss of exactly 0 from a saturated
    # softmax, one constant in the output, a batch masked out): no backward signal, so none is judged
    silent = out_grad is not None and out_rms == 0 and not any(layer.grad_rms for layer in layers)
    if silent:
        layers = [evolve(layer, relative_grad_rms=None) for layer in layers]
    elif out_grad is None or out_rms == 0:  # the loss does not reach the first output tensor
        last = next((layer.grad_rms for layer in reversed(layers) if layer.grad_rms), None)
        out_rms = last or 1.0
        layers = layer_stats(rec.rows, vals, pgrads, out_rms, pred)
    origin = _backward_origin(rec.rows, layers) if exact else None
    culprit = _own_code_origin(rec, layers, origin) if exact else None
    if origin == AFTER_THE_ROWS and (out_grad is None or math.isfinite(ex[-3])):
        # the gradient at the model's output is finite (the loss's, or check's finite seed): what turned it
        # non-finite on the way to the last layer is the model's own code after that layer -- when that layer's
        # output feeds the output the gradient was read at (else the loss reached it through another output,
        # a second head's targets: the loss's, as said by diagnose)
        carrier = [layer for layer in layers if (layer.grad_nonfinite_fraction or 0) > 0][-1]
        made = rec.rows[carrier.index].output
        if loss_fn is None or (out_grad is not None and made is not None and _feeds(made(), y)):
            culprit = ("", "backward", carrier.name, type(model).__name__)
    masked = _masked_rows(rec.rows, layers, ex, inp) if exact else set()
    held: dict[int, float] = {}
    if masked:  # -inf as a mask, not a failure: diagnosed as the finite entries' statistics, the share kept
        culprit, origin = None, None
        held = {layer.index: layer.nonfinite_fraction for layer in layers if layer.index in masked}
        layers = [evolve(layer, nonfinite_fraction=0.0) if layer.index in masked else layer for layer in layers]
    if out_bad and rec.rows and (inp is None or not inp.nonfinite_fraction) and \
            not any(layer.nonfinite_fraction > 0 for layer in layers):
        # every row finite, the output not: code after the last row made the NaN/Inf -- the forward's, before
        # whatever the backward then carried (the loss's gradient is non-finite because the output is)
        culprit, origin = _after_the_rows(rec, type(model).__name__), None
    merges = _unrecorded_merges(rec.rows, read_ptr)
    stale = _stale_batchnorm(rec.rows)
    layers, repeated = _per_distinct_example(layers, inputs, rec.rows, read_ptr)
    verdict, problems, layers, judged = diagnose(layers, inp, bounds, trend, backward_origin=origin, culprit=culprit,
                                                 residual=merges, zero_gated=zero_gates(model, rec.rows, layers),
                                                 dead_unjudged_from=stale[0].index if stale else None,
                                                 initialisable=initialisable(model))
    if problems:  # the parameters behind a problem, where its mechanism leaves a mark (see .causes)
        problems = explain(problems, layers, rec.rows, model, bounds, dict(zip(params, grads[:n_p])))
    elif silent:  # nothing wrong in the forward, and no backward signal to judge: no verdict, not "healthy"
        verdict = "incomplete"
    notes = judged.pop("notes")
    if repeated:
        notes.append(repeated)
    if held:
        layers = [evolve(layer, nonfinite_fraction=held[layer.index]) if layer.index in held else layer
                  for layer in layers]
        names = [layer.name for layer in layers if layer.index in held]
        notes.append(f"{count(len(names), 'row')} hold -inf entries and nothing worse ({', '.join(names[:3])}"
                     f"{', ...' if len(names) > 3 else ''}: masked logits or log-probabilities), while the "
                     f"{'loss' if loss_fn is not None else 'output'} and every gradient are finite: a mask, not a "
                     "failure; their statistics are over the finite entries")
    if stale:
        # a signal growing or fading after never-updated BatchNorm layers: their running statistics first
        lead = (f"first calibrate the {count(len(stale), 'BatchNorm layer')} in eval mode whose running statistics "
                f"were never updated (from {stale[0].name}): check in train mode (model.train()), or run a few "
                "training batches; if it persists, ")
        problems = [evolve(p, suggestion=lead + p.suggestion,
                           cli_suggestion=lead + p.cli_suggestion if p.cli_suggestion else "")
                    if p.kind in ("exploding", "vanishing") and p.last >= stale[0].index else p for p in problems]
        notes.append(f"{count(len(stale), 'BatchNorm layer')} in eval mode with running statistics never updated "
                     f"(first: {stale[0].name}) pass the signal unnormalised, as neither training nor a trained "
                     "model would: dead units after them are not judged; check in train mode (model.train()) "
                     "to see what training sees")
    unreached = unreached_note(rec.rows, "the loss" if loss_fn is not None else "the output the backward starts "
                               "from (the model's first floating-point output)")
    if silent:
        notes.append(f"the gradient of {'the loss' if loss_fn is not None else 'the seed'} at the model's output "
                     "is exactly 0, and so is every layer's: there is no backward signal (a loss of exactly 0, as a "
                     "saturated softmax gives; a loss that does not depend on the output; every example masked "
                     "out), so no gradient is judged")
    elif unreached:
        notes.append(unreached)
    missing = {id(p) for p, g in zip(params, grads[:n_p]) if g is None}
    # (the names are looked up only when some parameter got no gradient: a walk over every module)
    untrained = "" if silent or not missing else untrained_note(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], missing, rec.rows)
    if untrained:
        notes.append(untrained)
    if rec.transformed:
        notes.append(transformed_note(rec.transformed))
    summary = Summary(model=type(model).__name__, rows=len(layers), backprop=backprop, output_grad_rms=out_rms,
                      bounds=(float(bounds[0]), float(bounds[1])), trend_limit=float(trend),
                      training_mode=model.training, theory=pred is not None, input=inp,
                      notes=tuple(notes), inputs=shapes(inputs), cotangent_seed=None if loss_fn is not None
                      else COTANGENT_SEED, **judged)
    return Report(verdict, tuple(layers), tuple(problems), summary)




def unreached_note(rows: list[Row], start: str) -> str:
    """Which rows that wanted a gradient got none although others did, and
    why they are not judged, or "": ``start``, where the backward began (the
    loss), does not depend on their outputs (another head, an unused
    branch)."""
    unreached = [r.name for r in rows if r.wants_grad and not r.bwd and not r.aliased]
    # a row whose output is a view of its input (nn.Flatten): an in-place op after it moves the view's history
    # and its gradient cannot be read (a copy of the output would change what the in-place op writes)
    views = [r.name for r in rows if r.wants_grad and not r.bwd and r.aliased]
    out = []
    if unreached:
        one = len(unreached) == 1
        out.append(f"{count(len(unreached), 'row')} got no gradient ({', '.join(unreached[:3])}"
                   f"{', ...' if len(unreached) > 3 else ''}): {start} does not depend on "
                   f"{'its output' if one else 'their outputs'} (another head -- one another loss or backward "
                   "trains --, an unused branch), or the backward was restricted to other tensors "
                   "(backward(inputs=...)), so "
                   f"{'its gradient is' if one else 'their gradients are'} not judged")
    if views:
        one = len(views) == 1
        out.append(f"{count(len(views), 'row')} got no gradient ({', '.join(views[:3])}"
                   f"{', ...' if len(views) > 3 else ''}): {'its output is a view' if one else 'their outputs are views'}"
                   f" of {'its' if one else 'their'} input, which an in-place operation after "
                   f"{'it' if one else 'them'} (ReLU(inplace=True)) rewrote -- its gradient is out of reach there -- "
                   f"or {start} does not depend on {'it' if one else 'them'}; not judged")
    return "; ".join(out)


def _masked_rows(rows: list[Row], layers: list[LayerStats], ex: list[float], inp: InputStats | None) -> set[int]:
    """The exact pass's rows whose non-finite outputs are all -inf -- a mask
    (``logits.masked_fill(mask, -inf)`` before a ``LogSoftmax``, which keeps
    them -inf) -- when nothing else is non-finite: the input, the loss, the
    output's gradient, every row's gradient and every parameter gradient
    finite, and every row's output free of NaN and +inf; and no row in a
    low-precision format made them from finite inputs (an overflow).  Empty
    otherwise (then the NaN/Inf is a failure, located as ever)."""
    bad = [layer for layer in layers if layer.nonfinite_fraction > 0]
    if not bad or (inp is not None and inp.nonfinite_fraction > 0) or not all(map(math.isfinite, ex)) \
            or any((layer.grad_nonfinite_fraction or 0) > 0 for layer in layers):
        return set()
    for layer in bad:
        row = rows[layer.index]
        ref = row.output
        t = ref() if ref is not None else None
        if t is None or t.is_complex():
            return set()
        # a low-precision row that made -inf out of finite inputs overflowed (float16's 65504): a failure, not a
        # mask -- a float32 one that far out would have overflowed the weights' norms too (checked above);
        # a row that fills a mask itself (torch.where(mask, x, -inf)) or passes one on (a LogSoftmax of
        # masked logits) keeps it; called with keyword arguments only, its inputs are not known
        made = bool(row.inputs_finite) and all(bool(f) for f in row.inputs_finite)
        if made and row.low:
            return set()
        with torch.no_grad():
            if bool((torch.isnan(t) | (t == math.inf)).any()):
                return set()
    return {layer.index for layer in bad}


def _per_distinct_example(layers: list[LayerStats], inputs: Any, rows: list[Row], read_ptr: int
                          ) -> tuple[list[LayerStats], str]:
    """Each rectifier row's samples per unit counted as one example's
    positions, and a note, where the batch is one example repeated: a lone
    input tensor whose every row along dim 0 is the same (``torch.ones(128,
    d)``, a smoke test's input; ``x[:1].expand(128, d)``), read by the first
    row as it is -- every copy puts each unit on the same side of 0, so
    about half of a healthy layer's units look dead on it.  Not where the
    model takes other tensors beside it (a graph's adjacency, a mask, a
    context: its rows need not be examples) nor where the rows merely repeat
    some examples (a sequence-first batch's padded steps are not copies of
    an example).  Looked for only where some row has dead units."""
    if not any(layer.dead_fraction for layer in layers) or not rows or not read_ptr or rows[0].src != read_ptr:
        return layers, ""
    ts = tensors_of(inputs)
    if len(ts) != 1 or ts[0].dim() < 2 or ts[0].shape[0] < 2 or ts[0].is_sparse:
        return layers, ""
    x = ts[0].detach()
    with torch.no_grad():
        if not torch.equal(x, x[:1].expand_as(x)):
            return layers, ""
    b = x.shape[0]
    out = [evolve(layer, dead_samples=layer.dead_samples // b) if layer.dead_samples else layer for layer in layers]
    return out, (f"the batch is one example repeated {b} times: dead units are judged on that one example (every "
                 "copy puts a unit on the same side of 0)")


def initialisable(model: nn.Module) -> bool:
    """Whether ``model`` has a layer :mod:`signalprop.init` sets (a Linear or
    a convolution, subclasses included), for which a re-initialisation is a fix."""
    return any(isinstance(m, WEIGHT_LAYERS) for m in model.modules())


def untrained_note(named: list[tuple[str, nn.Parameter]], missing: set[int], rows: list[Row], when: str = "") -> str:
    """The trainable parameters (``named``) the backward did not reach while
    it reached others (``missing``: their ids), or "": experts no example was
    routed to, a branch cut by a ``detach()``, a mask token without a mask, a
    module the forward did not call -- they do not train on this batch.
    Those of rows the loss does not reach are named by :func:`unreached_note`
    already.  ``when``: said after "got no gradient" (the monitor's " in this
    step")."""
    if not missing or len(missing) == len(named):
        return ""
    missing = missing - {id(p) for r in rows if r.wants_grad and not r.bwd and r.module is not None
                         for p in r.module.parameters()}  # (a fused or scripted row's children's too)
    names = [n for n, p in named if id(p) in missing]
    if not names:
        return ""
    return (f"{count(len(names), 'trainable parameter')} got no gradient{when} ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}): the backward does not reach them (a branch this input does not "
            "take -- an expert no example was routed to, a mask token without a mask --, a branch cut by a "
            "detach(), a module the forward did not call), so they would not train on this batch")


def measured_modules(rows: list[Row]) -> set[int]:
    """The ids of the modules whose gradient some row of the pass measured."""
    return {id(r.module) for r in rows if r.bwd and r.module is not None}


def transformed_note(n: int) -> str:
    """What ``n`` module or activation calls made inside ``torch.func``
    transforms (``vmap``, ``grad``: an ensemble's ``vmap`` of
    ``functional_call``) leave out, or "": their outputs are the transform's
    per-sample views, which no statistic can be read from."""
    if not n:
        return ""
    return (f"{count(n, 'call')} inside torch.func transforms (vmap, grad) are not measured: their outputs are the "
            "transform's per-sample views, which no statistic reads")


# the names a multiplicative gate on a block's branch goes by (ReZero's alpha, LayerScale's gamma, ...)
_GATE_NAME = re.compile(r"(alpha|gamma|gate|scale|resweight|rezero|layer_?scale|ls\d*)", re.IGNORECASE)


def zero_gates(model: nn.Module, rows: list[Row], layers: list[LayerStats]) -> frozenset[str]:
    """The blocks (modules that are not rows, nor the model itself) holding
    an all-zero gate of their own -- a single number (ReZero's ``alpha``) or
    a parameter named as a gate (``gamma``, ``layer_scale``, ...) -- which
    their own code multiplies their branch by: the exact-0 gradients inside
    them are by design.  An all-zero parameter of another name (a token or
    bias added, a ``mask_token``) gates nothing, and the model's own does
    not excuse every row.  Looked for only when some row's gradient is
    exactly 0 (reading a parameter's values is a transfer on a GPU)."""
    if not any(layer.grad_rms == 0 for layer in layers):
        return frozenset()
    rows_at = {id(r.module) for r in rows if r.module is not None}
    return frozenset(name for name, m in model.named_modules() if name and id(m) not in rows_at
                     and any(p is not None and p.numel() and (p.numel() == 1 or _GATE_NAME.fullmatch(k))
                             and not bool(p.detach().any()) for k, p in m._parameters.items()))


def frozen_note(rows: list[Row]) -> str:
    """What a training pass leaves unmeasured for lack of anything to train,
    or "": every row (a frozen model called with gradients on: a teacher, an
    EMA copy), or the rows before and around frozen layers (a frozen
    backbone under a trained head), whose outputs required no gradient.
    Rows without parameters alone (a ``Flatten`` on the input) need no
    word."""
    measured = measured_modules(rows)
    besides = [r.name for r in rows if not r.wants_grad and r.module is not None and id(r.module) in measured]
    said = []
    if besides:  # calls under no_grad of layers that a training call of the same pass also ran (a BYOL target)
        said.append(f"{count(len(besides), 'row')} ran without autograd ({', '.join(besides[:3])}"
                    f"{', ...' if len(besides) > 3 else ''}) besides their layers' training calls, whose rows carry "
                    "the gradient; their forward statistics are judged")
    none = [r for r in rows if not r.wants_grad and not (r.module is not None and id(r.module) in measured)]
    frozen = [r.name for r in none if r.module is not None and own_parameters(r.module)]
    if frozen and len(none) == len(rows):
        said.append("no layer of this pass required a gradient (every parameter it used is frozen): only its "
                    "forward statistics are measured and judged")
    elif frozen:
        names = [r.name for r in none]
        said.append(f"{count(len(names), 'row')} got no gradient ({', '.join(names[:3])}"
                    f"{', ...' if len(names) > 3 else ''}): nothing in or before them trains (frozen: "
                    f"{', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}), so no gradient is computed "
                    "there; their forward statistics are judged")
    return "; ".join(said)


def _stale_batchnorm(rows: list[Row]) -> list[Row]:
    """Rows of BatchNorm layers in eval mode whose running statistics were
    never updated (still mean 0, variance 1)."""
    return [r for r in rows if isinstance(r.module, BATCHNORMS)
            and not r.module.training and r.module.track_running_stats
            and r.module.num_batches_tracked is not None and int(r.module.num_batches_tracked) == 0]


def _unrecorded_merges(rows: list[Row], input_ptr: int) -> bool:
    """Whether rows read tensors that no earlier row wrote (nor the input):
    the mark of residual sums ``x + f(x)`` between blocks, which a plain chain
    of modules does not have (a view of a written tensor counts as written).
    Counted over rows with a floating input, and only when most rows read
    what an earlier one wrote, so a model whose rows all read fresh tensors
    (a functional forward) is not called residual for it."""
    written = {input_ptr, 0}
    fresh = chained = 0
    for r in rows:
        if r.src:
            if r.src in written:
                chained += 1
            else:
                fresh += 1
        written.add(r.dst)
    return fresh >= 2 and chained > fresh


def _ancestors(name: str) -> list[str]:
    """A module name's enclosing modules, innermost first ("a.b.c" -> "a.b", "a"; the root as "")."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _finite_inputs(row: Row) -> bool:
    """Whether the tensors a row read were all finite (recorded by the exact
    pass) -- then the row's own operation made its NaN/Inf (a float16 Linear
    overflowing), whatever code made its input."""
    return bool(row.inputs_finite) and all(bool(f) for f in row.inputs_finite)


def _own_code_origin(rec: Recorder, layers: list[LayerStats], backward: int | None
                     ) -> tuple[str, str, str, str] | None:
    """Where a NaN/Inf was made by a module's *own* code (``torch.log`` in a
    block's ``forward``) rather than by a recorded row: (module name, phase,
    the last row before it, the module's class).  Forward: the first non-finite row does not read
    the previous row's output, so an operation no row recorded made it; the
    module is the innermost enclosing one of the previous row, not of the
    first non-finite one, whose own output is non-finite (else the one
    enclosing both).  Backward: the row whose gradient first turns
    non-finite has no recorded consumer -- the same rule on the rows around
    the unrecorded operation."""
    rows = rec.rows
    first = next((layer.index for layer in layers if layer.nonfinite_fraction > 0), None)
    if first is not None:
        if first == 0 or rows[first].src == rows[first - 1].dst or _finite_inputs(rows[first]):
            return None
        before, after = rows[first - 1], rows[first]
        phase = "forward"
    elif backward is not None:
        bad = [layer.index for layer in layers if (layer.grad_nonfinite_fraction or 0) > 0]
        if not bad or backward in (bad[-1], AFTER_THE_ROWS) or rows[backward].src == rows[bad[-1]].dst:
            return None
        before, after = rows[bad[-1]], rows[backward]
        phase = "backward"
    else:
        return None
    outer = set(_ancestors(after.name))
    own = [a for a in _ancestors(before.name) if a not in outer]
    if phase == "forward":
        bad_out = [a for a in own if rec.parent_nonfinite.get(a)]
        name = bad_out[0] if bad_out else next((a for a in _ancestors(before.name) if a in outer), "")
    else:
        name = own[0] if own else next((a for a in _ancestors(before.name) if a in outer), "")
    module = dict(rec.model.named_modules()).get(name)
    return name, phase, before.name, type(module).__name__ if module is not None else ""


AFTER_THE_ROWS = -1  # a backward origin past the last recorded row (see _backward_origin)


def _largest(y: torch.Tensor) -> torch.Tensor | float:
    """``y``'s largest entry (of its real and imaginary parts): NaN where one
    is NaN, +inf where one is +inf, finite where the others are -inf (a mask)."""
    if y.numel() == 0 or not (y.is_floating_point() or y.is_complex()):
        return 0.0
    t = y.detach()
    if t.is_complex():  # (.real and .imag: views also of a lazily conjugated tensor, which view_as_real refuses)
        return torch.maximum(t.real.amax(), t.imag.amax()).float()
    return t.amax().float()


def _after_the_rows(rec: Recorder, root: str) -> tuple[str, str, str, str]:
    """The culprit (see :func:`_own_code_origin`) of a NaN/Inf in the
    model's output made after every row: the innermost module whose output
    held it (the exact pass reads each enclosing module's), else the root."""
    bad = [n for n, f in rec.parent_nonfinite.items() if f]
    name = max(bad, key=lambda n: len(_ancestors(n)) if n else 0, default="")
    module = dict(rec.model.named_modules()).get(name)
    return name, "forward", rec.rows[-1].name, type(module).__name__ if module is not None else root


def _feeds(t: torch.Tensor | None, y: torch.Tensor, most: int = 100_000) -> bool:
    """Whether ``y`` was computed from ``t``: ``t``'s autograd node among
    ``y``'s ancestors (at most ``most`` nodes walked; read only on the
    exact pass after a NaN/Inf)."""
    if t is None:
        return False
    if t is y:
        return True
    want, start = t.grad_fn, y.grad_fn
    if want is None or start is None:
        return False
    seen, todo = {start}, [start]
    while todo and len(seen) < most:
        node = todo.pop()
        if node is want:
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def _backward_origin(rows: list[Row], layers: list[LayerStats]) -> int | None:
    """The row whose backward turned a finite incoming gradient into a
    non-finite outgoing one: a consumer of the output of the latest row (in
    execution order) whose gradient is non-finite, itself with a finite
    gradient -- or, when no recorded row read that output directly, the next
    row executed after it.  :data:`AFTER_THE_ROWS` when no row after it has a
    finite gradient: the gradient arrived non-finite from what follows the
    recorded rows (the loss and its targets, or code after the last layer)."""
    bad = [layer.index for layer in layers if (layer.grad_nonfinite_fraction or 0) > 0]
    if not bad or any(layer.nonfinite_fraction > 0 for layer in layers):
        return None
    r = rows[bad[-1]]
    produced = r.output() if r.output is not None else None
    finite = [s for s in rows[r.index + 1:] if not (layers[s.index].grad_nonfinite_fraction or 0) > 0]
    for s in finite:
        if produced is not None and any(ref() is produced for ref in s.inputs):
            return s.index
    return finite[0].index if finite else AFTER_THE_ROWS


def _backward_synced(root: torch.Tensor, cot: torch.Tensor | None, params: list[nn.Parameter],
                     leaves: list[torch.Tensor], y: torch.Tensor | None, red: Reduction,
                     framework_reduces: bool) -> tuple[torch.Tensor | None, ...]:
    """The backward pass as distributed training runs it: ``backward()``
    into ``.grad`` (the caller's :func:`preserved` puts the saved gradients
    back), so DDP all-reduces and FSDP2 reduce-scatters the parameter
    gradients; a model replicated without a wrapper gets them averaged here."""
    for p in params:
        p.grad = None
    if y is not None and not y.is_leaf:
        y.retain_grad()
    torch.autograd.backward(root, grad_tensors=cot)
    pg = [p.grad for p in params]
    if not framework_reduces:
        red.average_grads([g for g in pg if g is not None])
    return (*pg, *[x.grad for x in leaves], *([y.grad] if y is not None else []))


# how the input's scalars combine across ranks: norm, sum and count of the
# finite entries, their number, the gradient's norm and number of entries
_INPUT_KINDS = [NORM, SUM, SUM, SUM, GRAD_NORM, SUM]


def _input_scalars(leaves: list[torch.Tensor], grads: list[torch.Tensor], exact: bool) -> list[torch.Tensor | float]:
    """The first input's norm, sum, number of finite entries and of entries,
    and its gradient's norm and size (read under ``no_grad``).  The fast
    pass reads the input as it is: a NaN/Inf in it makes the norm or sum
    non-finite and sends the call to the exact pass, as a non-finite row
    does, which masks those entries and counts the finite ones."""
    if not leaves:
        return []
    x = leaves[0]
    a = acc(x)
    n = float(x.numel())
    if exact:
        finite = torch.isfinite(x)
        xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
        out: list[torch.Tensor | float] = [torch.linalg.vector_norm(xf, dtype=a), xf.sum(dtype=a),
                                           finite.sum(dtype=a), n]
    else:
        out = [torch.linalg.vector_norm(x, dtype=a), x.sum(dtype=a), n, n]
    if grads:
        out += [torch.linalg.vector_norm(grads[0], dtype=acc(grads[0])), float(grads[0].numel())]
    return out


def _input_stats(leaves: list[torch.Tensor], grads: list[torch.Tensor], v: list[float]) -> InputStats | None:
    if not leaves:
        return None
    x = leaves[0]
    finite = max(v[2], 1.0)
    # (an empty input -- a monitor replaying an empty batch -- has no entry, none of them non-finite)
    return InputStats(second_moment=v[0] ** 2 / finite, mean=v[1] / finite,
                      nonfinite_fraction=1.0 - v[2] / v[3] if v[3] > 0 else 0.0,
                      width=int(x.shape[-1]) if x.dim() > 1 else 1,
                      grad_rms=v[4] / math.sqrt(max(v[5], 1.0)) if grads else None)
