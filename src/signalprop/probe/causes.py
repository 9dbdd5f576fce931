"""From a problem to the parameters that caused it.

:mod:`.diagnose` says *what* went wrong and where (the gradient vanishes in
these layers); its fixes follow the kind (rescale the weights).  Three
mechanisms have one cause that a generic fix misses, and each leaves a
mark in the parameters and the measurements that can be checked:

* **Norm weights that collapse the signal.**  HF EfficientNet and MobileViT
  draw BatchNorm's γ from N(0, 0.02) where torch uses 1; with running
  statistics that were never updated (mean 0, variance 1) each norm is
  ``γ x + β`` and multiplies the signal by ~0.02, and 22 of them make the
  output exactly 0.  Found as: a vanishing problem, and norms after its
  first layer whose weight RMS is below ``SMALL_NORM_WEIGHT`` (not all zero:
  a zero-initialised last norm of a residual branch is a design) whose
  product alone passes the lower bound.
* **Exact zeros entering a norm.**  DeiT initialises ``cls_token``,
  ``distillation_token`` and ``position_embeddings`` to exact zeros: the
  tokens built from them alone are zero vectors, which a LayerNorm divides
  by ``sqrt(eps)`` (1e-6 at eps 1e-12), so their gradient is ~1e6x the
  others'.  Found as: an exploding problem at a layer that feeds a norm,
  judged scale-free (so not a small scale overall) and still past the upper
  bound, and parameters of the modules around that layer that are exactly
  zero and get a gradient (they are used).
* **One layer's weight far above its fans' scale** -- GPT-2's ``wte`` drawn
  at std 100 while ``lm_head`` is the same tensor (tied): the logits reach
  RMS ~850 and every gradient behind the read-out is 2.2e3x the output's.
  Found as: an exploding problem whose excess is made by one weight layer
  executed after it (its input's gradient over its output's is past
  ``sqrt(high)``); tied weights are found by identity of the parameter,
  not by name.

Each cause rewrites the problem's why-sentence and fix, names the module
and its parameters (``Problem.parameters``), and keeps the kind, so the
verdict does not change.  Models are never matched by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import cast

import torch
from torch import nn

from ..layers import PASS_THROUGH_NAMES, fans, is_norm_kind, tensor_fans
from ..records import LayerStats, Problem
from ..words import module_label, sci
from .diagnose import _effective
from .predict import _as_torch
from .recorder import Row

SMALL_NORM_WEIGHT = 0.1  # torch initialises norm weights to 1; under 0.1 each norm shrinks the signal 10x or more


def _one_layer_limit(hi: float) -> float:
    """The gain one layer must have to be the cause: sqrt(high), half the upper bound's orders of magnitude."""
    return math.sqrt(hi)


def explain(problems: Sequence[Problem], layers: Sequence[LayerStats], rows: Sequence[Row], model: nn.Module,
            bounds: tuple[float, float], grads: Mapping[nn.Parameter, torch.Tensor | None]) -> list[Problem]:
    """``problems`` with each one whose cause is found rewritten to name it
    (same kind, same rows); ``grads``: the pass's parameter gradients."""
    out = list(problems)
    ties = _ties(model)
    out = _collapsing_norms(out, layers, rows, bounds[0])
    out = _tiny_weights(out, layers, rows)
    out = _zero_parameters_into_a_norm(out, layers, rows, model, bounds[1], grads)
    named = dict(model.named_modules())
    out = _one_layer_gain(out, layers, rows, bounds[1], ties, named)
    out = _one_layer_loss(out, layers, rows, bounds[0], ties, named)
    return out


def _label(layer: LayerStats) -> str:
    return module_label(layer.name, layer.kind)


def _rms(t: torch.Tensor) -> float:
    """The RMS of a weight a problem names, in float64: the squares of a float32 weight of ~1e20 overflow
    float32, and its RMS read "inf" (this runs for the few weights a problem names)."""
    with torch.no_grad():
        return float(t.detach().double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _ties(model: nn.Module) -> dict[int, list[str]]:
    """Each parameter held by several modules (tied embeddings), by id: its names."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {k: v for k, v in names.items() if len(v) > 1}


# ---- norm weights that collapse the signal -----------------------------------------------------------

def _norm_weight(row: Row) -> torch.Tensor | None:
    w = getattr(row.module, "weight", None) if row.module is not None else None
    return w if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() > 0 else None


def _collapsing_norms(problems: list[Problem], layers: Sequence[LayerStats], rows: Sequence[Row],
                      lo: float) -> list[Problem]:
    out = []
    for p in problems:
        through_time = p.first == p.last and "time_grad_ratio" in layers[p.first].stats if p.first >= 0 else False
        if p.kind != "vanishing" or p.first < 0 or p.parameters or through_time:
            out.append(p)
            continue
        small = []
        seen: set[int] = set()
        for r in rows[p.first:]:
            w = _norm_weight(r)
            if w is None or not is_norm_kind(r.kind) or id(r.module) in seen:
                continue
            seen.add(id(r.module))
            rms = _rms(w)
            if 0 < rms < SMALL_NORM_WEIGHT:
                small.append((r, w, rms))
        product = math.prod(rms for _, _, rms in small)
        if not small or product > lo:
            out.append(p)
            continue
        out.append(_norm_problem(p, layers, rows, small, product, lo))
    return out


# a weight layer drawn at RMS x sqrt(fan-in) below this multiplies the signal, and the gradient passing back, by
# 100x less than a scale-keeping one (1; HF's std 0.02 on a 768-wide layer gives 0.55, torch's default ~0.58)
TINY_FAN_SCALE = 0.01


def _tiny_weights(problems: list[Problem], layers: Sequence[LayerStats], rows: Sequence[Row]) -> list[Problem]:
    """A vanishing problem whose weight layers are, by their median, drawn
    far below their fans' scale (:data:`TINY_FAN_SCALE`; HF SAM's vision
    encoder at its config's ``initializer_range`` 1e-10): named as that, with
    the fix, instead of the activation's generic advice."""
    out = []
    for p in problems:
        if p.kind != "vanishing" or p.first < 0 or p.parameters:
            out.append(p)
            continue
        seen: set[int] = set()
        span = []
        for r in rows[p.first:p.last + 1]:
            if r.module is not None and id(r.module) not in seen:
                seen.add(id(r.module))
                span.append(r)
        scaled = _fan_scales(span)
        gs = sorted(g for _, g in scaled)
        if not gs or gs[len(gs) // 2] >= TINY_FAN_SCALE:
            out.append(p)
            continue
        tiny = [(r, g) for r, g in scaled if g < TINY_FAN_SCALE]
        names = tuple(f"{r.name}.weight" if r.name else "weight" for r, _ in tiny)
        what = p.message.split(". ", 1)[0] + "."
        why = (f"{len(tiny)} of its {len(scaled)} weight layers are drawn at RMS x sqrt(fan-in) "
               f"{gs[len(gs) // 2]:.2g} (median; 1 keeps the signal's scale, torch's default is about 0.58, a std of "
               f"0.02 on a 768-wide layer 0.55), first {names[0]}: each multiplies the gradient passing back through "
               "it by about that much.")
        fix = ("redraw the weights at their fans' scale: sp.init.apply_(model, 'kaiming_normal') (or "
               "'xavier_normal' for tanh/sigmoid nets); for a model built from a config, check its initializer "
               "scale (HF's initializer_range) before creating the model")
        cli = "re-initialise with --init kaiming_normal (or --init critical)"
        out.append(replace(p, message=f"{what} {why}", suggestion=fix, cli_suggestion=cli, parameters=names))
    return out


def _fan_scales(rows: Sequence[Row]) -> list[tuple[Row, float]]:
    """(row, RMS x sqrt(fan-in)) of the weight layers among ``rows``: 1 keeps
    the input's scale (LeCun), sqrt(2) for ReLU (He).  The norms are
    computed together, in float64 (see :func:`_rms`), and read in one
    transfer per device and dtype: a deep net's vanishing span holds
    hundreds of weight layers, and a read each was a host sync each (the
    bound of tests/test_check_cost.py)."""
    items: list[tuple[Row, torch.Tensor, int]] = []
    for r in rows:
        w = getattr(r.module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or w.numel() == 0 or is_norm_kind(r.kind):
            continue
        try:
            fan_in = fans(r.module)[0]  # type: ignore[arg-type]
        except (TypeError, ValueError):
            fan_in = tensor_fans(w)[0]
        items.append((r, w, fan_in))
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (_, w, _) in enumerate(items):
        groups.setdefault((w.device, w.dtype), []).append(i)
    norms = [0.0] * len(items)
    with torch.no_grad():
        for idx in groups.values():
            got = torch.stack(torch._foreach_norm([items[i][1].detach() for i in idx], 2, dtype=torch.float64)).tolist()
            for i, v in zip(idx, got):
                norms[i] = v
    return [(r, n / math.sqrt(w.numel()) * math.sqrt(max(fan_in, 1))) for (r, w, fan_in), n in zip(items, norms)]


def _norm_problem(p: Problem, layers: Sequence[LayerStats], rows: Sequence[Row],
                  small: list[tuple[Row, torch.Tensor, float]],
                  product: float, lo: float) -> Problem:
    first, w, _ = small[0]
    with torch.no_grad():
        ws = torch.cat([w.detach().float().flatten() for _, w, _ in small])
        mean, std = float(ws.mean()), float(ws.std()) if ws.numel() > 1 else 0.0
    rms = sorted(r for _, _, r in small)[len(small) // 2]
    kinds = " and ".join(sorted({r.kind for r, _, _ in small}))
    stale = [r for r, _, _ in small if _stale(r.module)]
    measured = ""
    if first.index > 0 and layers[first.index - 1].forward_second_moment > 0:
        fall = layers[first.index - 1].forward_second_moment / max(layers[first.index].forward_second_moment, 1e-300)
        measured = f" (measured at {module_label(first.name, first.kind)}: the mean square falls {fall:.3g}x)"
    names = tuple(f"{r.name}.weight" if r.name else "weight" for r, _, _ in small)
    what = p.message.split(". ", 1)[0] + "."
    drawn = (f"{len(small)} {kinds} layers have weights γ drawn around {mean:.2g} with std {std:.2g} (median RMS "
             f"{rms:.2g}; torch's default is 1)")
    # weight layers drawn far below their fans' scale shrink the signal too (HF draws convolutions at 0.02)
    scales = sorted(g for _, g in _fan_scales(rows[p.first:]))
    low = [g for g in scales if g < SMALL_NORM_WEIGHT * 3]
    also = (f"; {len(low)} weight layers among them, drawn at RMS x sqrt(fan-in) {low[len(low) // 2]:.2g} (median; 1 "
            "keeps the scale), shrink it further" if low else "")
    if len(stale) == len(small):
        why = (f"{drawn}, and in eval mode with running statistics never updated (mean 0, variance 1) each computes "
               f"γ·x + β, so it multiplies the signal and its gradient by about γ{measured}: together {product:.2g}, "
               f"below the lower bound {sci(lo)}.")
    else:
        why = (f"{drawn}, so each sets its output's RMS to about γ's instead of 1{measured}, and the layers between "
               f"them do not restore it: over {len(small)} norms the factors multiply to {product:.2g}, below the "
               f"lower bound {sci(lo)}.")
    fix = (f"set the norms' weights to 1 and biases to 0, as torch does (torch.nn.init.ones_ on each of the {len(small)} "
           f"{kinds} weights, first {names[0]})" +
           (", and redraw the weight layers at their fans' scale: apply_(model, 'kaiming_normal') does both"
            if low else ", or apply_(model, 'kaiming_normal'), which also sets every norm's weight to 1") +
           "; keep a 0 only on the last norm of a residual branch if you want zero-initialised branches (Goyal et "
           "al. 2017)")
    cli = ("re-initialise with --init kaiming_normal (or --init torch_default): either sets every norm's weight to 1 "
           "and bias to 0")
    return replace(p, layer=first.name, message=f"{what} {why[:-1]}{also}.", suggestion=fix, cli_suggestion=cli,
                   parameters=names)


def _stale(m: nn.Module | None) -> bool:
    n = getattr(m, "num_batches_tracked", None)
    return m is not None and not m.training and isinstance(n, torch.Tensor) and int(n) == 0


# ---- exact zeros entering a norm -------------------------------------------------------------------------

def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _zero_parameters_into_a_norm(problems: list[Problem], layers: Sequence[LayerStats], rows: Sequence[Row],
                                 model: nn.Module, hi: float,
                                 grads: Mapping[nn.Parameter, torch.Tensor | None]) -> list[Problem]:
    eff, via = _effective(list(layers))
    modules = dict(model.named_modules())
    out = []
    for p in problems:
        hit = None
        if p.kind == "exploding" and p.first >= 0 and not p.parameters:
            for i in range(p.first, p.last + 1):
                n = via[i]
                v = eff[i]
                if n is None or v is None or v <= hi:
                    continue
                zeros = _used_zeros(layers[i].name, modules, grads)
                if zeros:
                    hit = (i, n, zeros, v)
                    break
        out.append(p if hit is None else _zeros_problem(p, layers, rows, *hit, hi))
    return out


def _used_zeros(name: str, modules: Mapping[str, nn.Module],
                grads: Mapping[nn.Parameter, torch.Tensor | None]) -> list[str]:
    """Parameters of the modules enclosing ``name`` (their own, not their
    children's) that are exactly zero and receive a gradient: used, so a
    vector built from them alone is zero.  Biases are zero by design and
    always add to something else."""
    found = []
    for a in _ancestors(name):
        m = modules.get(a)
        if m is None:
            continue
        for pn, t in m._parameters.items():
            if t is None or pn.endswith("bias") or t.numel() < 2:
                continue
            g = grads.get(t)
            with torch.no_grad():
                if g is not None and not bool(t.detach().any()) and bool(g.detach().ne(0).any()):
                    found.append(f"{a}.{pn}" if a else pn)
    return found


def _zeros_problem(p: Problem, layers: Sequence[LayerStats], rows: Sequence[Row], i: int, n: int,
                   zeros: list[str], judged: float, hi: float) -> Problem:
    row, norm = layers[i], layers[n]
    eps = getattr(rows[n].module, "eps", None)
    g_in, g_out = row.relative_grad_rms or 0.0, norm.relative_grad_rms or 0.0
    jump = f"{g_in / g_out:.3g}x" if g_out > 0 else "far more than"
    owner = zeros[0].rpartition(".")[0]
    listed = ", ".join(z.rpartition(".")[2] for z in zeros)
    eps_words = (f"eps {eps:g}, so it divides a zero vector by sqrt(eps) = {math.sqrt(eps):.2g}: its Jacobian there "
                 f"is {1 / math.sqrt(eps):.2g}" if isinstance(eps, float) and eps > 0 else
                 "no eps to bound the division: its Jacobian there is unbounded")
    what = f"The gradient explodes toward the input at {_label(row)}, for the tokens built from zero parameters."
    why = (f"{listed} of {module_label(owner, None) if owner else 'the model'} are exactly zero, so the vectors built "
           f"from them alone reach {_label(norm)} ({norm.kind}, {eps_words}); the gradient reaching {_label(row)} is "
           f"{jump} the norm output's, and judged scale-free (times its signal's RMS over the norm output's) it is "
           f"{judged:.3g} times the RMS at the model's output, above the upper bound {sci(hi)}.")
    fix = (f"draw {listed} from a small normal instead of zeros (torch.nn.init.trunc_normal_(t, std=0.02), as ViT "
           f"does), or raise {norm.name}'s eps to 1e-6 (torch's default is 1e-5): either keeps the zero tokens "
           "from meeting a division by sqrt(eps)")
    cli = (f"no --init scheme draws {listed} (parameters of no standard layer): in the model's code or config, draw "
           f"them from a small normal (std 0.02, as ViT does) instead of zeros, or raise {norm.name}'s eps to 1e-6")
    return replace(p, layer=owner or row.name, message=f"{what} {why}", suggestion=fix, cli_suggestion=cli,
                   parameters=tuple(zeros), first=min(p.first, i), last=max(p.last, n))


# ---- one layer's weight far above its fans' scale -------------------------------------------------------

def _producer(rows: Sequence[Row], layers: Sequence[LayerStats], j: int) -> LayerStats | None:
    """The row whose output row ``j`` reads (the previous row with a gradient when none is recorded)."""
    src = rows[j].src
    for k in range(j - 1, -1, -1):
        if src and rows[k].dst == src and layers[k].relative_grad_rms is not None:
            return layers[k]
    return next((layers[k] for k in range(j - 1, -1, -1) if layers[k].relative_grad_rms is not None
                 and layers[k].kind not in PASS_THROUGH_NAMES), None)


# A weight multiplies the gradient passing back through it by at most its spectral norm, and that by at most
# its Frobenius norm ||W||; the RMS ratio the gain is read as differs from the norm ratio by the square root of
# the widths' ratio, and a convolution's input entry sums up to its kernel's taps: 10x that norm is beyond any
# layer of ordinary shape.  A gain above it is made between the rows by something no row recorded -- a product
# of two branches written in the forward (Mamba's x * B * silu(z)), whose factor came from another layer --
# and the weight is not named for it (its RMS 0.106 was blamed for a 1e5 jump).  Not where the layer computes
# something else than its torch class with the weight (a run-time multiplier, equalised learning rates): its
# weight does not bound what it does, and the layer is still the one to name
_WEIGHT_GAIN_SLACK = 10.0


def _norm(w: torch.Tensor) -> float:
    """||w||, the Frobenius norm (float64: see :func:`_rms`)."""
    return _rms(w) * math.sqrt(w.numel())


def _one_layer_gain(problems: list[Problem], layers: Sequence[LayerStats], rows: Sequence[Row], hi: float,
                    ties: Mapping[int, list[str]], modules: Mapping[str, nn.Module]) -> list[Problem]:
    exploding = [p for p in problems if p.kind == "exploding" and p.first >= 0 and not p.parameters]
    if not exploding:
        return problems
    start = min(p.first for p in exploding)
    best: tuple[float, int, LayerStats] | None = None
    for j in range(start, len(rows)):
        w = getattr(rows[j].module, "weight", None) if rows[j].module is not None else None
        g_out = layers[j].relative_grad_rms
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or not g_out:
            continue
        prod = _producer(rows, layers, j)
        if prod is None or not prod.relative_grad_rms:
            continue
        gain = prod.relative_grad_rms / g_out
        if gain > _one_layer_limit(hi) and (best is None or gain > best[0]) \
                and (not _as_torch(rows[j].module) or gain <= _WEIGHT_GAIN_SLACK * _norm(w)):
            best = (gain, j, prod)
    if best is None:
        return problems
    gain, j, prod = best
    # the problems this layer explains: past the bound by their own rows' figures (not a depth trend), before
    # it, and back within the bound without its gain
    eff, _ = _effective(list(layers))

    def excess(p: Problem) -> float:
        return max((v for v in eff[p.first:p.last + 1] if v is not None), default=0.0)

    covered = [p for p in exploding if p.first <= prod.index and hi < excess(p) <= hi * gain]
    if not covered:
        return problems
    merged = _gain_problem(covered, layers, rows, j, gain, ties, modules)
    rest = [p for p in problems if p not in covered]
    return [merged, *rest]


def _one_layer_loss(problems: list[Problem], layers: Sequence[LayerStats], rows: Sequence[Row], lo: float,
                    ties: Mapping[int, list[str]], modules: Mapping[str, nn.Module]) -> list[Problem]:
    """The mirror of :func:`_one_layer_gain`: a vanishing gradient made by
    one weight layer far below its fans' scale (a Linear multiplied by
    1e-7 in a Kaiming net) -- the gradient drops across it by more than
    sqrt(1 / low), as its weight accounts for (the gain about RMS x
    sqrt(fan-out), within 10x: a dead activation or a gate after it cuts the
    gradient without the weight being small), and the vanishing rows lie
    before it and would be back within the bound without its loss.  They
    were reported as a depth trend, with generic advice, and the layer was
    not named."""
    vanishing = [p for p in problems if p.kind == "vanishing" and p.first >= 0 and not p.parameters]
    if not vanishing:
        return problems
    start = min(p.first for p in vanishing)
    limit = math.sqrt(lo)
    best: tuple[float, int, LayerStats] | None = None
    for j in range(start + 1, len(rows)):
        m = rows[j].module
        w = getattr(m, "weight", None) if m is not None else None
        g_out = layers[j].relative_grad_rms
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or not g_out or not _as_torch(m):
            continue
        prod = _producer(rows, layers, j)
        if prod is None or prod.relative_grad_rms is None:
            continue
        loss = prod.relative_grad_rms / g_out
        if not 0 < loss < limit or (best is not None and loss >= best[0]):
            continue
        try:
            fan_out = fans(cast(nn.Module, m))[1]
        except (TypeError, ValueError):
            fan_out = tensor_fans(w)[1]
        expected = _rms(w) * math.sqrt(fan_out)  # (read only for a layer with that loss: a weight's read a few ops)
        if expected < limit and loss <= _WEIGHT_GAIN_SLACK * expected:
            best = (loss, j, prod)
    if best is None:
        return problems
    loss, j, prod = best
    eff, _ = _effective(list(layers))

    def lowest(p: Problem) -> float:
        return min((v for v in eff[p.first:p.last + 1] if v is not None), default=math.inf)

    covered = [p for p in vanishing if p.last <= prod.index and lo * loss <= lowest(p) < lo]
    if not covered:
        return problems
    merged = _loss_problem(covered, layers, rows, j, loss, ties)
    return [merged, *[p for p in problems if p not in covered]]


def _weight_facts(layers: Sequence[LayerStats], rows: Sequence[Row], j: int, ties: Mapping[int, list[str]]
                  ) -> tuple[LayerStats, torch.Tensor, int, int, float, list[str], str]:
    """Row ``j``'s record, its module's weight, fans, RMS, the names the
    weight goes by (tied ones too) and its own name: what a problem naming
    one weight says."""
    row, module = layers[j], rows[j].module
    assert module is not None
    w = module.weight
    assert isinstance(w, torch.Tensor)
    try:
        fan_in, fan_out = fans(module)
    except (TypeError, ValueError):
        fan_in, fan_out = tensor_fans(w)
    return row, w, fan_in, fan_out, _rms(w), ties.get(id(w), [f"{row.name}.weight"]), f"{row.name}.weight"


def _loss_problem(covered: list[Problem], layers: Sequence[LayerStats], rows: Sequence[Row], j: int, loss: float,
                  ties: Mapping[int, list[str]]) -> Problem:
    row, _, fan_in, fan_out, std, names, own = _weight_facts(layers, rows, j, ties)
    what = f"The gradient vanishes toward the input behind {_label(row)}."
    why = (f"{_label(row)}'s weight has RMS {std:.3g}: it multiplies the gradient passing back through it by "
           f"{loss:.3g} (about RMS x sqrt(fan-out) = {std * math.sqrt(fan_out):.3g}), where 1/sqrt(fan-in) = "
           f"{1 / math.sqrt(fan_in):.3g} would pass it on at its scale; the layers before it are cut off from "
           "the loss.")
    fix = (f"re-initialise {names[0]} as the layers around it are (torch.nn.init.kaiming_normal_ before a ReLU, "
           f"xavier_normal_ before tanh: std about 1/sqrt(fan-in) = {1 / math.sqrt(fan_in):.3g}), or look for "
           "what scaled it down (a weight multiplied or masked, a faulty checkpoint)")
    cli = f"re-initialise with --init critical (or --init kaiming_normal), which redraws {names[0]}"
    first = min(c.first for c in covered)
    return Problem(own.rpartition(".")[0] or row.name, "vanishing", f"{what} {why}", fix, first, j,
                   cli_suggestion=cli, parameters=tuple(names))


def _gain_problem(covered: list[Problem], layers: Sequence[LayerStats], rows: Sequence[Row], j: int, gain: float,
                  ties: Mapping[int, list[str]], modules: Mapping[str, nn.Module]) -> Problem:
    row, _, fan_in, fan_out, std, names, own = _weight_facts(layers, rows, j, ties)
    others = [n for n in names if n != own]
    embedding = any(isinstance(modules.get(n.rpartition(".")[0]), nn.Embedding) for n in others)
    tied = (f" -- the same tensor as {', '.join(others)} (tied), whose scale was set for "
            f"{'an embedding, where it is harmless before a norm' if embedding else 'that module'}"
            if others else "")
    out_rms = math.sqrt(row.forward_second_moment)
    what = f"The gradient explodes toward the input behind {_label(row)}."
    why = (f"{_label(row)}'s weight has RMS {std:.3g}{tied}: it multiplies the gradient passing back through it by "
           f"{gain:.3g} (about RMS x sqrt(fan-out) = {std * math.sqrt(fan_out):.3g}) and its output reaches RMS "
           f"{out_rms:.3g}, where 1/sqrt(fan-in) = {1 / math.sqrt(fan_in):.3g} would keep it at its input's scale.")
    target = min(0.02, 1 / math.sqrt(fan_in))
    shared = f" (it is also {', '.join(names[1:])}: one call sets both)" if others else ""
    fix = (f"re-initialise {names[0]} at std {target:.3g} or less -- torch.nn.init.normal_(model.{names[0]}, "
           f"std={target:.3g}) (GPT-2 uses 0.02; 1/sqrt(fan-in) = {1 / math.sqrt(fan_in):.3g}){shared}")
    cli = (f"re-initialise with --init critical (or --init xavier_normal), which redraws {names[0]}"
           + (f" once for all the modules that share it ({', '.join(names)})" if others else "") +
           "; or fix its std in the model's code")
    first = min(c.first for c in covered)
    return Problem(own.rpartition(".")[0] or row.name, "exploding", f"{what} {why}", fix, first, j,
                   cli_suggestion=cli, parameters=tuple(names))
