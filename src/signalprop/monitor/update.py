"""The exact update of one optimizer step, per module: ||w after - w before||
over ||w before||, the update's RMS (and over the learning rate) and, for
Adam-family optimizers, the second-moment lag (:mod:`.optimizer`).

The monitor measures it for the step after each regular sample: the trained
weights are copied before that step's optimizer step (:meth:`UpdateMeter.take`,
the copies' norms taken with them) and compared with the weights after it at
the next ``mon.step`` (:meth:`UpdateMeter.scalars`, each difference formed
in the copy and measured in one pass), the values coming back with that
step's one transfer (:meth:`UpdateMeter.finish`).  One copy of the trained
weights is held for one step (on the CPU, up to :data:`KEEP_CPU_BYTES`, until
the next sample's copy is made in it); on a GPU only where it fits beside
the training's peak memory (:func:`copy_fits`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..layers import param_fan_ins
from ..probe.distributed import local, norm_kind
from ..probe.norms import copies_and_norms, difference_norms_, same_layout
from ..probe.stats import Part
from ..records import evolve
from ..statistics import MAX
from . import alerts as A
from .optimizer import adam_lag, learning_rates

# On the CPU the copies (once read, differences) are kept for the next sample's copy, up to this many
# bytes: a 100 MB copy made anew at each sample faulted in 0-16k pages (glibc gives large freed blocks
# back to the OS), up to 16 ms on top of the copy's 10, measured on a 100 x 512 MLP; copied into the
# kept tensors, none.  A GPU's caching allocator keeps its memory already: the copy is let go there.
KEEP_CPU_BYTES = 512 << 20
# The copy is held through the next step's forward and backward, where the training's memory peaks: on a GPU it
# is taken only while the peak allocated so far plus the copy stays within this share of the device's memory
# (an out-of-memory error in the user's next forward would be the monitor's doing)
GPU_ROOM = 0.9


def copy_fits(params: list[nn.Parameter]) -> bool:
    """Whether a copy of ``params`` fits beside the training's peak memory
    on each GPU they are on (see :data:`GPU_ROOM`); always on the CPU."""
    need: dict[torch.device, int] = {}
    for p in params:
        if p.is_cuda:
            need[p.device] = need.get(p.device, 0) + local(p).numel() * p.element_size()
    return all(torch.cuda.max_memory_allocated(d) + n <= GPU_ROOM * torch.cuda.get_device_properties(d).total_memory
               for d, n in need.items())


class Snapshot:
    """The weights saved before step ``k``'s optimizer step, to measure its
    update for the sample at step ``sample``: per module with trainable
    parameters (name, parameters, their saved copies, fan-ins, learning
    rates), Adam's second-moment lag of those parameters (0-d device tensors
    by index into the flattened parameter list, read with the update) and
    the copies' norms (||w before||, in that flattened order, taken with them)."""

    __slots__ = ("sample", "k", "mods", "lag", "w_norms")

    def __init__(self, sample: int, k: int,
                 mods: list[tuple[str, list[nn.Parameter], list[torch.Tensor], list[int], list[float | None]]],
                 lag: dict[int, tuple[torch.Tensor, torch.Tensor]], w_norms: list[torch.Tensor | Part]) -> None:
        self.sample, self.k, self.mods, self.lag, self.w_norms = sample, k, mods, lag, w_norms


@dataclass(frozen=True)
class Update:
    """One optimizer step's measured update: the sample it belongs to, the
    step it was taken at, each module's ||dw|| / ||w||, each module's
    update statistics, the modules with a weight matrix, and those whose
    weights are at an initialization's scale (their ratio may be judged too
    large; see :func:`.alerts.established`)."""

    sample: int
    k: int
    ratios: list[tuple[str, float]]
    per_module: dict[str, dict[str, float]]
    weight_layers: set[str]
    judged: set[str]


class UpdateMeter:
    """Takes the copy, reads the differences and turns the gathered values
    into an :class:`Update` (the module docstring's three steps)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.snapshot: Snapshot | None = None
        self.no_room = False  # the last take() found no room for the copy beside the training's peak (GPU)
        self._spare: list[torch.Tensor] | None = None  # the last copies, to copy into (KEEP_CPU_BYTES)
        # each module's trainable parameters' fan-ins, for the parameters (names and shapes) they were found for
        self._fan_ins: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], list[int]]] = \
            weakref.WeakKeyDictionary()

    def close(self) -> None:
        """Let the model, its modules and any saved copy go."""
        self.model = None  # type: ignore[assignment]
        self.snapshot = self._spare = None
        self._fan_ins = weakref.WeakKeyDictionary()

    def trained_modules(self) -> list[tuple[str, nn.Module, list[str], list[int]]]:
        """The modules with trainable parameters of their own: name, module,
        the names of those parameters and their fan-ins.  The modules are
        walked at each snapshot (a module wrapped or moved keeps its name
        right); the fan-ins are worked out once per module and parameter set."""
        mods = []
        for name, m in self.model.named_modules():
            named = [(n, p) for n, p in m._parameters.items() if p is not None and p.requires_grad]
            if named:
                key = tuple((n, p.shape) for n, p in named)
                known = self._fan_ins.get(m)
                if known is None or known[0] != key:
                    fi = param_fan_ins(m)
                    known = self._fan_ins[m] = (key, [fi[n] for n, _ in named])
                mods.append((name, m, [n for n, _ in named], known[1]))
        return mods

    def take(self, sample: int, k: int, optimizer: Any = None) -> None:
        """Save the trainable weights before step ``k``'s optimizer step, to
        measure its update for the sample at step ``sample``; their norms
        (||w before||) are taken with the copies, in one pass (see
        :func:`~signalprop.probe.norms.copies_and_norms`).  ``optimizer``:
        read for the learning rates and Adam's state, when given."""
        lrs = learning_rates(optimizer) if optimizer is not None else {}
        found = [(name, [cast(nn.Parameter, m._parameters[n]) for n in names], fan_ins)
                 for name, m, names, fan_ins in self.trained_modules()]
        params = [p for _, ps, _ in found for p in ps]
        if not params:  # nothing is trained (a frozen model being probed): no update to measure
            self.snapshot = None
            return
        self.no_room = not copy_fits(params)
        if self.no_room:
            self.snapshot = None
            return
        spare, self._spare = self._spare, None
        copies, w_norms = copies_and_norms(params, spare if spare is not None and same_layout(spare, params)
                                           else None)
        mods, i = [], 0
        for name, ps, fan_ins in found:
            mods.append((name, ps, copies[i:i + len(ps)], fan_ins, [lrs.get(p) for p in ps]))
            i += len(ps)
        lag = adam_lag(optimizer, params, local) if optimizer is not None else {}
        self.snapshot = Snapshot(sample, k, mods, lag, w_norms)

    def scalars(self) -> tuple[list[torch.Tensor | Part], list[str]]:
        """||w after - w before|| and ||w before|| of every saved tensor, and how each combines across ranks."""
        snap = cast(Snapshot, self.snapshot)
        before = [b for _, _, bs, _, _ in snap.mods for b in bs]
        params = [p for _, ps, _, _, _ in snap.mods for p in ps]
        diffs = difference_norms_(before, params)  # the copies, ours and used once, become -update
        kinds = [norm_kind(p) for p in params]
        lag = sorted(snap.lag.items())
        return (diffs + snap.w_norms + [a for _, (a, _) in lag] + [b for _, (_, b) in lag],
                kinds + kinds + [norm_kind(params[i]) for i, _ in lag] + [MAX] * len(lag))

    def finish(self, vals: list[float]) -> Update:
        """The update from :meth:`scalars`' values as gathered; the snapshot is let go."""
        snap = cast(Snapshot, self.snapshot)
        self.snapshot = None
        done = [c for _, _, cs, _, _ in snap.mods for c in cs]  # the differences, read: the next copy's memory
        if all(c.is_cpu for c in done) and sum(c.numel() * c.element_size() for c in done) <= KEEP_CPU_BYTES:
            self._spare = done
        n = sum(len(ps) for _, ps, _, _, _ in snap.mods)
        d, w = vals[:n], vals[n:2 * n]
        lag_idx = sorted(snap.lag)
        lag_l2 = dict(zip(lag_idx, vals[2 * n:2 * n + len(lag_idx)]))
        lag_top = dict(zip(lag_idx, vals[2 * n + len(lag_idx):2 * n + 2 * len(lag_idx)]))
        ratios: list[tuple[str, float]] = []
        per_module: dict[str, dict[str, float]] = {}
        i = 0
        weight_layers = set()
        judged = set()
        for name, ps, _, fan_ins, lrs in snap.mods:
            dd = math.sqrt(sum(x * x for x in d[i:i + len(ps)]))
            ww = math.sqrt(sum(x * x for x in w[i:i + len(ps)]))
            ratios.append((name, dd / ww if ww > 0 else (0.0 if dd == 0 else math.inf)))
            per_module[name] = update_stats(ps, d[i:i + len(ps)], lrs, i, lag_l2, lag_top)
            if any(p.dim() >= 2 for p in ps):
                weight_layers.add(name)
            if A.established(ps, w[i:i + len(ps)], fan_ins):
                judged.add(name)
            i += len(ps)
        return Update(snap.sample, snap.k, ratios, per_module, weight_layers, judged)


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
