"""From measurements to verdicts, reasons and concrete fixes."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

from ..records import LayerStats, Problem

SATURATED_SHARE = 0.5  # a layer is "saturated" when over half its units are
DEAD_SHARE = 0.5  # a ReLU layer is "dead" when over half its units never fire
_ORDER = ("non-finite", "exploding", "vanishing", "saturated", "dead", "healthy")


def _grads(l: LayerStats) -> list[float]:
    return [g for g in (l.grad_rms, l.param_grad_rms) if g is not None and math.isfinite(g) and g > 0]


def _flags(layers: list[LayerStats], lo: float, hi: float) -> list[set[str]]:
    """Every condition each row shows (its verdict is only the worst of them).

    A row whose gradient is exactly zero takes the gradient flags of the next
    row with a non-zero one: an underflow to 0 continues a vanishing trend,
    while a zero-initialized layer (Fixup, SkipInit) leaves the rows behind
    it at 0 with healthy rows downstream, which is no vanishing.
    """
    out: list[set[str]] = []
    for l in layers:
        gs = _grads(l)
        f = set()
        if any(g > hi for g in gs):
            f.add("exploding")
        if any(g < lo for g in gs):
            f.add("vanishing")
        if (l.saturation or 0) > SATURATED_SHARE:
            f.add("saturated")
        if (l.dead_fraction or 0) > DEAD_SHARE:
            f.add("dead")
        out.append(f)
    carry: set[str] = set()
    for i in range(len(layers) - 1, -1, -1):
        if _grads(layers[i]):
            carry = out[i] & {"vanishing", "exploding"}
        elif layers[i].grad_rms == 0:
            out[i] |= carry
    return out


def _row_verdict(l: LayerStats, flags: set[str]) -> str:
    if l.nonfinite_fraction > 0 or (l.grad_nonfinite_fraction or 0) > 0:
        return "non-finite"
    return next((k for k in _ORDER[1:-1] if k in flags), "healthy")


def _span(rows: list[LayerStats]) -> str:
    a, b = rows[0], rows[-1]
    return a.name if a is b else f"{a.name} .. {b.name}"


def _runs(layers: list[LayerStats], flags: list[set[str]], kind: str, gap: int = 2) -> list[list[LayerStats]]:
    """Rows showing ``kind``, grouped into runs; runs closer than ``gap`` rows
    merge (a Linear/activation pair can differ in which rows cross a bound)."""
    runs: list[list[LayerStats]] = []
    for l, f in zip(layers, flags):
        if kind in f:
            if runs and l.index - runs[-1][-1].index <= gap + 1:
                runs[-1].append(l)
            else:
                runs.append([l])
    return runs


def _dominant_activation(layers: list[LayerStats]) -> str | None:
    acts = [l.kind.replace("F.", "").lower() for l in layers
            if l.kind in ("Tanh", "Sigmoid", "ReLU", "GELU", "SiLU", "LeakyReLU", "ELU", "Softsign", "Hardtanh")
            or l.kind.startswith("F.")]
    return Counter(acts).most_common(1)[0][0] if acts else None


def _init_advice(act: str | None) -> str:
    if act in ("relu", "leakyrelu"):
        return ("use kaiming_normal_ (sigma_w2 = 2, where chi1 = 1 for ReLU): Xavier-style weights halve the "
                "gradient's mean square at every ReLU layer")
    if act == "sigmoid":
        return ("initialize with signalprop.init.critical_(model, inputs) (orthogonal weights on the critical "
                "line, with sigmoid's mean of 1/2 handled), or switch to tanh/ReLU")
    if act == "tanh":
        return ("initialize with signalprop.init.critical_(model, inputs), or apply_(model, 'xavier_uniform', "
                "activation='tanh') (gain 1.59)")
    return "initialize with signalprop.init.critical_(model, inputs) or add residual connections / normalization"


def _problem_for_run(kind: str, run: list[LayerStats], act: str | None, bounds: tuple[float, float]) -> Problem:
    span = _span(run)
    lo, hi = bounds
    kinds = ", ".join(sorted({l.kind for l in run}))
    if kind == "saturated":
        sat = max(l.saturation or 0 for l in run)
        msg = (f"{len(run)} {kinds} layer(s) {span} saturated: up to {sat:.0%} of units sit where the "
               f"activation's slope is < 1% of its maximum, so gradients through them nearly vanish")
        fix = ("pre-activations are too large: lower the weight scale (apply_(model, 'xavier_uniform', "
               f"activation=...)) or normalize; {_init_advice(act)}")
    elif kind == "dead":
        dead = max(l.dead_fraction or 0 for l in run)
        msg = f"{len(run)} {kinds} layer(s) {span} dead: up to {dead:.0%} of units output 0 for the whole batch"
        fix = ("zero or shrink negative biases, use kaiming_normal_, lower the learning rate, or use "
               "LeakyReLU/GELU")
    elif kind == "vanishing":
        g = min((l.grad_rms if l.grad_rms is not None else math.inf) for l in run)
        msg = (f"gradients vanish in {span} ({len(run)} row(s)): RMS down to {g:.2g}, below {lo:g}; "
               "a long product of Jacobians with singular values < 1")
        fix = _init_advice(act)
    else:  # exploding
        g = max((l.grad_rms or 0) for l in run)
        msg = (f"gradients explode in {span} ({len(run)} row(s)): RMS up to {g:.2g}, above {hi:g}; "
               "a long product of Jacobians with singular values > 1")
        fix = ("weights are too large: rescale them (apply_(model, 'xavier_uniform', activation=...) or "
               "signalprop.init.critical_), and clip gradients (torch.nn.utils.clip_grad_norm_)")
    return Problem(span, kind, msg, fix, run[0].index, run[-1].index)


def _nonfinite_problem(layers: list[LayerStats], inp: dict[str, Any]) -> Problem | None:
    if inp.get("nonfinite_fraction", 0) > 0:
        return Problem("input", "non-finite", f"the input itself has {inp['nonfinite_fraction']:.1%} "
                       "non-finite values", "clean the data (torch.nan_to_num, check the loader)", -1, -1)
    fwd = next((l for l in layers if l.nonfinite_fraction > 0), None)
    if fwd is not None:
        return Problem(fwd.name, "non-finite",
                       f"the forward signal first turns non-finite at {fwd.name} ({fwd.kind}): "
                       f"{fwd.nonfinite_fraction:.1%} of its outputs are NaN/Inf",
                       "look at that module's arithmetic (log/div/sqrt of bad values, overflow in low "
                       "precision); torch.autograd.detect_anomaly helps", fwd.index, fwd.index)
    bwd = [l for l in layers if (l.grad_nonfinite_fraction or 0) > 0]
    if bwd:
        origin = bwd[-1]  # backward runs in reverse: the latest row is where it started
        return Problem(origin.name, "non-finite",
                       f"the forward pass is finite but the gradient first turns non-finite at "
                       f"{origin.name} ({origin.kind})",
                       "a derivative there is infinite (sqrt/pow/log at 0, division by a tiny value): add an "
                       "epsilon, or clip gradients", origin.index, origin.index)
    return None


def _trend(layers: list[LayerStats]) -> dict[str, Any]:
    """Gradient RMS at the first parametrised row over that at the last
    parametrised row before the read-out (the final parametrised row, whose
    width change -- 128 -> 10, say -- would scale per-unit gradients with no
    vanishing involved), and the geometric-mean backward gain per row between.
    Both rows are outputs of weight layers, so like is compared with like."""
    pr = [l for l in layers if l.param_grad_rms is not None and l.grad_rms is not None and l.grad_rms > 0]
    if len(pr) < 2:
        return {}
    first, end = pr[0], (pr[-2] if len(pr) >= 3 else pr[-1])
    ratio = first.grad_rms / end.grad_rms  # type: ignore[operator]
    steps = max(1, pr.index(end))
    per = ratio ** (1.0 / steps) if ratio > 0 and math.isfinite(ratio) else float("nan")
    return {"first_last_grad_ratio": ratio, "first_layer": first.name, "last_layer": end.name,
            "param_layers": len(pr), "geometric_mean_backward_gain": per}


def diagnose(layers: list[LayerStats], inp: dict[str, Any], bounds: tuple[float, float],
             trend: float) -> tuple[str, list[Problem], dict[str, Any]]:
    lo, hi = bounds
    flags = _flags(layers, lo, hi)
    layers[:] = [replace(l, verdict=_row_verdict(l, f)) for l, f in zip(layers, flags)]
    act = _dominant_activation(layers)
    summary: dict[str, Any] = {"bounds": list(bounds), "trend_limit": trend, "activation": act,
                               "input": inp, **_trend(layers),
                               "zero_gradient_rows": sum(1 for l in layers if l.grad_rms == 0)}
    problems: list[Problem] = []
    nf = _nonfinite_problem(layers, inp)
    if nf is not None:
        problems.append(nf)
    for kind in ("exploding", "vanishing", "saturated", "dead"):
        problems += [_problem_for_run(kind, run, act, bounds) for run in _runs(layers, flags, kind)]
    ratio = summary.get("first_last_grad_ratio")
    if ratio is not None and nf is None and math.isfinite(ratio):
        per = summary["geometric_mean_backward_gain"]
        where = f"{summary['first_layer']} .. {summary['last_layer']}"
        if ratio < 1 / trend and not any(p.kind == "vanishing" for p in problems):
            problems.append(Problem(where, "vanishing",
                                    f"gradient RMS falls by {1 / ratio:.3g}x from the last to the first "
                                    f"parametrised layer ({per:.3g}x per layer): within bounds now, but "
                                    "vanishing with depth", _init_advice(act)))
        elif ratio > trend and not any(p.kind == "exploding" for p in problems):
            problems.append(Problem(where, "exploding",
                                    f"gradient RMS grows by {ratio:.3g}x from the last to the first "
                                    f"parametrised layer ({per:.3g}x per layer): exploding with depth",
                                    "rescale the weights (critical_ or Xavier with gain) and clip gradients"))
    problems.sort(key=lambda p: (_ORDER.index(p.kind), p.first))
    verdict = problems[0].kind if problems else "healthy"
    return verdict, problems, summary
