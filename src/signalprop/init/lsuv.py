"""``lsuv_``: layer-sequential unit variance (Mishkin & Matas 2016), in one pass.

The original runs one forward pass per layer per iteration, in registration
order.  Here each layer is rescaled inside its own forward hook, and the
hook hands the corrected output on, so every later layer already sees
calibrated inputs: one pass calibrates the whole network, in *execution*
order, and a second pass verifies it.  Further passes happen only where the
tolerance is still missed (dropout, batch statistics, shared modules).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..layers import CONV_TRANSPOSE, WEIGHT_LAYERS, computed_weight, left_as_they_were, settable
from ..records import InitSummary, LayerInit
from ._transaction import check_generator, transactional, writable
from .orthogonal import _orthogonal_fill


def _channel_dim(m: nn.Module) -> int:
    return -1 if isinstance(m, nn.Linear) else 1


def _per_channel(y: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(y.dim()) if d != dim % y.dim()]
    var, mean = torch.var_mean(y, dim=dims, unbiased=False)
    return var, mean


def _view(v: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * y.dim()
    shape[dim] = -1
    return v.reshape(shape)


@transactional
def lsuv_(model: nn.Module, inputs: Any, *, target: float = 1.0, tol: float = 0.05, max_iter: int = 10,
          per_channel: bool = False, mean_correction: bool = False, orthogonal: bool = True,
          generator: torch.Generator | None = None) -> InitSummary:
    """Scale every Linear/Conv layer so its output variance on ``inputs`` is ``target``.

    ``tol``: relative tolerance, |Var - target| <= tol * target.
    ``per_channel``: one scale per output channel/feature instead of per layer.
    ``mean_correction``: also shift each layer's bias so its output has zero
    mean (per channel).  ``orthogonal``: start from orthogonal weights (the
    paper's first step) drawn from ``generator``.

    Layers are calibrated in execution order; in-place activations and
    modules called more than once work.  Buffers (BatchNorm statistics), the
    train/eval mode, gradients and RNG states come back as they were; only the
    weights (and biases) change -- and those too are restored if a pass fails.
    Returns an :class:`InitSummary` with each layer's final scale and the
    forward passes used.
    """
    from ..probe.inputs import call_model
    from ..probe.state import preserved

    if not isinstance(model, nn.Module):
        raise TypeError(f"lsuv_ takes an nn.Module, got {type(model).__name__}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (target, tol)) or \
            not isinstance(max_iter, int) or isinstance(max_iter, bool):
        raise TypeError(f"target and tol are numbers and max_iter a whole number; got target={target!r}, "
                        f"tol={tol!r}, max_iter={max_iter!r}")
    if not (0 < target < math.inf and 0 < tol < 1 and max_iter >= 1):
        raise ValueError(f"need 0 < target < inf, 0 < tol < 1 and max_iter >= 1; got target={target}, tol={tol}, "
                         f"max_iter={max_iter}")
    from ..probe.inputs import tensors_of

    check_generator(model, generator)

    bad = [t for t in tensors_of(inputs) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"lsuv_: the calibration inputs contain NaN/Inf ({int((~torch.isfinite(bad[0])).sum())} "
                         f"entries of a tensor of shape {tuple(bad[0].shape)}): LSUV would scale the weights by them")
    names = {m: n for n, m in model.named_modules()}
    weighted = [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    layers = [m for m in weighted if not computed_weight(m)]  # a rescale would not reach those: skipped
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layers for LSUV")
    scale: dict[nn.Module, float] = {m: 1.0 for m in layers}
    order: list[nn.Module] = []
    status: dict[nn.Module, str] = {}

    def hook(m: nn.Module, args: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor):
            if orthogonal and m not in order:  # its orthogonal start was drawn: said, not listed as left as it was
                order.append(m)
                status[m] = "orthogonal start only: its output is not a tensor, not calibrated"
            return None
        if m in seen:
            return None  # a shared module is calibrated on its first call of each pass
        seen.add(m)
        if m not in order:
            order.append(m)
        y = out.detach().float()
        dim = _channel_dim(m)
        if per_channel:
            var, mean = _per_channel(y, dim)
        else:
            var, mean = torch.var_mean(y, unbiased=False)
        if not bool(torch.isfinite(var).all()):
            raise ValueError(f"lsuv_: the output of {names.get(m, '?')} ({type(m).__name__}) on the calibration "
                             "inputs is non-finite, so no finite scale exists; the model is left unchanged")
        if bool((var <= 0).any()):
            status[m] = "zero output variance: left as is"
            return None
        ok = bool(((var - target).abs() <= tol * target).all())
        if ok and not (mean_correction and bool((mean.abs() > math.sqrt(tol * target)).any())):
            status[m] = "rescaled, verified" if status.get(m, "").startswith("rescaled") else "ok"
            return None
        changed.append(m)
        s = torch.sqrt(target / var)
        b = getattr(m, "bias", None)
        with torch.no_grad(), writable(m, "weight") as w:  # through a parametrisation when there is one
            groups = getattr(m, "groups", 1)
            if per_channel and isinstance(m, CONV_TRANSPOSE) and groups > 1:
                # weight (in, out / groups, *k): output channel g * (out / groups) + j is column j of group g's rows
                wg = w.view(groups, w.shape[0] // groups, *w.shape[1:])
                wg.mul_(s.view(groups, 1, w.shape[1], *[1] * (w.dim() - 2)).to(w.dtype))
            else:
                out_dim = 1 if isinstance(m, CONV_TRANSPOSE) else 0
                sw = _view(s, w, out_dim) if per_channel else s
                w.mul_(sw.to(w.dtype))
            sy = _view(s, out, dim) if per_channel else s
            if b is not None:
                bv = _view(b.detach().float(), out, dim)
                new = (out.float() - bv) * sy + bv
            else:
                new = out.float() * sy
        if mean_correction and b is not None and settable(m, "bias"):
            mu = _per_channel(new, dim)[1]
            with torch.no_grad(), writable(m, "bias") as bw:  # (a parametrised bias: through its parametrisation)
                bw.sub_(mu.to(bw.dtype))
            new = new - _view(mu, new, dim)
        scale[m] *= float(s.mean())
        status[m] = "rescaled"
        return new.to(out.dtype)

    # The orthogonal start is drawn at each layer's first call, so a layer whose forward never runs (an
    # nn.MultiheadAttention's out_proj, whose weight the attention reads directly) is left as it was, as the
    # summary says, not redrawn and never calibrated.  Without generator=, the draws come from a generator
    # seeded by one draw of the global RNG, taken now: the calibration passes put the global RNG back after
    # them (a dropout in the model does not move it), and the draws still advance it.
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64)) if orthogonal and generator is None else 0
    own: dict[torch.device, torch.Generator] = {}
    drawn: set[nn.Module] = set()

    def draw(m: nn.Module, args: Any) -> None:
        if not orthogonal or m in drawn:
            return
        drawn.add(m)
        with torch.no_grad():
            with writable(m, "weight") as w:
                g = generator
                if g is None:
                    g = own.get(w.device)
                    if g is None:
                        g = own[w.device] = torch.Generator(w.device).manual_seed(seed)
                _orthogonal_fill(w, 1.0, g)
            if getattr(m, "bias", None) is not None and settable(m, "bias"):
                with writable(m, "bias") as b:
                    b.zero_()

    passes = 0
    with preserved(model, writes_parameters=True):  # weights come back on failure through @transactional
        handles = [m.register_forward_pre_hook(draw) for m in layers]
        handles += [m.register_forward_hook(hook) for m in layers]
        try:
            for _ in range(max_iter + 1):
                seen: set[nn.Module] = set()
                changed: list[nn.Module] = []
                with torch.no_grad():
                    call_model(model, inputs)
                passes += 1
                if not changed:
                    break
        finally:
            for h in handles:
                h.remove()
    recs = tuple(LayerInit(names.get(m, "?"), type(m).__name__, None, scale=scale[m], note=status.get(m, "not run"))
                 for m in order)
    notes = [] if not changed else [f"tolerance still missed after {passes} passes in "
                                    f"{', '.join(names.get(m, '?') for m in changed)}"]
    # every parameter left as it was: those of layers whose forward never ran or whose weight is computed,
    # and those of modules LSUV does not scale (embeddings, norms, an attention's in_proj_weight)
    skipped = tuple(left_as_they_were(model, [(names.get(m, ""), m) for m in order]))
    return InitSummary("lsuv", layers=recs, skipped=skipped, notes=tuple(notes), forward_passes=passes)
