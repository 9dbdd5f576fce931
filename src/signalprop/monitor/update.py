"""The update of one optimizer step, per module: ||w after - w before||
over ||w before||, the update's RMS (and over the learning rate) and, for
Adam-family optimizers, the second-moment lag (:mod:`.optimizer`).

The monitor measures it for the step after each regular sample, from the
sampled entries the relative update reads at every step
(:mod:`.relative_update`: at most 4,096 entries a tensor, exact for a tensor
that small): the modules, learning rates and Adam's lag are taken before
that step's optimizer step (:meth:`UpdateMeter.take`), each tensor's
difference and size are read from the relative update's two samples at the
next ``mon.step`` (:meth:`UpdateMeter.scalars`), the values coming back
with that step's one transfer (:meth:`UpdateMeter.finish`).  No copy of the
weights is made: the cost and the memory do not grow with the model (a
copy of every trained weight took ~2% of a 10-step window on a 100 x 512
MLP, and on a GPU it had to fit beside the training's peak memory).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..layers import param_fan_ins, parametrizations, tensor_fans
from ..probe.distributed import local, norm_kind
from ..probe.stats import Part
from ..records import evolve
from ..statistics import MAX, MIN
from . import alerts as A
from .optimizer import adam_lag, first_moment_filling, learning_rates
from .relative_update import CHUNKS, MIN_CHANGED, RelativeUpdate


class Snapshot:
    """What is known before step ``k``'s optimizer step, to measure its update
    for the sample at step ``sample``: per module with trainable parameters
    (name, parameters, fan-ins, learning rates), and Adam's second-moment lag
    of those parameters (0-d device tensors by index into the flattened
    parameter list, read with the update)."""

    __slots__ = ("sample", "k", "mods", "lag", "filling", "ungraded")

    def __init__(self, sample: int, k: int, mods: list[tuple[str, list[nn.Parameter], list[int], list[float | None]]],
                 lag: dict[int, tuple[torch.Tensor, torch.Tensor]], filling: frozenset[int] = frozenset()) -> None:
        self.sample, self.k, self.mods, self.lag = sample, k, mods, lag
        # the parameters whose Adam first moment is still filling (by id, see optimizer.first_moment_filling)
        self.filling = filling
        # the modules none of whose parameters has a gradient for this step (an expert no example was routed
        # to): their weights are not meant to move in it
        self.ungraded = {name for name, ps, _, _ in mods if all(p.grad is None for p in ps)}


@dataclass(frozen=True)
class Update:
    """One optimizer step's measured update: the sample it belongs to, the
    step it was taken at, each module's ||dw|| / ||w||, each module's
    update statistics, the modules with a weight matrix, and those whose
    weights are at an initialization's scale (their ratio may be judged too
    large; see :func:`.alerts.established`; none while Adam's first moment
    is still filling, see :func:`.optimizer.first_moment_filling`)."""

    sample: int
    k: int
    ratios: list[tuple[str, float]]
    per_module: dict[str, dict[str, float]]
    weight_layers: set[str]
    judged: set[str]


class UpdateMeter:
    """Takes what the update needs before the optimizer step, reads the
    differences and turns the gathered values into an :class:`Update` (the
    module docstring's three steps)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.snapshot: Snapshot | None = None
        # each module's trainable parameters' fan-ins, for the parameters (names and shapes) they were found for
        self._fan_ins: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], list[int]]] = \
            weakref.WeakKeyDictionary()

    def close(self) -> None:
        """Let the model, its modules and the snapshot go."""
        self.model = None  # type: ignore[assignment]
        self.snapshot = None
        self._fan_ins = weakref.WeakKeyDictionary()

    def trained_modules(self) -> list[tuple[str, list[nn.Parameter], list[int]]]:
        """The modules with trainable parameters of their own: name, those
        parameters and their fan-ins.  A module whose tensor
        ``torch.nn.utils.parametrize`` computes (``spectral_norm``,
        ``weight_norm``, ``orthogonal``) owns the parameters it is computed
        from (its ``parametrizations`` container is not listed on its own):
        the weight's update is the layer's, not a second module's beside a
        bias-only one.  The modules are walked at each snapshot (a module
        wrapped, moved or parametrised keeps its name right); the fan-ins are
        worked out once per module and parameter set."""
        mods = []
        hidden: list[str] = []  # the parametrizations containers met so far, as name prefixes
        for name, m in self.model.named_modules():
            if hidden and any(name == h or name.startswith(h + ".") for h in hidden):
                continue
            named = [(n, p) for n, p in m._parameters.items() if p is not None and p.requires_grad]
            pz = parametrizations(m)
            if pz is not None:
                hidden.append(f"{name}.parametrizations" if name else "parametrizations")
                seen = {id(p) for _, p in named}
                named += [(f"parametrizations.{n}", p) for n, p in pz.named_parameters()
                          if p.requires_grad and id(p) not in seen]
            if named:
                key = tuple((n, p.shape) for n, p in named)
                known = self._fan_ins.get(m)
                if known is None or known[0] != key:
                    fi = param_fan_ins(m)  # the originals a parametrisation reads: torch's tensor rule
                    known = self._fan_ins[m] = (key, [fi[n] if n in fi else tensor_fans(p)[0] for n, p in named])
                mods.append((name, [p for _, p in named], known[1]))
        return mods

    def take(self, sample: int, k: int, optimizer: Any = None) -> None:
        """Before step ``k``'s optimizer step: the modules whose update is
        measured for the sample at step ``sample``, and with ``optimizer``
        its learning rates and Adam's state."""
        lrs = learning_rates(optimizer) if optimizer is not None else {}
        mods: list[tuple[str, list[nn.Parameter], list[int], list[float | None]]] = \
            [(name, ps, fan_ins, []) for name, ps, fan_ins in self.trained_modules()]
        params = [p for _, ps, _, _ in mods for p in ps]
        if not params:  # nothing is trained (a frozen model being probed): no update to measure
            self.snapshot = None
            return
        for _, ps, _, rates in mods:
            rates.extend(lrs.get(p) for p in ps)
        lag = adam_lag(optimizer, params, local) if optimizer is not None else {}
        self.snapshot = Snapshot(sample, k, mods, lag,
                                 first_moment_filling(optimizer, k) if optimizer is not None else frozenset())

    def scalars(self, relative: RelativeUpdate | None) -> tuple[list[torch.Tensor | Part | float], list[str]]:
        """||w after - w before|| and ||w before|| of every parameter of the
        snapshot, from the relative update's last two samples (``relative``,
        read at this step), Adam's lag, and last whether each parameter's
        samples span the step on every rank (1, else 0) and how many of its
        runs moved on the rank where most did (see
        :data:`~.relative_update.MIN_CHANGED`: a module with a parameter
        outside either gets no update); and how each combines across ranks.  As many values on every rank."""
        snap = cast(Snapshot, self.snapshot)
        params = [p for _, ps, _, _ in snap.mods for p in ps]
        got = relative.per_tensor(params) if relative is not None else \
            [(0.0, 0.0, 0.0, float(CHUNKS))] * len(params)
        kinds = [norm_kind(p) for p in params]
        lag = sorted(snap.lag.items())
        return ([d for d, _, _, _ in got] + [w for _, w, _, _ in got] + [a for _, (a, _) in lag]
                + [b for _, (_, b) in lag] + [r for _, _, r, _ in got] + [c for _, _, _, c in got],
                kinds + kinds + [norm_kind(params[i]) for i, _ in lag] + [MAX] * len(lag) + [MIN] * len(params)
                + [MAX] * len(params))  # runs moved: on the rank whose shard moved most (FSDP)

    def finish(self, vals: list[float]) -> Update | None:
        """The update from :meth:`scalars`' values as gathered, of the modules
        whose parameters' samples all span the step (None where none does);
        the snapshot is let go."""
        snap = cast(Snapshot, self.snapshot)
        self.snapshot = None
        n = sum(len(ps) for _, ps, _, _ in snap.mods)
        read, changed = vals[len(vals) - 2 * n:len(vals) - n], vals[len(vals) - n:]
        d, w = vals[:n], vals[n:2 * n]
        lag_idx = sorted(snap.lag)
        lag_l2 = dict(zip(lag_idx, vals[2 * n:2 * n + len(lag_idx)]))
        lag_top = dict(zip(lag_idx, vals[2 * n + len(lag_idx):2 * n + 2 * len(lag_idx)]))
        ratios: list[tuple[str, float]] = []
        per_module: dict[str, dict[str, float]] = {}
        i = 0
        weight_layers = set()
        judged = set()
        for name, ps, fan_ins, lrs in snap.mods:
            if min(read[i:i + len(ps)]) < 1 or any(0 < c < MIN_CHANGED for c in changed[i:i + len(ps)]):
                # a parameter changed since the weights were read, or a sampled parameter of which only a few runs
                # moved (on every rank): no value
                i += len(ps)
                continue
            dd = math.sqrt(sum(x * x for x in d[i:i + len(ps)]))
            ww = math.sqrt(sum(x * x for x in w[i:i + len(ps)]))
            ratios.append((name, dd / ww if ww > 0 else (0.0 if dd == 0 else math.inf)))
            per_module[name] = update_stats(ps, d[i:i + len(ps)], lrs, i, lag_l2, lag_top)
            # a module the optimizer holds at rate 0 (a backbone probed linearly through the optimizer), or
            # without a gradient this step, is not meant to move: not among the weight layers whose median must
            if any(p.dim() >= 2 for p in ps) and not (lrs and all(lr == 0.0 for lr in lrs)) \
                    and name not in snap.ungraded:
                weight_layers.add(name)
            if not (snap.filling and any(id(p) in snap.filling for p in ps)) \
                    and A.established(ps, w[i:i + len(ps)], fan_ins):
                judged.add(name)
            i += len(ps)
        return Update(snap.sample, snap.k, ratios, per_module, weight_layers, judged) if ratios else None


def update_stats(ps: list[nn.Parameter], d: list[float], lrs: list[float | None], first: int,
                 lag_l2: dict[int, float], lag_top: dict[int, float]) -> dict[str, float]:
    """A module's update-phase statistics (:mod:`signalprop.statistics`) from
    its parameters' update norms ``d``, learning rates and Adam lag norms
    (by index into the flattened parameter list, from ``first``)."""
    numel = sum(p.numel() for p in ps)
    out = {"update_rms": math.sqrt(sum(x * x for x in d) / max(numel, 1))}
    if all(lr is not None and lr > 0 for lr in lrs):
        out["update_lr_rms"] = math.sqrt(sum((x / cast(float, lr)) ** 2 for x, lr in zip(d, lrs)) / max(numel, 1))
    idx = [first + j for j in range(len(ps)) if first + j in lag_l2]
    if idx:
        n_lag = sum(ps[i - first].numel() for i in idx)
        out["adam_lag_rms"] = math.sqrt(sum(lag_l2[i] ** 2 for i in idx) / max(n_lag, 1))
        out["adam_lag_max"] = max(lag_top[i] for i in idx)
    return out


def with_update(layers: tuple[Any, ...], per_module: dict[str, dict[str, float]]) -> tuple[Any, ...]:
    """The sample's rows with each module's update statistics on its first row."""
    seen: set[str] = set()
    out = []
    for layer in layers:
        vals = per_module.get(layer.name)
        if vals and layer.name not in seen:
            layer = evolve(layer, stats={**layer.stats, **vals})
        seen.add(layer.name)
        out.append(layer)
    return tuple(out)
