"""The end of a pass: every value still on a device read back in one transfer
per device (or combined across ranks in one all-reduce), and the raw sums
turned into the declared statistics (:mod:`.statistics`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..statistics import finish_row
from .distributed import ROW_KINDS, SUM, Reduction
from .recorder import Row
from .stats import Batched, Part, as_parts


class Pending:
    """Values still on a device (0-d tensors, :class:`~.stats.Part` entries,
    whole vectors of a measured batch), each with the place its Python float
    goes (a dict and a key, or a list and an index), grouped as they are
    added -- by vector, and 0-d tensors by device and dtype -- so that
    :meth:`resolve` reads them all with one concatenation and one transfer
    per device: the only host synchronisation of the pass."""

    __slots__ = ("singles", "vectors", "whole")

    def __init__(self) -> None:
        self.singles: dict[tuple[Any, Any], tuple[list[Any], list[Any], list[torch.Tensor]]] = {}
        self.vectors: dict[int, tuple[torch.Tensor, list[Any], list[Any], list[int]]] = {}
        self.whole: list[tuple[torch.Tensor, list[dict[str, Any]], str]] = []

    def add(self, into: Any, key: Any, v: Any) -> None:
        """``into[key] = float(v)`` once resolved (at once for a plain number)."""
        tp = type(v)
        if tp is Part and v.vec.dim() == 1:
            e = self.vectors.get(id(v.vec))
            if e is None:
                e = self.vectors[id(v.vec)] = (v.vec, [], [], [])
            e[1].append(into)
            e[2].append(key)
            e[3].append(v.i)
        elif tp is Part or isinstance(v, torch.Tensor):
            t = v.tensor() if tp is Part else v
            e2 = self.singles.get((t.device, t.dtype))
            if e2 is None:
                e2 = self.singles[(t.device, t.dtype)] = ([], [], [])
            e2[0].append(into)
            e2[1].append(key)
            e2[2].append(t)
        else:
            into[key] = float(v)

    def add_vector(self, vec: torch.Tensor, into: list[dict[str, Any]], key: str) -> None:
        """``into[j][key] = float(vec[j])`` for every j, once resolved (a
        measured batch's statistic: one entry per row)."""
        self.whole.append((vec, into, key))

    def resolve(self) -> None:
        Piece = tuple[torch.Tensor, Any, Any, Any]  # tensor, destinations, keys, positions / None / True
        by_device: dict[Any, list[Piece]] = {}
        for (dev, _), (intos, keys, ts) in self.singles.items():
            by_device.setdefault(dev, []).append((torch.stack(ts), intos, keys, None))
        for vec, intos, keys, pos in self.vectors.values():
            by_device.setdefault(vec.device, []).append((vec, intos, keys, pos))
        for vec, dicts, key in self.whole:
            by_device.setdefault(vec.device, []).append((vec, dicts, key, True))
        for pieces in by_device.values():
            # concatenated first (cat promotes the floating dtypes exactly: bf16/fp16 -> fp32 -> fp64), then one
            # conversion to float64, rather than one per piece (hundreds of batch vectors on a deep net)
            flat = torch.cat([t if t.is_floating_point() else t.double() for t, _, _, _ in pieces]) \
                .double().cpu().tolist()
            at = 0
            for t, intos, keys, where in pieces:
                n = t.numel()
                if where is True:  # a whole batch vector: entry j is the j-th dict's
                    for d, v in zip(intos, flat[at:at + n]):
                        d[keys] = v
                elif where is not None:  # entries of a batch vector, by their position in it
                    for into, key, j in zip(intos, keys, where):
                        into[key] = flat[at + j]
                else:
                    for into, key, v in zip(intos, keys, flat[at:at + len(intos)]):
                        into[key] = v
                at += n
        self.singles.clear()
        self.vectors.clear()
        self.whole.clear()


def gather(scalars: list[Any], kinds: list[str] | None = None, red: Reduction | None = None) -> list[float]:
    """0-d tensors, floats and :class:`~.stats.Part` entries of batch vectors
    as Python floats (see :class:`Pending`).  With ``red``, combined across
    the process group instead, each by its kind (one all-reduce)."""
    if red is not None:
        assert kinds is not None
        return red.gather(scalars, kinds)
    out: list[Any] = [0.0] * len(scalars)
    pending = Pending()
    for i, v in enumerate(scalars):
        if type(v) is float:
            out[i] = v
        else:
            pending.add(out, i, v)
    pending.resolve()
    return out


def finalise(rows: list[Row], extra: list[torch.Tensor | Part | float], red: Reduction | None = None,
              extra_kinds: list[str] | None = None,
              batched: list[Batched] | None = None) -> tuple[list[dict[str, Any]], list[float]]:
    """Every row's statistics as floats, and the ``extra`` scalars, gathered
    together, each row's as its declared statistics (:func:`~signalprop.statistics.finish_row`).
    ``batched``: the recorder's measured batches (:meth:`Recorder.batched`),
    whose values go into their rows' dicts.  With ``red``, every statistic is
    combined across the process group (one all-reduce; ``extra_kinds`` says
    how each extra scalar combines).  Without ``red`` the rows' own dicts are
    left holding the floats."""
    ex = [e if not isinstance(e, torch.Tensor) or e.dim() == 0 else e.reshape(()) for e in extra]
    if red is None:  # each value written straight into its row's dict once read
        pending = Pending()
        for dicts, vecs in batched or ():
            for key, vec in vecs.items():
                pending.add_vector(vec, dicts, key)
        for r in rows:
            for d in (r.fwd, r.bwd):
                for k, v in d.items():
                    if type(v) is not float:
                        pending.add(d, k, v)
        exv: list[Any] = [0.0] * len(ex)
        for i, e in enumerate(ex):
            pending.add(exv, i, e)
        pending.resolve()
        out = [{**r.fwd, **r.bwd} for r in rows]
    else:
        as_parts(batched or [])
        out = []
        where: list[tuple[dict[str, Any], str]] = []
        scalars: list[torch.Tensor | Part | float] = []
        kinds: list[str] = []
        for r in rows:
            o = {**r.fwd, **r.bwd}
            out.append(o)
            for k, v in o.items():
                if k in ROW_KINDS or isinstance(v, (torch.Tensor, Part)):
                    where.append((o, k))
                    scalars.append(v)
                    kinds.append(ROW_KINDS.get(k, SUM))
        vals = gather(scalars + ex, kinds + list(extra_kinds or []), red)
        for (o, k), v in zip(where, vals):
            o[k] = v
        exv = vals[len(scalars):]
    # raw sums -> the declared statistics, formed in float64 (Python floats), where squares cannot overflow
    out = [finish_row(d) for d in out]
    return out, exv


RMS_EXACT = 1e-20  # a float32 gradient RMS below it is read again in float64 (see underflowed)


def underflowed(vals: list[dict[str, Any]], floor: float) -> bool:
    """Whether a row's float32 gradient sum of squares may have lost its
    digits to subnormal squares -- its RMS read below ``RMS_EXACT``, or 0
    (a gradient of a loss scaled by 1e-19) -- although its largest entry is
    at least ``floor``: the exact pass, in float64, reads it (a float64
    model's pass is repeated needlessly then, never wrongly).
    ``floor``: the lower bound of the
    verdict times the output's gradient RMS -- a row whose largest entry is
    below it vanishes whatever its RMS (a deep sigmoid net's first layers),
    and is not worth a second pass; one above it may be healthy (a loss
    scaled by 1e-20, every gradient ~1e-24)."""
    for d in vals:
        top = d.get("grad_absmax", 0.0)
        # squares near float32's subnormals: each rounds to a multiple of 1.4e-45, so an RMS under RMS_EXACT
        # (squares under 1e-40) may be off by more than 1e-5 -- 9x low at a loss scaled by 10^-18.72 -- and
        # one that reads 0 is certainly off
        if 0.0 < top and top >= floor and d.get("grad_rms", 0.0) < RMS_EXACT:
            return True
    return False


def has_nonfinite(vals: list[dict[str, Any]], extra: list[float]) -> bool:
    """Whether any gathered value is NaN or infinite: read off their sum
    (one C loop per row), which is non-finite exactly then -- or when finite
    values sum past 1.8e308, where the exact pass's second look costs time,
    not correctness."""
    if not all(map(math.isfinite, extra)):
        return True
    total = 0.0
    for d in vals:  # every value is a number (see finalise), but the format shares' dicts (all finite)
        try:
            total += sum(d.values())
        except TypeError:
            total += sum(v for v in d.values() if not isinstance(v, dict))
    return not math.isfinite(total)

