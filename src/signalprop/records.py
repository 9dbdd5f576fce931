"""Plain, frozen records shared by every part of signalprop (stdlib only).

``probe`` and ``monitor`` produce them, ``report`` draws them, ``lab`` saves
them.  Each has ``to_dict()`` so that JSON output is one ``json.dumps`` away.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar, get_args

T = TypeVar("T")

Verdict = Literal["healthy", "vanishing", "exploding", "saturated", "dead", "non-finite", "incomplete"]
"""Every verdict a row, a problem or a report can carry, worst first in
:data:`SEVERITY` order.  ``"incomplete"``: a monitored sample without the
data for a verdict (its rows got no gradient); from ``check``, a pass whose
gradient at the output is exactly 0 everywhere (no backward signal) and
whose forward shows no problem."""
VERDICTS: tuple[str, ...] = get_args(Verdict)
SEVERITY: tuple[str, ...] = ("non-finite", "exploding", "vanishing", "saturated", "dead", "incomplete", "healthy")


def _clean(v: Any) -> Any:
    """JSON-safe: non-finite floats become strings ("nan", "inf", "-inf")."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _to_json(d: dict[str, Any], path: Any, indent: int) -> str:
    """A record's ``to_dict()`` as JSON text, also written to ``path`` when given."""
    import json

    text = json.dumps(d, indent=indent)
    if path is not None:
        from pathlib import Path

        Path(path).write_text(text)
    return text


def _unclean(v: Any) -> Any:
    """:func:`_clean` undone: "nan", "inf", "-inf" back to floats, lists to tuples."""
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    if isinstance(v, list):
        return tuple(_unclean(x) for x in v)
    return v


def _from_dict(cls: type[T], d: dict[str, Any], **nested: Any) -> T:
    """A record from its ``to_dict()`` (unknown keys ignored; ``nested``: fields built by the caller)."""
    names = cls.__dataclass_fields__  # type: ignore[attr-defined]
    kw = {k: _unclean(v) for k, v in d.items() if k in names and k not in nested}
    return cls(**kw, **nested)


def evolve(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` for the frozen records here, without re-running
    ``__init__`` (thousands of rows per pass; the fields were checked once)."""
    new = object.__new__(type(obj))
    d = new.__dict__
    d.update(obj.__dict__)
    d.update(changes)
    if len(d) != len(obj.__dict__):  # a name that is not a field was added (checked after: the common case is free)
        unknown = changes.keys() - obj.__dataclass_fields__.keys()  # type: ignore[attr-defined]
        raise TypeError(f"{type(obj).__name__} has no field(s) {sorted(unknown)}")
    return new


@dataclass(frozen=True)
class ParamInit:
    """How one parameter (or one block of a stacked parameter) was initialized."""

    name: str
    shape: tuple[int, ...]
    fan_in: int | None
    fan_out: int | None
    std: float
    distribution: str
    note: str = ""


@dataclass(frozen=True)
class LayerInit:
    """Per-layer choices of theory-driven schemes (critical init, LSUV)."""

    name: str
    kind: str
    activation: str | None
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_star: float | None = None
    chi1: float | None = None
    scale: float | None = None
    note: str = ""


@dataclass(frozen=True)
class InitSummary:
    """What an initializer did to a model; ``print(summary)`` shows a table."""

    scheme: str
    params: tuple[ParamInit, ...] = ()
    skipped: tuple[str, ...] = ()
    layers: tuple[LayerInit, ...] = ()
    notes: tuple[str, ...] = ()
    forward_passes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def __str__(self) -> str:
        from .report.text import init_summary_text

        return init_summary_text(self)


@dataclass(frozen=True)
class LayerStats:
    """One module call's measurements from one forward and backward pass.

    Forward statistics are over all elements of the module's (first floating)
    output; ``grad_rms`` is the RMS of d loss / d output and
    ``relative_grad_rms`` the same divided by the RMS of the gradient at the
    model's output (what the verdict's bounds apply to: it does not change with
    batch size, sequence length, loss reduction or dtype).  ``param_grad_rms``
    is the RMS of the module's own parameter gradients as measured (sums over
    the batch scale it with the batch; it is reported, not judged).  Gains
    are ratios of second moments (forward) and of gradient mean squares
    (backward) to the previous row that has them, so they multiply along
    depth.  ``role`` names the row's position in a repeated block (the name
    with block numbers as ``#``, its class and parameter shapes): rows of one
    role are compared with each other across depth.  ``saturation`` and
    ``dead_fraction`` are None where they do not apply or where the batch is
    too small to tell (see the report's notes).
    """

    index: int
    name: str
    kind: str
    depth: int
    shape: tuple[int, ...]
    forward_mean: float
    forward_var: float
    forward_second_moment: float
    nonfinite_fraction: float
    grad_rms: float | None
    grad_nonfinite_fraction: float | None = None
    param_grad_rms: float | None = None
    grad_to_weight: float | None = None
    saturation: float | None = None
    dead_fraction: float | None = None
    forward_gain: float | None = None
    backward_gain: float | None = None
    predicted_second_moment: float | None = None
    predicted_grad_rms: float | None = None
    verdict: Verdict = "healthy"
    relative_grad_rms: float | None = None
    activation: str | None = None
    role: str = ""
    dead_samples: int | None = None  # examples x positions per unit behind dead_fraction
    # the declared statistics (signalprop.statistics) without a field above that were measured on this row,
    # by name (forward_absmax, attn_logit_max, ...): read as attributes too (None where not measured), and
    # in to_dict()
    stats: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        stats = self.__dict__.get("stats")
        if stats is not None and name in stats:
            return stats[name]
        from .statistics import BY_NAME

        if name in BY_NAME:
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        from .statistics import BY_NAME

        d = asdict(self)
        stats = d.pop("stats")
        d.update((k, stats.get(k)) for k in BY_NAME if k not in d)
        return _clean(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerStats:
        """The record :meth:`to_dict` wrote (declared statistics without a field go to ``stats``)."""
        names = cls.__dataclass_fields__
        # as measured: the declared statistics the row had (to_dict writes None for the others)
        stats = {k: _unclean(v) for k, v in d.items() if v is not None and k not in names}
        return _from_dict(cls, d, stats=stats)


@dataclass(frozen=True)
class Problem:
    """A finding: which layer(s), what kind, what and why (``message``: one
    sentence each, the second with the number judged and what it is
    relative to), and what to do (``suggestion``, in Python).
    ``cli_suggestion``: the same advice for a ``signalprop check`` user
    (``--init critical`` rather than ``critical_(model, inputs)``); empty
    where it is the same -- read both through :meth:`fix`.  ``parameters``:
    the parameters a cause names (``transformer.wte.weight``), when the
    problem was traced to them."""

    layer: str
    kind: Verdict
    message: str
    suggestion: str
    first: int = -1
    last: int = -1
    cli_suggestion: str = ""
    parameters: tuple[str, ...] = ()

    def fix(self, surface: Literal["python", "cli"] = "python") -> str:
        """The advice as a Python user (the default) or a command-line user
        (``surface="cli"``: ``signalprop check``'s flags) acts on it."""
        if surface not in ("python", "cli"):
            raise ValueError(f"surface must be 'python' or 'cli', got {surface!r}")
        return (self.cli_suggestion or self.suggestion) if surface == "cli" else self.suggestion

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return _from_dict(cls, {**d, "parameters": tuple(d.get("parameters", ()))})


@dataclass(frozen=True)
class InputStats:
    """The (first floating) input tensor: second moment per element over its
    finite entries, non-finite share, last-dimension width, gradient RMS."""

    second_moment: float
    mean: float
    nonfinite_fraction: float
    width: int
    grad_rms: float | None = None


@dataclass(frozen=True)
class SeriesTrend:
    """One role's rows across repeated blocks: how much the relative
    gradient RMS changes between its first and last row (``ratio`` = first /
    last, < 1 when it shrinks toward the input) and the largest change between
    any earlier and later row (``max_drop``: how many times smaller an earlier
    row's gradient is than a later one's; ``max_growth``: the reverse)."""

    role: str
    rows: tuple[int, ...]
    first: str
    last: str
    ratio: float
    max_drop: float
    max_growth: float
    forward_ratio: float


@dataclass(frozen=True)
class Summary:
    """Model-level numbers of a :class:`Report`.

    ``output_grad_rms``: RMS of the gradient at the model's output, the unit of
    every ``relative_grad_rms``.  ``first_last_grad_ratio``: relative gradient
    RMS at the first over the last row of the longest repeated series of
    weight layers (``first_layer`` .. ``last_layer``, ``param_layers`` rows),
    and ``geometric_mean_backward_gain`` its per-row factor.  ``series``: every
    repeated role's trend.  ``notes``: what was not judged and why.
    """

    model: str
    rows: int
    backprop: str
    output_grad_rms: float
    bounds: tuple[float, float]
    trend_limit: float
    training_mode: bool
    theory: bool
    activation: str | None = None
    input: InputStats | None = None
    first_last_grad_ratio: float | None = None
    geometric_mean_backward_gain: float | None = None
    first_layer: str | None = None
    last_layer: str | None = None
    param_layers: int = 0
    zero_gradient_rows: int = 0
    series: tuple[SeriesTrend, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    inputs: str = ""  # the inputs' shapes, as passed
    cotangent_seed: int | None = None  # the seed of the random cotangent (None: a loss was given)
    dtype: str | None = None  # the low-precision format check(..., dtype=) was asked about (its shares were counted)


@dataclass(frozen=True)
class JacobianReading:
    """Singular values of the input-output Jacobian of one example, and what they say.

    ``singular_values`` are exact (``method == "exact"``) or Ritz values with
    ``weights`` from stochastic Lanczos quadrature.
    """

    method: str
    n_in: int
    n_out: int
    min_singular_value: float
    max_singular_value: float
    mean_squared_singular_value: float
    rms_singular_value: float
    fraction_within_2x: float
    condition_number: float
    reading: str
    singular_values: tuple[float, ...] = ()
    weights: tuple[float, ...] | None = None


__all__ = ["FORMATS", "SEVERITY", "VERDICTS", "Alert", "Format", "InitSummary", "InputStats", "JacobianReading",
           "LayerInit", "LayerPrecision", "LayerStats", "LogitStats", "MonitorReport", "MonitorStep", "Overflow",
           "ParamInit", "PrecisionReport", "Problem", "Report", "SeriesTrend", "Summary", "Verdict"]


class Format(NamedTuple):
    """A floating-point format's range: its largest finite value, smallest
    normal and smallest subnormal value, and its explicit mantissa bits (the
    spacing of values near the largest is ``2 ** (floor(log2(max)) - mantissa_bits)``)."""

    max: float
    smallest_normal: float
    smallest_subnormal: float
    mantissa_bits: int


# Low-precision formats.  IEEE 754 half; bfloat16 (float32's exponent range, 7 mantissa bits); OCP 8-bit
# floating point (2023): E4M3 (no infinities, max 448), E5M2 (max 57344).  FORMATS[name][0] is the largest
# finite value.
FORMATS: dict[str, Format] = {
    "float16": Format(65504.0, 2.0 ** -14, 2.0 ** -24, 10),
    "bfloat16": Format(3.3895313892515355e38, 2.0 ** -126, 2.0 ** -133, 7),
    "float8_e4m3fn": Format(448.0, 2.0 ** -6, 2.0 ** -9, 3),
    "float8_e5m2": Format(57344.0, 2.0 ** -14, 2.0 ** -16, 2),
}


@dataclass(frozen=True)
class Overflow:
    """A row whose output, input or gradient would not fit a format at its current
    scale: its largest |value| (``absmax``) over the format's largest finite
    value (``limit``) -- ``factor`` > 1 overflows, and above 1/8 the headroom
    is under three binades."""

    layer: str
    kind: str
    quantity: str  # "output", "input" (a tensor no row wrote) or "gradient"
    absmax: float
    limit: float

    @property
    def factor(self) -> float:
        return self.absmax / self.limit


@dataclass(frozen=True)
class LayerPrecision:
    """One row's output, gradient or weights against a low-precision format
    at its current scale (no loss scaling, no per-tensor scale factor).
    ``headroom``: log2(the format's largest value / ``absmax``), the binades
    to spare (negative: it overflows).  ``overflow``, ``underflow`` (lands
    below the smallest normal, subnormal or zero) and ``flushed`` (to zero):
    shares of the nonzero entries a cast would send there; None where they
    were not counted (``check`` without ``dtype=``).  ``flushed_mass``: at
    most this share of the quantity's squared norm is carried by the entries
    that would flush (``flushed`` times (flush edge / RMS)^2: they are each
    below the edge), so 5% of a gradient's entries flushed that are rounding
    noise of exact zeros carry ~1e-10 of it; None for weights (no RMS
    recorded) or where not counted."""

    layer: str
    kind: str
    quantity: str  # "output", "input" (a tensor no row wrote), "gradient" or "weights"
    absmax: float | None
    headroom: float | None
    overflow: float | None = None
    underflow: float | None = None
    flushed: float | None = None
    flushed_mass: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass(frozen=True)
class PrecisionReport:
    """Which layers would not survive a low-precision format: from
    :meth:`Report.precision`.  ``verdict``: "fits", "overflows" (some
    output, gradient or weight would turn infinite) or "underflows" (some
    quantity would lose more than ``flush_limit`` of its nonzero entries to
    zero, and those entries carry more than ``flush_limit`` of its squared
    norm: a mass underflow, not rounding noise around exact zeros); ``overflowing``/``underflowing``/``at_risk`` name the modules
    (``at_risk``: within ``risk_binades`` of overflowing); ``summary`` says it
    in one line; ``layers`` has every measured row and quantity.  Without a
    loss (check's random unit-variance gradient on the output) gradients are
    listed but not judged: their scale is arbitrary, and the summary says so."""

    dtype: str
    max: float
    smallest_normal: float
    verdict: Literal["fits", "overflows", "underflows"]
    summary: str
    layers: tuple[LayerPrecision, ...]
    overflowing: tuple[str, ...] = ()
    underflowing: tuple[str, ...] = ()
    at_risk: tuple[str, ...] = ()
    counted: bool = True  # the shares were counted (check(..., dtype=)); else only the overflow of max |value|
    flush_limit: float = 0.01
    risk_binades: float = 3.0

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def __str__(self) -> str:
        return self.summary


@dataclass(frozen=True)
class Report:
    """The result of :func:`signalprop.check`.

    ``verdict`` is one of :data:`VERDICTS`; ``layers`` has one
    :class:`LayerStats` per module call in execution order; ``problems`` the
    findings, worst first; ``summary`` the model-level numbers
    (:class:`Summary`); ``spectrum`` the Jacobian reading when asked for.
    """

    verdict: Verdict
    layers: tuple[LayerStats, ...]
    problems: tuple[Problem, ...]
    summary: Summary
    spectrum: JacobianReading | None = None

    def to_dict(self) -> dict[str, Any]:
        return _clean({
            "verdict": self.verdict,
            "summary": asdict(self.summary),
            "problems": [p.to_dict() for p in self.problems],
            "layers": [layer.to_dict() for layer in self.layers],
            "spectrum": None if self.spectrum is None else asdict(self.spectrum),
        })

    def to_json(self, path: Any = None, indent: int = 2) -> str:
        return _to_json(self.to_dict(), path, indent)

    def overflows(self, dtype: str = "float16", headroom: float = 1.0) -> tuple[Overflow, ...]:
        """The rows whose output, input or gradient would overflow ``dtype`` (a
        name in :data:`FORMATS`) at their current scale -- with no loss
        scaling and no per-tensor scale factor -- read from each row's largest
        |value| (``forward_absmax``, ``input_absmax``: a tensor no row wrote,
        such as a residual sum in a parent's forward, ``grad_absmax``).
        Gradients only where the pass backpropagated a loss: from check's
        random unit-variance gradient on the output their scale is arbitrary.
        ``headroom``: also the rows within this factor of the limit (8: under
        three binades to spare)."""
        if dtype not in FORMATS:
            raise ValueError(f"dtype must be one of {sorted(FORMATS)}, got {dtype!r}")
        if not (isinstance(headroom, (int, float)) and headroom >= 1):
            raise ValueError(f"headroom must be a number >= 1 (a factor below the format's maximum), got {headroom!r}")
        from .probe.precision import loss_given

        limit = FORMATS[dtype][0]
        quantities = [("output", "forward_absmax"), ("input", "input_absmax")]
        if loss_given(self):
            quantities.append(("gradient", "grad_absmax"))
        out = []
        for layer in self.layers:
            for quantity, key in quantities:
                v = layer.stats.get(key)
                if v is not None and (not math.isfinite(v) or v * headroom > limit):
                    out.append(Overflow(layer.name, layer.kind, quantity, v, limit))
        return tuple(out)

    def precision(self, dtype: str | None = None, *, flush_limit: float = 0.01,
                  risk_binades: float = 3.0) -> PrecisionReport:
        """Which layers would not survive ``dtype`` (a name in :data:`FORMATS`;
        default the ``dtype`` check was given) at their current scale: per row
        the headroom of its output, gradient and weights (log2 of the format's
        largest value over their largest |entry|) and the shares of their
        nonzero entries that would overflow, underflow or flush to zero, a
        verdict and a one-line summary naming the modules (see
        :class:`PrecisionReport`).  The shares need ``check(..., dtype=...)``;
        without it only the overflow read off each row's max |value| is judged."""
        from .probe.precision import precision_report

        return precision_report(self, dtype, flush_limit, risk_binades)

    def save_html(self, path: Any) -> Any:
        """One self-contained interactive HTML file (plotly, opens offline): the
        problems, a figure per module with the verdict's rules drawn, the table."""
        from .report.html import save_html

        return save_html(self, path)

    def _repr_html_(self) -> str:
        """The HTML report as one element, for notebooks (Jupyter shows it for a bare ``report``)."""
        from .report.html import render_html

        return render_html(self, standalone=False)

    def __str__(self) -> str:
        from .report.terminal import render_text

        return render_text(self)


AlertKind = Literal["non-finite", "exploding", "vanishing", "saturated", "dead", "loss-spike", "grad-surge",
                    "update-too-large", "update-too-small", "attention-logit-growth", "output-logit-divergence",
                    "overflow-risk", "update-spike", "batch-spike", "update-growth"]


@dataclass(frozen=True)
class Alert:
    """Something went wrong during training: at which step, what, where
    (module name; "(loss)" or "(model)" when no single module), why in one
    line and what to do.  ``phase`` is "forward", "backward" or "" when it
    does not apply."""

    step: int
    kind: AlertKind
    layer: str
    message: str
    suggestion: str
    phase: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        return _from_dict(cls, d)

    def __str__(self) -> str:
        return f"step {self.step} [{self.kind}] {self.layer}: {self.message} -- {self.suggestion}"


@dataclass(frozen=True)
class LogitStats:
    """The model's output logits: their RMS, largest |logit| and mean
    log-partition log sum_j exp(z_j) over positions (what z-loss keeps near 0)."""

    rms: float
    max: float
    log_partition: float


@dataclass(frozen=True)
class MonitorStep:
    """One sampled training step: the same per-layer statistics as
    :func:`signalprop.check` (forward and backward of the forward pass that
    fed the step's first backward -- the last of several that fed it, as two
    views through one encoder do; a later forward where the gradients were
    zeroed in between, as in SAM's second pass; parameter-gradient RMS of the accumulated
    ``.grad``), its
    verdict and problems, the loss and the global gradient norm.
    ``update_ratios``: per module with parameters, ||w after - w before|| /
    ||w before|| of the optimizer step that followed (filled in at the next
    ``step``; empty until then or when not measured)."""

    step: int
    loss: float | None
    verdict: Verdict
    layers: tuple[LayerStats, ...]
    problems: tuple[Problem, ...]
    grad_norm: float | None
    output_grad_rms: float | None = None
    update_ratios: tuple[tuple[str, float], ...] = ()
    incomplete: str = ""  # why the sample has no verdict (verdict "incomplete"), else ""
    output_logits: LogitStats | None = None  # of the sampled forward's output, when it has a class dimension
    # the GradScaler's scale at this step (monitor(..., scaler=)): the gradient statistics are divided by it
    loss_scale: float | None = None
    # what the verdict leaves out and why (rows the loss does not reach, dead units not judged), as check's notes
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return _clean({"step": self.step, "loss": self.loss, "verdict": self.verdict, "grad_norm": self.grad_norm,
                       "output_grad_rms": self.output_grad_rms, "update_ratios": dict(self.update_ratios),
                       "incomplete": self.incomplete, "notes": list(self.notes),
                       "problems": [p.to_dict() for p in self.problems],
                       "loss_scale": self.loss_scale,
                       "output_logits": asdict(self.output_logits) if self.output_logits is not None else None,
                       "layers": [layer.to_dict() for layer in self.layers]})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MonitorStep:
        """The record :meth:`to_dict` wrote."""
        lg = d.get("output_logits")
        return _from_dict(cls, d, layers=tuple(LayerStats.from_dict(x) for x in d.get("layers", ())),
                          output_logits=_from_dict(LogitStats, lg) if lg else None,
                          problems=tuple(Problem.from_dict(x) for x in d.get("problems", ())),
                          notes=tuple(d.get("notes", ())),
                          update_ratios=tuple((k, _unclean(v)) for k, v in d.get("update_ratios", {}).items()))


@dataclass(frozen=True)
class MonitorReport:
    """What a :class:`signalprop.monitor.Monitor` saw: every step's loss and
    global gradient norm (``steps``, ``losses``, ``grad_norms``), the sampled
    steps in full (``history``) and the alerts, in order."""

    model: str
    every: int
    steps: tuple[int, ...]
    losses: tuple[float | None, ...]
    grad_norms: tuple[float | None, ...]
    history: tuple[MonitorStep, ...]
    alerts: tuple[Alert, ...]
    skipped: tuple[int, ...] = ()  # steps whose optimizer step the monitor skipped (monitor(..., skip=))
    bounds: tuple[float, float] = (1e-6, 1e3)  # the monitor's healthy band for relative gradient RMS (the HTML draws it)
    # ||dw|| / ||w|| of the optimizer step before each step (None where not measured), beside ``steps``
    relative_updates: tuple[float | None, ...] = ()
    # steps whose optimizer step the GradScaler skipped, its scaled gradients overflowing (monitor(..., scaler=))
    scaler_skipped: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return _clean({"model": self.model, "every": self.every, "steps": list(self.steps),
                       "losses": list(self.losses), "grad_norms": list(self.grad_norms),
                       "alerts": [a.to_dict() for a in self.alerts], "skipped": list(self.skipped),
                       "scaler_skipped": list(self.scaler_skipped),
                       "bounds": list(self.bounds), "relative_updates": list(self.relative_updates),
                       "history": [h.to_dict() for h in self.history]})

    def to_json(self, path: Any = None, indent: int = 2) -> str:
        return _to_json(self.to_dict(), path, indent)

    def save_html(self, path: Any) -> Any:
        """One self-contained interactive HTML file (plotly, opens offline): the
        loss with the alerts on it, the gradient norm, per-layer time series
        (relative gradient RMS, E[y²], update ratio, saturated and dead shares
        where measured) and the alerts table."""
        from .report.monitor_html import save_monitor_html

        return save_monitor_html(self, path)

    def _repr_html_(self) -> str:
        """The HTML report as one element, for notebooks (Jupyter shows it for a bare ``mon.report()``)."""
        from .report.monitor_html import render_monitor_html

        return render_monitor_html(self, standalone=False)

    def __str__(self) -> str:
        from .report.text import monitor_text

        return monitor_text(self)
