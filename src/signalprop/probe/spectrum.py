"""Singular values of the input-output Jacobian, and what they say about isometry.

The Jacobian is that of the first example's output with respect to the
first example's input, evaluated inside the real batch (so batch-dependent
layers such as BatchNorm in train mode are differentiated as they run); the
first dimension of the input and of the output is taken as the batch (a
sequence-first RNN's would be its time steps: pass such inputs batch first).
Small maps are differentiated exactly (one reverse pass per output
coordinate); large ones are read with Lanczos on J^T J, using only
Jacobian-vector products, never forming J.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..records import JacobianReading
from .inputs import rebuilt

EXACT_MAX_ENTRIES = 1 << 21  # n_in * n_out up to ~2M entries: exact
EXACT_MAX_OUT = 1024  # ...and at most this many reverse passes
LANCZOS_STEPS = 48


def _embedded(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    """Token ids as the model's own input embeddings, when its forward takes
    ``inputs_embeds`` (HuggingFace models): the Jacobian is then taken from the
    embedding output, the first continuous quantity."""
    emb = getattr(model, "get_input_embeddings", None)
    try:
        takes = "inputs_embeds" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    if emb is None or not takes:
        return None
    layer = emb()
    if layer is None:
        return None
    with torch.no_grad():
        return layer(ids).detach()


def _split_input(model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The floating input tensor the Jacobian is taken with respect to, and a
    function rebuilding the call's arguments (a tensor, a tuple/list of
    positional arguments or a dict of keyword arguments, as :func:`check`
    takes them) with it replaced."""
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point():
            return inputs, lambda x: x
        e = _embedded(model, inputs)
        if e is not None:
            return e, lambda x: {"inputs_embeds": x}
    elif isinstance(inputs, (tuple, list)):
        for i, v in enumerate(inputs):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v, lambda x, i=i: rebuilt(inputs, [x if j == i else a for j, a in enumerate(inputs)])
    elif isinstance(inputs, dict):
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v, lambda x, k=k: {**inputs, k: x}
        ids = inputs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            e = _embedded(model, ids)
            if e is not None:
                rest = {k: v for k, v in inputs.items() if k != "input_ids"}
                return e, lambda x: {**rest, "inputs_embeds": x}
    raise ValueError("spectrum=True needs a floating-point input tensor (the Jacobian is taken with respect "
                     "to it), or token ids for a model whose forward takes inputs_embeds; for other token "
                     "models, check the model from its embedding output instead")


def _example_map(model: torch.nn.Module, inputs: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    from .inputs import call_model
    from .recorder import model_output

    x, rebuild = _split_input(model, inputs)
    x = x.detach()
    if x.dim() == 0:
        raise ValueError("spectrum=True takes the input's first dimension as the batch, but the input is a 0-d "
                         "tensor")

    def f(x0: torch.Tensor) -> torch.Tensor:
        xb = torch.cat([x0.unsqueeze(0), x[1:]], 0)
        y = model_output(call_model(model, rebuild(xb)))  # the logits, as check reads them (not a loss)
        if y is None:
            raise ValueError("model output has no floating-point tensor")
        if y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise ValueError(f"spectrum=True reads the first example's output, the output's first dimension "
                             f"taken as the batch ({x.shape[0]}, as the input's), but the model's output has "
                             f"shape {tuple(y.shape)}: an unbatched input, or an output that is not batch first "
                             "(a loss, a pooled value, examples flattened into rows)")
        return y[0].reshape(-1)

    return f, x[0].clone()


def _exact(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> torch.Tensor:
    x0 = x0.detach().requires_grad_(True)
    with torch.enable_grad():
        y = f(x0)
        rows = [torch.autograd.grad(y, x0, e, retain_graph=True)[0].reshape(-1)
                for e in torch.eye(y.numel(), dtype=y.dtype, device=y.device)]
    J = torch.stack(rows).double()
    return torch.linalg.svdvals(J)


def _products(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor
              ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], torch.Tensor, str]:
    """``v -> J v``, ``w -> J^T w``, the output and how ``J v`` is formed.

    ``J^T w`` is a reverse pass through one retained graph.  ``J v`` is
    forward mode, which needs no double backward (CPU flash attention,
    Hardsigmoid and others have none): ``torch.func.linearize`` (traced once,
    each product replays the linearised graph), else ``torch.func.jvp`` (a
    dual forward per product), else -- for ops without forward-mode formulas
    -- differentiating ``J^T u`` with respect to ``u`` (double backward)."""
    x = x0.detach().requires_grad_(True)
    with torch.enable_grad():
        y = f(x)

    def jtv(w: torch.Tensor) -> torch.Tensor:
        (out,) = torch.autograd.grad(y, x, w.reshape(y.shape).to(y.dtype), retain_graph=True)
        return out

    def as_input(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(x0.shape).to(x0.dtype)

    def linearized() -> Callable[[torch.Tensor], torch.Tensor]:
        with warnings.catch_warnings():  # tracing notes about constant folding, not the user's concern
            warnings.simplefilter("ignore")
            _, fn = torch.func.linearize(f, x0.detach())
        return lambda v: fn(as_input(v))

    def dual() -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda v: torch.func.jvp(f, (x0.detach(),), (as_input(v),))[1]

    def double_vjp() -> Callable[[torch.Tensor], torch.Tensor]:
        with torch.enable_grad():
            u = torch.zeros_like(y, requires_grad=True)
            (vjp_u,) = torch.autograd.grad(y, x, u, create_graph=True)  # linear in u: J^T u
        return lambda v: torch.autograd.grad(vjp_u, u, as_input(v), retain_graph=True)[0]

    failures = []
    probe = torch.zeros_like(x0)
    for how, make in (("forward mode, torch.func.linearize", linearized), ("forward mode, torch.func.jvp", dual),
                      ("double backward", double_vjp)):
        try:
            jv = make()
            jv(probe)
            return jv, jtv, y, how
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
            failures.append(f"{how}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise ValueError("no way to form Jacobian-vector products through this model: " + "; ".join(failures))


def _lanczos(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, steps: int
             ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Ritz values of J^T J (or of J J^T when the output is the smaller side, so
    no structural zeros enter), their weights (stochastic Lanczos
    quadrature, one probe) and how J v was formed (:func:`_products`)."""
    jv, jtv, y, how = _products(f, x0)
    if y.numel() < x0.numel():
        def op(w: torch.Tensor) -> torch.Tensor:
            return jv(jtv(w)).detach().reshape(-1).double()
        n = y.numel()
    else:
        def op(w: torch.Tensor) -> torch.Tensor:
            return jtv(jv(w)).detach().reshape(-1).double()
        n = x0.numel()
    k = min(steps, n)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(n, generator=g, dtype=torch.float64).to(x0.device)
    q /= q.norm()
    Q = [q]
    alpha, beta = [], []
    for j in range(k):
        w = op(Q[-1])
        a = float(w @ Q[-1])
        alpha.append(a)
        # Full re-orthogonalisation, two passes ("twice is enough", Parlett):
        # one pass leaves components of relative size eps / beta, which
        # compound when J^T J has tight clusters of eigenvalues.
        for _ in range(2):
            for qq in Q:
                w = w - (w @ qq) * qq
        b = float(w.norm())
        if j == k - 1 or b < 1e-8 * max(1e-30, max(abs(x) for x in alpha)):
            break
        beta.append(b)
        Q.append(w / b)
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if beta:
        off = torch.tensor(beta[: len(alpha) - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    theta, vecs = torch.linalg.eigh(T)
    return theta.clamp_min(0), vecs[0] ** 2, how


def _reading(lo: float, hi: float, within: float, scale: float) -> str:
    cond = hi / lo if lo > 0 else math.inf
    if within > 0.9 and cond < 10:
        return "dynamical isometry: singular values concentrated around 1"
    if hi < 1e-3:
        return "the Jacobian is nearly zero: signals and gradients vanish end to end"
    if lo > 1e3:
        return "every direction is amplified > 1e3: signals and gradients explode end to end"
    if cond < 10:
        # a global scale (a first layer that brings the data to a small q*, say) is one
        # factor, not a product of ill-conditioned ones
        return f"well conditioned (condition number {cond:.3g}): isometric up to an overall scale of {scale:.3g}"
    return f"far from isometry: condition number {cond:.3g}, {within:.0%} of singular values within a factor 2 of 1"


def _reference_attention() -> contextlib.AbstractContextManager[Any]:
    """Scaled dot-product attention by its reference (math) kernel: the fused
    CPU/GPU kernels have neither forward-mode nor double-backward formulas; the
    function, and so the Jacobian, is the same."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def jacobian_reading(model: torch.nn.Module, inputs: Any) -> JacobianReading:
    with _reference_attention():
        return _jacobian_reading(model, inputs)


def _jacobian_reading(model: torch.nn.Module, inputs: Any) -> JacobianReading:
    f, x0 = _example_map(model, inputs)
    with torch.no_grad():
        n_out = f(x0).numel()
    n_in = x0.numel()
    weights: torch.Tensor | None = None
    if n_in * n_out <= EXACT_MAX_ENTRIES and n_out <= EXACT_MAX_OUT:
        s = _exact(f, x0)
        method = "exact"
        ms = float((s**2).mean())
        within = float(((s > 0.5) & (s < 2.0)).double().mean())
    else:
        theta, weights, how = _lanczos(f, x0, LANCZOS_STEPS)
        s = theta.sqrt()
        method = f"lanczos ({len(theta)} steps; J v by {how})"
        ms = float((weights * theta).sum())  # one-probe SLQ estimate of the mean squared singular value
        within = float((weights * ((s > 0.5) & (s < 2.0)).double()).sum())
    lo, hi = float(s.min()), float(s.max())
    return JacobianReading(
        method=method, n_in=n_in, n_out=n_out, min_singular_value=lo, max_singular_value=hi,
        mean_squared_singular_value=ms, rms_singular_value=math.sqrt(ms), fraction_within_2x=within,
        condition_number=hi / lo if lo > 0 else math.inf, reading=_reading(lo, hi, within, math.sqrt(ms)),
        singular_values=tuple(s.tolist()), weights=None if weights is None else tuple(weights.tolist()))
