"""``signalprop.check``: one forward and one backward pass, diagnosed layer by layer."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import nn

from ..records import LayerStats, Report
from .diagnose import diagnose
from .predict import predictions
from .recorder import Recorder, Row, first_float_tensor
from .state import preserved


class ModelError(ValueError):
    """The model failed on the given inputs; the message names the module."""


COTANGENT_SEED = 0  # the random unit-variance cotangent is the same on every call


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _batch_size(inputs: Any) -> int | None:
    t = inputs if isinstance(inputs, torch.Tensor) else None
    if isinstance(inputs, dict):
        t = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(inputs, (tuple, list)):
        t = next((v for v in inputs if isinstance(v, torch.Tensor)), None)
    return None if t is None or t.dim() == 0 else int(t.shape[0])


def _prepare_inputs(inputs: Any) -> tuple[Any, list[torch.Tensor]]:
    """Floating input tensors become leaves that require grad, so the gradient
    reaches (and is measured at) the input; integer ones (token ids) stay."""
    leaves: list[torch.Tensor] = []

    def conv(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            leaf = v.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf
        return v

    if isinstance(inputs, dict):
        return {k: conv(v) for k, v in inputs.items()}, leaves
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(conv(v) for v in inputs), leaves
    return conv(inputs), leaves


def _shapes(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, dict):
        return ", ".join(f"{k}={_shapes(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(_shapes(v) for v in inputs)
    return type(inputs).__name__


def _cotangent(t: torch.Tensor) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(COTANGENT_SEED)
    return torch.randn(t.shape, generator=g, dtype=torch.float32).to(device=t.device, dtype=t.dtype)


def _finalise(rows: list[Row]) -> list[dict[str, Any]]:
    """All statistics as Python floats: 0-d tensors are stacked per device and
    dtype and moved in one transfer each (no per-layer sync); then the
    derived moments are formed in float64, where squares cannot overflow."""
    out: list[dict[str, Any]] = [{} for _ in rows]
    groups: dict[tuple[Any, Any], list[tuple[int, str, torch.Tensor]]] = {}
    for i, r in enumerate(rows):
        for d in (r.fwd, r.bwd):
            for k, v in d.items():
                if isinstance(v, torch.Tensor):
                    groups.setdefault((v.device, v.dtype), []).append((i, k, v))
                else:
                    out[i][k] = float(v)
    for items in groups.values():
        flat = torch.stack([v for _, _, v in items]).double().cpu().tolist()  # 0-d, made under no_grad
        for (i, k, _), v in zip(items, flat):
            out[i][k] = v
    for d in out:
        if "forward_norm" in d:
            m2 = d.pop("forward_norm") ** 2 / d.pop("forward_n")
            d["forward_second_moment"] = m2
            d["forward_var"] = max(m2 - d["forward_mean"] ** 2, 0.0)
        if "grad_norm" in d:
            d["grad_ms"] = d.pop("grad_norm") ** 2 / d.pop("grad_n")
    return out


def _param_grads(rows: list[Row], grads: dict[nn.Parameter, torch.Tensor | None]) -> dict[nn.Module, tuple[float, float]]:
    """RMS of each module's own parameter gradients and ||grad|| / ||weight||
    (norms stay on the device until one transfer at the end)."""
    mods, g2s, w2s, ns = [], [], [], []
    seen: set[int] = set()
    for r in rows:
        m = r.module
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        ps = [p for p in m.parameters(recurse=False) if grads.get(p) is not None]
        if not ps:
            continue
        with torch.no_grad():
            g2s.append(sum(torch.linalg.vector_norm(grads[p].detach().float()).square() for p in ps))  # type: ignore[union-attr]
            w2s.append(sum(torch.linalg.vector_norm(p.detach().float()).square() for p in ps))
        mods.append(m)
        ns.append(sum(p.numel() for p in ps))
    if not mods:
        return {}
    g2 = torch.stack([t.reshape(()) for t in g2s]).double().cpu().tolist()
    w2 = torch.stack([t.reshape(()) for t in w2s]).double().cpu().tolist()
    return {m: (math.sqrt(a / n), math.sqrt(a) / math.sqrt(b) if b > 0 else math.inf)
            for m, a, b, n in zip(mods, g2, w2, ns)}


def _layer_stats(rows: list[Row], vals: list[dict[str, Any]],
                 pgrads: dict[nn.Module, tuple[float, float]]) -> list[LayerStats]:
    layers = []
    prev_m2: float | None = None
    prev_g2: float | None = None
    for r, v in zip(rows, vals):
        m2 = v["forward_second_moment"]
        g2 = v.get("grad_ms")
        pg = pgrads.get(r.module) if r.module is not None else None
        layers.append(LayerStats(
            index=r.index, name=r.name, kind=r.kind, depth=r.depth, shape=r.shape,
            forward_mean=v["forward_mean"], forward_var=v["forward_var"], forward_second_moment=m2,
            nonfinite_fraction=v["nonfinite_fraction"],
            grad_rms=None if g2 is None else math.sqrt(g2),
            grad_nonfinite_fraction=v.get("grad_nonfinite_fraction"),
            param_grad_rms=pg[0] if pg else None, grad_to_weight=pg[1] if pg else None,
            saturation=v.get("saturation"), dead_fraction=v.get("dead_fraction"),
            forward_gain=m2 / prev_m2 if prev_m2 else None,
            # how much the gradient's mean square grows passing back through this row
            backward_gain=prev_g2 / g2 if (prev_g2 is not None and g2) else None,
        ))
        prev_m2 = m2 if m2 > 0 else None
        prev_g2 = g2
    return layers


def check(model: nn.Module, inputs: Any, *, loss_fn: Callable[..., torch.Tensor] | None = None,
          targets: Any = None, bounds: tuple[float, float] = (1e-6, 1e3), trend: float = 100.0,
          spectrum: bool = False) -> Report:
    """Diagnose ``model`` on ``inputs`` layer by layer.

    One forward and one backward pass.  Without ``loss_fn`` the backward pass
    starts from a fixed random cotangent of unit variance on the first
    floating-point tensor of the output (the seed's
    ``y.backward(gradient=...)``), so gradients describe the network rather
    than a loss; with ``loss_fn`` it is ``loss_fn(output, targets)`` (or
    ``loss_fn(output)`` when ``targets`` is None).

    ``inputs``: a tensor, a tuple of positional arguments or a dict of keyword
    arguments.  ``bounds``: the healthy range of gradient RMS values (the
    seed's example [1e-6, 1e3]).  ``trend``: the largest tolerated factor
    between the gradient RMS of the first and the last parametrised layer.
    ``spectrum``: also read the input-output Jacobian's singular values.

    The model comes back exactly as it was (parameters, buffers, ``.grad``,
    ``requires_grad``, train/eval mode, global RNG state), also on errors; the
    pass runs in the model's current mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check() takes an nn.Module, got {type(model).__name__}")
    lo, hi = bounds
    if not (0 < lo < hi):
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    if trend <= 1:
        raise ValueError(f"trend must be > 1, got {trend}")
    params = [p for p in model.parameters()]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters: nothing to diagnose")
    if _batch_size(inputs) == 0:
        raise ValueError(f"empty batch: inputs have shape {_shapes(inputs)}; pass at least one example")

    rec = Recorder(model)
    with preserved(model):
        rec.attach()
        try:
            report = _run(model, inputs, rec, loss_fn, targets, bounds, trend)
        finally:
            rec.detach()
        if spectrum:
            from .spectrum import jacobian_reading

            report = Report(report.verdict, report.layers, report.problems, report.summary,
                            jacobian_reading(model, inputs))
    return report


def _run(model: nn.Module, inputs: Any, rec: Recorder, loss_fn: Any, targets: Any,
         bounds: tuple[float, float], trend: float) -> Report:
    x, leaves = _prepare_inputs(inputs)
    mode = rec.functional_mode()
    try:
        with torch.enable_grad(), (mode if mode is not None else contextlib.nullcontext()):
            out = _call(model, x)
    except Exception as e:  # name the module where it failed, keep the original as cause
        where = rec.stack[-1] if rec.stack else "(model)"
        mod = dict(model.named_modules()).get(where)
        kind = type(mod).__name__ if mod is not None else "?"
        raise ModelError(
            f"forward failed in module '{where or '(root)'}' ({kind}) on inputs of shape "
            f"{_shapes(inputs)}: {type(e).__name__}: {e}"
        ) from e
    y = first_float_tensor(out)
    if y is None:
        raise ValueError(f"{type(model).__name__} returned {type(out).__name__} with no floating-point "
                         "tensor: nothing to backpropagate")
    if loss_fn is not None:
        loss = loss_fn(out, targets) if targets is not None else loss_fn(out)
        root, cot = loss, None
        backprop = f"loss {getattr(loss_fn, '__name__', type(loss_fn).__name__)} = {float(loss.detach()):.6g}"
    else:
        root, cot = y, _cotangent(y)
        backprop = "random unit-variance cotangent on the output"
    wrt = [p for p in model.parameters() if p.requires_grad] + leaves
    if not root.requires_grad or not wrt:
        raise ValueError("nothing in the model requires grad (all parameters frozen and no floating input): "
                         "no gradient to measure")
    grads = torch.autograd.grad(root, wrt, grad_outputs=cot, allow_unused=True)
    pgrads = dict(zip(wrt, grads))
    input_grad = [g for g in grads[len(wrt) - len(leaves):] if g is not None]
    rows = rec.rows
    vals = _finalise(rows)
    layers = _layer_stats(rows, vals, _param_grads(rows, pgrads))
    input_stats = _input_stats(leaves, input_grad)
    pred = predictions(rows, layers, input_stats)
    if pred is not None:
        layers = pred
    verdict, problems, summary = diagnose(layers, input_stats, bounds, trend)
    summary.update({"backprop": backprop, "rows": len(layers), "theory": pred is not None,
                    "model": type(model).__name__, "training_mode": model.training})
    return Report(verdict, tuple(layers), tuple(problems), summary)


def _input_stats(leaves: list[torch.Tensor], grads: list[torch.Tensor]) -> dict[str, Any]:
    if not leaves:
        return {}
    with torch.no_grad():
        x = leaves[0].detach().float()
        finite = torch.isfinite(x)
        d: dict[str, Any] = {"second_moment": float((torch.where(finite, x, 0.0) ** 2).mean()),
                             "nonfinite_fraction": float(1 - finite.float().mean()),
                             "width": int(x.shape[-1]) if x.dim() > 1 else 1}
        if grads:
            d["grad_rms"] = float(grads[0].float().pow(2).mean().sqrt())
    return d
