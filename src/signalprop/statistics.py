"""Per-row statistics, each declared once.

A :class:`Statistic` names what one module call's measurement holds: its
name (the :class:`~signalprop.records.LayerStats` attribute, the JSON key,
the TensorBoard tag), its unit and one-line meaning, the raw values that are
accumulated on the device during the pass and how each combines across the
ranks of a process group (``parts``), and how the gathered values become the
statistic (``finish``).  The accumulator (:mod:`signalprop.probe.stats`), the
distributed reduction (:mod:`signalprop.probe.distributed`), the rows
(:mod:`signalprop.probe.gather`, :mod:`signalprop.probe.rows`), TensorBoard
and the HTML report read this table.

The first statistics' raw sums are computed by hand-tuned kernels in
:mod:`signalprop.probe.stats` (dot products, batched buffers, the saturated
band).  A new statistic needs only its declaration here and a ``kernel``:
``kernel(t, dim)`` reduces a tensor over every entry (``dim=None``) or each
row of a batch of flattened outputs (``dim=1``) to 0-d / 1-d tensors on the
device (no host synchronisation) -- one tensor, the statistic's own raw
value, or a dict of its raw values by name; it runs on the module's output (phase
``"forward"``) or the gradient with respect to it (``"backward"``), on the
finite entries only after a pass met a NaN/Inf.  Its value then reaches
``LayerStats`` (``layer.forward_absmax``, in ``to_dict()``), the distributed
reduction, TensorBoard and the HTML table with nothing else written.

Importable by every part of signalprop (like :mod:`signalprop.activations`);
the kernels import nothing until called.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from . import formats as _F

# How a raw value combines across the ranks of a process group (see signalprop.probe.distributed).
SUM = "sum"          # additive: sums, counts
NORM = "norm"        # Euclidean norm over batch-split data: sqrt(sum of squares)
GRAD_NORM = "gnorm"  # norm of an activation gradient: sqrt(sum of squares) / world
GRAD_SQ = "gsq"      # its sum of squares itself: sum of squares / world^2
REPLICA_NORM = "rep"  # norm of a tensor every rank holds: sqrt(mean of squares)
SHARD_NORM = "shard"  # norm of one shard of a sharded tensor: sqrt(sum of squares)
MEAN = "mean"        # a per-rank value whose mean is wanted (the loss, shares)
ANY = "any"          # a vector of per-unit flags: how many are set on some rank
MAX = "max"          # the largest value on any rank
GRAD_MAX = "gmax"    # the largest activation-gradient entry on any rank, / world (as GRAD_NORM)
MIN = "min"          # the smallest value on any rank
GRAD_MIN = "gmin"    # the smallest activation-gradient entry on any rank, / world
SAME = "same"        # identical on every rank (a layer's number of units): not reduced
REDUCTIONS = (SUM, NORM, GRAD_NORM, GRAD_SQ, REPLICA_NORM, SHARD_NORM, MEAN, ANY, MAX, GRAD_MAX, MIN, GRAD_MIN, SAME)

# "update": measured by the monitor on a module's parameters over the optimizer step after a sample
# (no kernel: the monitor computes it from the weights' sampled entries and the optimizer's state), written on
# the sampled step's first row of that module once the step is taken
Phase = Literal["forward", "backward", "update"]
Kernel = Callable[[Any, "int | None"], Any]


@dataclass(frozen=True)
class Statistic:
    """One per-row statistic: see the module docstring.

    ``present``: the raw value whose presence in a row means the statistic
    was measured there (a rectifier's dead units, a bounded activation's
    saturation).  ``label`` and ``fmt`` (``"num"``, ``"pct"``, ``"int"``)
    are how tables show it; ``tensorboard``: written as
    ``signalprop/<name>/<layer>`` on sampled steps."""

    name: str
    phase: Phase
    unit: str
    meaning: str
    parts: tuple[tuple[str, str], ...]
    finish: Callable[[dict[str, Any]], Any]
    present: str
    label: str
    fmt: str = "num"
    kernel: Kernel | None = None
    tensorboard: bool = False
    # not measured on a bounded activation's output (tanh, sigmoid: |y| <= 1), whose range already answers it
    unbounded_only: bool = False
    # measured only when a pass asks for it by this name (check(..., dtype=...) asks for "precision"); "": always
    option: str = ""
    # a column of the HTML layer table (False for values that are not one number, such as the format shares)
    table: bool = True

    def measure_into(self, d: dict[str, Any], t: Any, dim: int | None) -> None:
        """The kernel's raw value(s) of ``t`` written into ``d``."""
        v = self.kernel(t, dim)  # type: ignore[misc]
        if isinstance(v, dict):
            d.update(v)
        else:
            d[self.name] = v

    def __post_init__(self) -> None:
        bad = [k for _, k in self.parts if k not in REDUCTIONS]
        if bad:
            raise ValueError(f"statistic {self.name!r}: unknown reduction(s) {bad}; use one of {REDUCTIONS}")


def _second_moment(d: dict[str, Any]) -> float:
    sq = d["forward_sq"] if "forward_sq" in d else d["forward_norm"] ** 2
    return float(sq / d["forward_n"])


def _mean(d: dict[str, Any]) -> float:
    return float(d["forward_sum"] / d["forward_n"])


def _extremes(prefix: str) -> Kernel:
    """The largest and smallest entry (max |x| = max(largest, -smallest),
    formed in ``finish``): one ``aminmax`` over a whole tensor (5.7 ms on 4M
    float32 entries on a CPU core, where ``vector_norm(ord=inf)`` took 39 ms:
    it is not vectorised), ``amax``/``amin`` along the rows of a batch."""

    def kernel(t: Any, dim: int | None) -> dict[str, Any]:
        import torch

        if t.numel() == 0:  # (an empty batch's: no entry, no extremes -- the statistic is absent)
            return {}
        if t.is_complex():  # no order: the largest modulus, and its negative (so max(hi, -lo) reads it)
            hi = t.abs().amax(dim=dim)
            return {f"{prefix}_max": hi, f"{prefix}_min": -hi}
        if dim is None and t.is_cuda:
            lo, hi = torch.aminmax(t)
        else:
            lo, hi = t.amin(dim=dim), t.amax(dim=dim)
        return {f"{prefix}_max": hi, f"{prefix}_min": lo}

    return kernel


def _abs_max(prefix: str) -> Callable[[dict[str, Any]], float]:
    return lambda d: float(max(d[f"{prefix}_max"], -d[f"{prefix}_min"]))


def _formats(prefix: str, phase: Phase, what: str, measured: bool = True) -> Statistic:
    """The low-precision shares of one quantity (see :mod:`signalprop.formats`):
    per format, the share of its nonzero entries a cast would overflow, leave
    below the smallest normal, or flush to zero; counts, summed across ranks."""
    return Statistic(f"{prefix}_formats", phase, "share",
                     f"per low-precision format, the share of the {what}'s nonzero entries that would overflow, "
                     "underflow (land below the smallest normal) or be flushed to zero",
                     tuple((k, SUM) for k in _F.keys(prefix)), _F.shares(prefix), f"{prefix}_lp0",
                     f"low-precision shares ({what})", "formats", kernel=_F.kernel(prefix) if measured else None,
                     option="precision", table=False)


STATISTICS: list[Statistic] = [
    Statistic("forward_mean", "forward", "value", "mean of the output's entries",
              (("forward_sum", SUM), ("forward_n", SUM)), _mean, "forward_n", "mean"),
    Statistic("forward_second_moment", "forward", "value^2", "mean square of the output's entries, E[y^2]",
              (("forward_sq", SUM), ("forward_norm", NORM), ("forward_n", SUM)), _second_moment, "forward_n",
              "E[y²]", tensorboard=True),
    Statistic("forward_var", "forward", "value^2", "variance of the output's entries",
              (), lambda d: max(_second_moment(d) - _mean(d) ** 2, 0.0), "forward_n", "Var[y]"),
    Statistic("nonfinite_fraction", "forward", "share", "share of the output's entries that are NaN or infinite",
              (("forward_nonfinite", MEAN),), lambda d: d.get("forward_nonfinite", 0.0), "forward_n",
              "non-finite", "pct"),
    Statistic("forward_absmax", "forward", "value",
              "largest |entry| of the output: the headroom left before a low-precision format overflows",
              (("forward_max", MAX), ("forward_min", MIN)), _abs_max("forward"), "forward_max", "max |y|",
              kernel=_extremes("forward"), tensorboard=True, unbounded_only=True),
    Statistic("input_absmax", "forward", "value",
              "largest |entry| of the input, where no module wrote it (a residual sum in a parent's forward): "
              "headroom of a tensor no row outputs (the monitor, and check with dtype=)",
              (("input_max", MAX), ("input_min", MIN)), _abs_max("input"), "input_max", "max |input|",
              tensorboard=True),
    Statistic("grad_rms", "backward", "gradient", "RMS of d loss / d output",
              (("grad_sq", GRAD_SQ), ("grad_norm", GRAD_NORM), ("grad_n", SUM)),
              lambda d: math.sqrt((d["grad_sq"] if "grad_sq" in d else d["grad_norm"] ** 2) / d["grad_n"]),
              "grad_n", "gradient RMS", tensorboard=True),
    Statistic("grad_nonfinite_fraction", "backward", "share", "share of d loss / d output that is NaN or infinite",
              (("grad_nonfinite", MEAN),), lambda d: d.get("grad_nonfinite", 0.0), "grad_n", "non-finite gradient",
              "pct"),
    Statistic("grad_absmax", "backward", "gradient",
              "largest |entry| of d loss / d output: the headroom left before a low-precision gradient overflows",
              (("grad_max", GRAD_MAX), ("grad_min", GRAD_MIN)), _abs_max("grad"), "grad_max", "max |gradient|",
              kernel=_extremes("grad"), tensorboard=True),
    # attention computations (signalprop.probe.attention): from the logits, not the row's output
    Statistic("attn_logit_max", "forward", "logit", "largest |q.k| / sqrt(d) over unmasked query-key pairs",
              (("attn_logit_max", MAX),), lambda d: d["attn_logit_max"], "attn_logit_max", "max attention logit",
              tensorboard=True),
    Statistic("attn_entropy", "forward", "share",
              "attention entropy over its largest value log(keys), mean over queries and heads (1 uniform, 0 one-hot)",
              (("attn_entropy", MEAN),), lambda d: d["attn_entropy"], "attn_entropy", "attention entropy", "pct",
              tensorboard=True),
    Statistic("attn_entropy_min_head", "forward", "share", "the lowest head's attention entropy (as attn_entropy)",
              (("attn_entropy_min_head", MIN),), lambda d: d["attn_entropy_min_head"], "attn_entropy_min_head",
              "lowest head's entropy", "pct"),
    # low-precision headroom, asked for (check(..., dtype=...)): outputs, their gradients, the module's
    # own weights (counted on its first call, by signalprop.probe.recorder)
    _formats("forward", "forward", "output"),
    _formats("grad", "backward", "gradient"),
    _formats("weight", "forward", "weights", measured=False),
    Statistic("weight_absmax", "forward", "value", "largest |entry| of the module's own parameters",
              (("weight_max", MAX),), lambda d: float(d["weight_max"]), "weight_max", "max |weight|",
              option="precision"),
    # recurrent modules (nn.RNN / LSTM / GRU): the gradient reaching their input sequence, per time step
    Statistic("time_grad_ratio", "backward", "share",
              "smallest over largest time step's gradient RMS at a recurrent module's input sequence",
              (("time_grad_ratio", MIN),), lambda d: d["time_grad_ratio"], "time_grad_ratio",
              "gradient over time (min/max)"),
    Statistic("time_horizon", "backward", "count",
              "time steps whose input gradient is within 1e-6 of the largest step's",
              (("time_horizon", MIN),), lambda d: int(d["time_horizon"]), "time_horizon", "steps reached", "int"),
    Statistic("time_steps", "backward", "count", "the recurrent module's sequence length",
              (("time_steps", SAME),), lambda d: int(d["time_steps"]), "time_steps", "time steps", "int"),
    Statistic("saturation", "forward", "share", "share of a bounded activation's outputs in its saturated band",
              (("saturated_count", SUM), ("saturated_n", SUM)), lambda d: d["saturated_count"] / d["saturated_n"],
              "saturated_n", "saturated", "pct", tensorboard=True),
    Statistic("dead_fraction", "forward", "share", "share of a rectifier's units that are 0 for every example",
              (("alive_count", SUM), ("alive", ANY), ("units", SAME)),
              lambda d: 1.0 - (d["alive"] if "alive" in d else d["alive_count"]) / d["units"],
              "units", "dead units", "pct", tensorboard=True),
    Statistic("dead_samples", "forward", "count", "examples x positions per unit behind dead_fraction",
              (("dead_samples", SUM),), lambda d: int(d["dead_samples"]), "dead_samples", "samples per unit",
              "int"),
    # the optimizer step after a sample (signalprop.monitor.optimizer), per module with trainable parameters
    Statistic("update_rms", "update", "value",
              "RMS of the change the optimizer step made to the module's parameters, ||w after - w before|| / sqrt(n)",
              (), lambda d: d["update_rms"], "update_rms", "update RMS", tensorboard=True),
    Statistic("update_lr_rms", "update", "value",
              "update_rms over the learning rate: Adam's normalised step m/sqrt(v) (about 1 or less), SGD's "
              "momentum-averaged gradient RMS",
              (), lambda d: d["update_lr_rms"], "update_lr_rms", "update RMS / lr", tensorboard=True),
    Statistic("adam_lag_rms", "update", "ratio",
              "Adam's gradient over the root of its second moment, sqrt(mean(g^2 / v)) over the module's entries "
              "(Wortsman et al. 2023b): 1 when v keeps up with g^2, above 1 when v lags behind (the update grows)",
              (), lambda d: d["adam_lag_rms"], "adam_lag_rms", "Adam g/sqrt(v) RMS", tensorboard=True),
    Statistic("adam_lag_max", "update", "ratio",
              "the largest |g| / sqrt(v) over the module's entries (as adam_lag_rms)",
              (), lambda d: d["adam_lag_max"], "adam_lag_max", "Adam g/sqrt(v) max"),
]

# Tables read on every row: mutated in place by register() / unregister(), so that modules holding them
# see a statistic added later
BY_NAME: dict[str, Statistic] = {}
# the largest |value| of outputs and their gradients, which a low-precision format's range is judged against;
# a pass that computes in float32 or float64 (range 3.4e38) may leave them out (the monitor does: see Recorder)
HEADROOM = frozenset({"forward_absmax", "grad_absmax"})
# how each raw value combines across ranks (those that do: SAME ones stay as they are)
RAW_REDUCTION: dict[str, str] = {}
FORWARD_KERNELS: list[Statistic] = []  # measured on every pass
BACKWARD_KERNELS: list[Statistic] = []
_OPTIONAL: list[Statistic] = []  # with a kernel, measured when a pass asks for their option


_BY_KEYS: dict[tuple[str, ...], list[Statistic]] = {}  # the statistics a row with these raw values has


def _rebuild() -> None:
    _BY_KEYS.clear()
    BY_NAME.clear()
    BY_NAME.update((s.name, s) for s in STATISTICS)
    RAW_REDUCTION.clear()
    RAW_REDUCTION.update((k, r) for s in STATISTICS for k, r in s.parts if r != SAME)
    FORWARD_KERNELS[:] = [s for s in STATISTICS if s.kernel is not None and s.phase == "forward" and not s.option]
    BACKWARD_KERNELS[:] = [s for s in STATISTICS if s.kernel is not None and s.phase == "backward" and not s.option]
    _OPTIONAL[:] = [s for s in STATISTICS if s.kernel is not None and s.option]


def kernels(phase: Phase, options: frozenset[str] = frozenset()) -> list[Statistic]:
    """The statistics with a kernel that a pass asking for ``options``
    measures in ``phase``: those measured always, then the asked-for ones."""
    base = FORWARD_KERNELS if phase == "forward" else BACKWARD_KERNELS
    if not options:
        return base
    return base + [s for s in _OPTIONAL if s.phase == phase and s.option in options]


def register(statistic: Statistic) -> Statistic:
    """Add a statistic: from the next pass on, ``check`` and the monitor
    measure it on every row with its ``kernel``, combine it across ranks, and
    it shows in ``LayerStats`` (``layer.stats``, an attribute, ``to_dict()``),
    TensorBoard (when ``tensorboard``) and the HTML table."""
    if not isinstance(statistic, Statistic):
        raise TypeError(f"register() takes a Statistic, got {type(statistic).__name__}")
    if statistic.name in BY_NAME:
        raise ValueError(f"a statistic named {statistic.name!r} is already declared")
    if statistic.kernel is None:
        raise ValueError(f"statistic {statistic.name!r} has no kernel: only the built-in statistics are measured "
                         "without one; give kernel(t, dim) -> tensor")
    clash = [k for k, _ in statistic.parts if k in RAW_REDUCTION]
    if clash:
        raise ValueError(f"statistic {statistic.name!r}: raw value(s) {clash} already belong to another statistic")
    STATISTICS.append(statistic)
    _rebuild()
    return statistic


def unregister(name: str) -> None:
    """Remove a statistic added with :func:`register`."""
    if name not in BY_NAME or BY_NAME[name] in _BUILT_IN:
        raise ValueError(f"{name!r} is not a registered statistic (built-in ones stay)")
    STATISTICS.remove(BY_NAME[name])
    _rebuild()


_BUILT_IN = tuple(STATISTICS)
_rebuild()


def finish_row(raw: dict[str, Any]) -> dict[str, Any]:
    """A row's gathered raw values -> its statistics, by name.  Which
    statistics a row has is looked up once per set of raw keys (a deep net's
    thousands of rows have a handful of them)."""
    key = tuple(raw)
    sts = _BY_KEYS.get(key)
    if sts is None:
        sts = _BY_KEYS[key] = [s for s in STATISTICS if s.present in raw]
    return {s.name: s.finish(raw) for s in sts}


__all__ = ["BY_NAME", "STATISTICS", "Statistic", "finish_row", "kernels", "register", "unregister"]
