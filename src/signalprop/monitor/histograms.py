"""Per-layer value distributions for TensorBoard's histogram dashboard.

On the monitor's sampled steps (and only there) a :class:`HistogramTap`
keeps a fixed-size sample of

* each leaf module's output (``activation``) and the gradient of the loss at
  it (``activation_grad``), from a forward hook installed for the sampled
  forward only and a pre-hook on the autograd node that made the output;
* each trainable parameter (``weight``) and its gradient (``grad``), read at
  ``mon.step`` (after the backward, before the optimizer step);
* the change of each parameter made by the sampled step's optimizer step
  (``update``): the same entries read again at the next ``mon.step``.

**Bounded cost.**  A tensor with more than :data:`SAMPLE` entries is
represented by a strided sample of :data:`SAMPLE` of them: every k-th entry
of its flattened values, k the smallest stride >= numel / SAMPLE that shares
no factor with the last dimension, so the sample runs through every column
(unit) rather than one residue class of them.  No random numbers are drawn:
the training's RNG is untouched.  The histograms of all tensors of a step are
computed together on their device (:func:`histograms`: per sample
length one batched min/max and one bincount) and come to the host as one small
tensor at the step after the sample, with that step's update samples (or at
``close``): the sampled step only takes the samples, so it does not also pay
for the histograms and their records (on a 100-layer MLP with a
``SummaryWriter``, ~0.1 of a step moved to the next one).  Other unsampled
steps add no hook and no host transfer.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from ..probe.distributed import local
from ..probe.inputs import in_own_pass
from ..probe.norms import grad_values
from ..probe.recorder import Hook, first_float_tensor, leaf_modules, register_weakly, transformed
from .core import MAX_FALLBACKS

SAMPLE = 1024  # entries kept per tensor for its histogram (30 buckets of ~34 entries on average)
BINS = 30  # TensorBoard's own default bucket count for a histogram


def stride_for(numel: int, last_dim: int, n: int = SAMPLE) -> int:
    """The sampling stride of a tensor with ``numel`` entries whose last
    dimension has ``last_dim``: the smallest k >= ceil(numel / n) coprime to
    ``last_dim`` (1 when the tensor is small enough to keep whole)."""
    k = max(1, -(-numel // n))
    if k == 1:
        return 1
    while math.gcd(k, max(last_dim, 1)) != 1:
        k += 1
    return k


def strided_sample(t: torch.Tensor, n: int = SAMPLE) -> torch.Tensor:
    """At most ``n`` entries of ``t``: every k-th of its flattened values (see
    :func:`stride_for`), copied (an in-place op on ``t`` later leaves it as
    it was).  A non-contiguous ``t`` is flattened by a copy first."""
    t = t.detach()
    flat = t.reshape(-1)
    k = stride_for(flat.numel(), t.shape[-1] if t.dim() else 1, n)
    return flat[::k][:n].clone()


@dataclass(frozen=True)
class Histogram:
    """One tensor's distribution as TensorBoard stores it: the finite values'
    min, max, count, sum and sum of squares, and ``BINS + 1`` buckets given
    by their right edges (the first, empty, closes the range on the left)."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: tuple[float, ...]
    bucket_counts: tuple[float, ...]


def histograms(samples: list[torch.Tensor], bins: int = BINS) -> list[Histogram | None]:
    """The histograms of ``samples`` (1-D tensors on one device), computed
    together as the rows of one matrix per sample length (most are
    :data:`SAMPLE` long: stacked, not padded): the non-finite entries are
    left out; None for a sample without a finite entry.  One transfer to the
    host."""
    if not samples:
        return []
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.numel(), []).append(i)
    parts = [_histogram_rows(torch.stack([samples[i].float() for i in idx]), bins) for idx in groups.values()]
    host = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu().double().numpy()
    # the right edges of each row's buckets, as columns after its statistics: one conversion to Python floats
    edges = host[:, 2:3] + host[:, 3:4] * np.arange(bins + 1)
    out: list[Histogram | None] = [None] * len(samples)
    order = [i for idx in groups.values() for i in idx]
    for i, row in zip(order, np.concatenate([host, edges], 1).tolist()):
        lo, hi, _, _, n, total, squares = row[:7]
        if n:
            out[i] = Histogram(lo, hi, int(n), total, squares, tuple(row[7 + bins:]), (0.0, *row[7:7 + bins]))
    return out


def _histogram_rows(v: torch.Tensor, bins: int) -> torch.Tensor:
    """Per row of ``v``: min, max, the first bucket's left edge, the bucket
    width, the number of finite entries, their sum and sum of squares, then
    the ``bins`` bucket counts (equal buckets over [min, max]; numpy's rule
    for a single value: [v - 0.5, v + 0.5]), non-finite entries left out."""
    ok = torch.isfinite(v)
    inf = torch.tensor(math.inf, device=v.device)
    lo = torch.where(ok, v, inf).amin(1)
    hi = torch.where(ok, v, -inf).amax(1)
    zeroed = torch.where(ok, v, 0.0)
    num = ok.sum(1, dtype=torch.float32)
    total = zeroed.sum(1)
    squares = zeroed.square().sum(1)
    flat = hi <= lo
    left = torch.where(flat, lo - 0.5, lo)
    width = torch.where(flat, torch.ones_like(lo), (hi - lo) / bins)
    m = v.shape[0]
    b = ((zeroed - left[:, None]) / width[:, None]).floor_().clamp_(0, bins - 1).to(torch.int32)
    b += torch.arange(0, m * bins, bins, device=v.device, dtype=torch.int32)[:, None]
    b.masked_fill_(~ok, m * bins)  # the non-finite entries: one bin past the last, dropped
    counts = torch.bincount(b.view(-1), minlength=m * bins + 1)[:-1].view(m, bins)
    return torch.cat([torch.stack([lo, hi, left, width, num, total, squares], 1), counts.float()], 1)


def _grad_sample(store: dict[str, torch.Tensor], name: str, g: torch.Tensor) -> None:
    if name not in store:
        store[name] = strided_sample(g)


def _grad_prehook(errors: list[BaseException], store: dict[str, torch.Tensor], name: str, nr: int,
                  grads: tuple[torch.Tensor | None, ...]) -> None:
    try:
        g = grads[nr]
        if g is not None:
            with torch.no_grad():
                _grad_sample(store, name, g)
    except Exception as e:  # a guest in the backward: never raises into it
        errors.append(e)


def _grad_hook(errors: list[BaseException], store: dict[str, torch.Tensor], name: str, g: torch.Tensor) -> None:
    _grad_prehook(errors, store, name, 0, (g,))


class HistogramTap:
    """Takes the samples of the module docstring for a :class:`~.core.Monitor`
    with a writer that draws histograms.  It hooks the root module (a
    pre- and a post-hook, which do nothing on unsampled steps) and, during a
    sampled forward only, every module of the process through torch's
    global forward hook (ignoring modules not in the model)."""

    def __init__(self, mon: Any) -> None:
        self.mon = mon
        model = mon.model
        self._leaves: dict[nn.Module, str] = {}  # the model's leaf modules, read anew at each sampled forward
        self.errors: list[BaseException] = []
        self.acts: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        # the samples of the step's earlier forwards that no gradient had reached when a later one was sampled
        # (their gradient hooks fill their own dicts): drawn if only theirs get gradients, as the monitor's
        # sample is (a target or metric pass with gradients on after the training forward)
        self._earlier: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self._hook: Any = None
        self._captured: int | None = None  # the step whose forward was sampled
        # the sampled step's weight samples (step, [(name, param, stride, sample)]) until its update is taken
        self._before: tuple[int, list[tuple[str, nn.Parameter, int, torch.Tensor, torch.Size]]] | None = None
        self._updates: list[tuple[int, list[tuple[str, torch.Tensor]]]] = []  # update samples waiting to be written
        self._pending: list[tuple[int, str, torch.Tensor]] = []  # the last sample's, written at the next step
        self._handles = [model.register_forward_pre_hook(Hook(self._root_pre)),
                         model.register_forward_hook(Hook(self._root_post))]

    # -- capture during the sampled forward --------------------------------------
    def _root_pre(self, module: nn.Module, args: Any) -> None:
        mon = self.mon
        if mon._replaying or in_own_pass() or not torch.is_grad_enabled() or not mon.regular or self._hook is not None \
                or getattr(module, "_compiled_call_impl", None) is not None:
            return
        if torch._C._functorch.peek_interpreter_stack() is not None:
            # the model called inside torch.func (a Jacobian penalty): a transform's per-example view, not the
            # training forward (as the monitor's own sample: core._in_transform)
            return
        if self._captured == mon._step and (self.grads or not self.acts):
            return  # the step's training forward is sampled already
        # first forward of the sampled step, or an earlier one fed no backward (yet): sample this one, the
        # earlier one's kept (new dicts: the gradient hooks a forward registered fill its own)
        if self._captured == mon._step and self.acts:
            self._earlier = [*self._earlier[1 - MAX_FALLBACKS:], (self.acts, self.grads)]  # as many as the monitor keeps
        else:
            self._earlier = []
        self.acts, self.grads = {}, {}
        self._captured = mon._step
        # read at each sample: a module replaced or added since (a new head, an adapter) is sampled, not the one
        # it replaced
        named = list(module.named_modules())
        leaves = set(leaf_modules(module, named))
        self._leaves = {m: n for n, m in named if m in leaves}
        self._hook = register_weakly(register_module_forward_hook, self._leaf_post)

    def _root_post(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._hook is not None and not in_own_pass():
            self._hook.remove()
            self._hook = None

    def _leaf_post(self, m: nn.Module, args: Any, out: Any) -> None:
        name = self._leaves.get(m)
        if name is None or name in self.acts or in_own_pass():  # not ours, a module's second call, or sp.check's
            return
        try:
            t = first_float_tensor(out)
            # (a call inside torch.vmap/grad in the forward: the transform's wrapper, which leaves the transform
            # only to fail when its histogram is computed -- all of the sample's histograms lost with it)
            if t is None or t.is_complex() or transformed(t):
                return
            with torch.no_grad():
                self.acts[name] = strided_sample(t)
            if t.requires_grad:
                if t.grad_fn is not None:
                    t.grad_fn.register_prehook(functools.partial(_grad_prehook, self.errors, self.grads, name,
                                                                 t.output_nr))
                else:
                    t.register_hook(functools.partial(_grad_hook, self.errors, self.grads, name))
        except Exception as e:
            self.errors.append(e)

    # -- at mon.step ---------------------------------------------------------------
    def step(self, writer: Any, step: int) -> None:
        """Called by ``mon.step`` (every step, after the backward, before the
        optimizer): on the step after a sample, the sampled step's update is
        taken (on the device) and the sample's histograms are written with it
        in one transfer; on a sampled step, its samples are taken (copies: a
        clipping or ``zero_grad`` after this call leaves them as they were)."""
        if self._hook is not None:  # a forward that raised: its post-hook never ran
            self._hook.remove()
            self._hook = None
        with torch.no_grad():
            if self._before is not None and step > self._before[0]:
                k, before = self._before
                self._before = None
                # (a parameter whose tensor was resized since -- model surgery -- has no update to draw)
                self._updates.append((k, [(n, strided_sample_at(p, stride) - b) for n, p, stride, b, shape in before
                                          if local(p).shape == shape]))
            if self._pending and self._pending[0][0] < step:
                pending, self._pending = self._pending, []
                self._write(writer, pending)
            acts, grads, earlier = self.acts, self.grads, self._earlier
            self.acts, self.grads, self._earlier = {}, {}, []
            if not self.mon.regular:
                return
            errors, self.errors = self.errors, []
            if errors:
                raise errors[0]
            if not grads:  # the last forward sampled got no gradient: the latest earlier one that did
                acts, grads = next(((a, g) for a, g in reversed(earlier) if g), (acts, grads))
            entries: list[tuple[int, str, torch.Tensor]] = []
            entries += [(step, f"signalprop/activation/{n or '(root)'}", s) for n, s in acts.items()]
            entries += [(step, f"signalprop/activation_grad/{n or '(root)'}", s) for n, s in grads.items()]
            before = []
            # the model's parameters now (a module replaced since the monitor started has its new ones); complex
            # ones left out, as complex activations are: a histogram of real values would cast away their
            # imaginary part, with a warning of torch's
            for n, p in self.mon.model.named_parameters():
                if not p.requires_grad or p.is_complex():
                    continue
                w = local(p)
                stride = stride_for(w.numel(), w.shape[-1] if w.dim() else 1)
                ws = strided_sample_at(w, stride)
                before.append((n, p, stride, ws, w.shape))
                entries.append((step, f"signalprop/weight/{n}", ws))
                if p.grad is not None and p.grad.layout != torch.strided:
                    # a sparse gradient (nn.Embedding(sparse=True)): the entries of the rows it holds
                    g = grad_values(p.grad)
                    entries.append((step, f"signalprop/grad/{n}",
                                    strided_sample_at(g, stride_for(g.numel(), g.shape[-1] if g.dim() else 1))))
                elif p.grad is not None:
                    entries.append((step, f"signalprop/grad/{n}", strided_sample_at(local(p.grad), stride)))
            self._before = (step, before)
            self._pending = entries

    def flush(self, writer: Any) -> None:
        """Write the histograms and updates still waiting (at the monitor's ``close``)."""
        pending, self._pending = self._pending, []
        self._write(writer, pending)

    def _write(self, writer: Any, entries: list[tuple[int, str, torch.Tensor]]) -> None:
        for k, ups in self._updates:
            entries += [(k, f"signalprop/update/{n}", s) for n, s in ups]
        self._updates = []
        by_device: dict[torch.device, list[tuple[int, str, torch.Tensor]]] = {}
        for e in entries:
            if e[2].numel():
                by_device.setdefault(e[2].device, []).append(e)
        from ..integrations.tensorboard import write_histograms

        for group in by_device.values():
            hs = histograms([s for _, _, s in group])
            write_histograms(writer, [(k, tag, h) for (k, tag, _), h in zip(group, hs) if h is not None])

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._before = None
        self.acts.clear()
        self.grads.clear()
        self._earlier = []


def strided_sample_at(t: torch.Tensor, stride: int, n: int = SAMPLE) -> torch.Tensor:
    """:func:`strided_sample` with a given stride (the same entries of a
    parameter before and after its update), copied (call under ``no_grad``)."""
    return t.reshape(-1)[::stride][:n].clone()
