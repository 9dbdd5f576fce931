"""The early-warning benchmark's float16-overflow scenario: runs that train in
float32 but overflow float16 (autocast, no loss scaling), and whether the
monitor names the module before the first inf.

How float16 is run on the CPU: ``torch.autocast("cpu", dtype=torch.float16)``
around the forward -- CPU autocast casts the inputs of matmuls/linear layers
to float16, so their outputs (and the gradients flowing back into them) are
float16 tensors, which turn into inf past 65504 exactly as on a GPU; weights
and the optimizer stay float32 (the usual mixed-precision set-up), and the
loss is taken in float32 from the float16 output, as training code does.
No GradScaler: the scenario is the overflow that loss scaling would not
prevent anyway (forward activations), or that a missing one lets through.

Mechanisms (each a way real runs meet float16's range, none using the
divergence of a too-high learning rate, which is the other families' job):

* ``regress``: an MLP regressing targets in raw units (a teacher's outputs
  times ``scale``, e.g. prices or counts left unnormalised), trained with
  Adam on the mean squared error divided by ``scale^2`` (so the gradients
  stay small): the read-out's outputs grow steadily toward targets past 65504;
* ``resregress``: the same with a residual MLP (no normalisation) whose
  residual stream carries the growth through every block;
* ``rawinput``: inputs in raw units (features of scale ``scale``, as
  unnormalised sensor data), an MLP classifier trained with Adam: the first
  layer's outputs grow as its weights do.

Truth per run: the step of the first non-finite loss under float16, and the
same run in float32 (the control) staying finite for as many steps -- only
then is the inf float16's doing.  Scored: the monitor's first
``overflow-risk`` alert before that step, whether it names the module where
the inf first appeared (the monitor's own non-finite alert locates it), and
its lead.  ``rules``: the absolute bound alone (within 16x of 65504, the
rule before issue 27's trend rule) and both rules.  The monitor says
``overflow-risk`` once per module, so where the trend rule spoke first the
absolute rule's later alert on that module is not raised: the "absolute"
row counts only the runs where it spoke first (a lower bound).  The monitor
samples every step for a while once a sample (or the model's output, read
every step in float16) shows a module closing in
(``precision_alerts.closing_in``): the runs are scored as the monitor runs.  Where the inf first
appears in an operation no module row records (the residual sum
``h + block(h)`` written in the root's ``forward``: the monitor locates it as
"(root)"), no alert can name that operation's module; the share of runs with
*an* overflow-risk alert before the first inf is reported beside the strict one.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from signalprop.lab.run_models import ResMLP

# (kind, learning rates, scales); regression targets at 3e4 stay inside float16 (within 2x of 65504): the
# runs that should stay finite, on which alerts are counted too
GRID = [("regress", (1e-3, 3e-3, 1e-2), (3e4, 1e5, 3e5)), ("resregress", (1e-3, 3e-3), (1e5, 3e5)),
        ("rawinput", (1e-2, 3e-2), (1e3, 3e3))]
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Fp16Spec:
    kind: str
    lr: float
    scale: float
    seed: int = 0
    steps: int = 400
    every: int = 25


def build(spec: Fp16Spec) -> tuple[nn.Module, Any, Any]:
    """The model, a batch function (generator -> inputs, targets) and the loss."""
    torch.manual_seed(spec.seed)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    if spec.kind == "rawinput":
        model: nn.Module = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                          nn.Linear(128, 10))
        w = torch.randn(32, 10)

        def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(128, 32, generator=g)
            return x * spec.scale, (x @ w).argmax(1)

        return model, batch, F.cross_entropy
    model = ResMLP(width=64, n_in=32, n_out=1) if spec.kind == "resregress" else nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))

    def rbatch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(128, 32, generator=g)
        with torch.no_grad():
            return x, teacher(x) * spec.scale

    return model, rbatch, lambda y, t: F.mse_loss(y, t) / spec.scale ** 2


def run(spec: Fp16Spec, half: bool = True, monitored: bool = True) -> dict[str, Any]:
    import signalprop as sp

    model, batch, loss_fn = build(spec)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    g = torch.Generator().manual_seed(1000 + spec.seed)
    mon = sp.monitor(model, every=spec.every) if monitored else None
    first_bad = None
    steps = 0
    try:
        for step in range(spec.steps):
            x, t = batch(g)
            with torch.autocast("cpu", dtype=torch.float16, enabled=half):
                y = model(x)
            loss = loss_fn(y.float(), t)
            opt.zero_grad()
            loss.backward()
            if mon is not None:
                mon.step(loss)
            opt.step()
            steps = step + 1
            if not math.isfinite(loss.item()):
                first_bad = step
                break
    finally:
        if mon is not None:
            mon.close()
    return {"first_nonfinite": first_bad, "steps": steps,
            "alerts": [{k: a.to_dict()[k] for k in ("step", "kind", "layer", "message")} for a in mon.alerts]
            if mon is not None else []}


def _reads_from(alert: dict[str, Any], origin: str | None) -> bool:
    """An alert on a module's input that its parent's own code made (a residual
    sum), where the inf was located in that parent's own code: the same tensor."""
    from signalprop.monitor.alerts import OWN_CODE_INPUT

    if origin is None or OWN_CODE_INPUT not in alert["message"]:
        return False
    return origin == "(root)" or alert["layer"].startswith(origin + ".")


def score(spec: Fp16Spec, r: dict[str, Any]) -> dict[str, Any]:
    """The first overflow-risk alert before the first inf (of each rule), and whether it names the inf's module."""
    bad = r["first_nonfinite"]
    origin = next((a["layer"] for a in r["alerts"] if a["kind"] == "non-finite"), None)
    before = [a for a in r["alerts"] if a["kind"] == "overflow-risk" and (bad is None or a["step"] < bad)]
    absolute = [a for a in before if "doublings from overflowing" in a["message"]]
    out: dict[str, Any] = {"origin": origin}
    for rule, alerts in (("absolute", absolute), ("absolute+trend", before)):
        first = alerts[0] if alerts else None
        named = next((a for a in alerts if a["layer"] == origin or _reads_from(a, origin)), None)
        out[rule] = {"first": [first["step"], first["layer"]] if first else None,
                     "named_origin_at": named["step"] if named else None,
                     "lead": bad - named["step"] if named and bad is not None else None}
    return out


def cases(quick: bool = False) -> list[Fp16Spec]:
    seeds = SEEDS[:1] if quick else SEEDS
    return [Fp16Spec(kind, lr, scale, seed) for kind, lrs, scales in GRID for lr in lrs for scale in scales
            for seed in seeds]


def scenario(quick: bool = False) -> dict[str, Any]:
    """Every case under float16 with the monitor and in float32 without it (the control); the share of
    float16-overflow runs whose module was named before the first inf, per rule."""
    rows = []
    for spec in cases(quick):
        r = run(spec)
        control = run(spec, half=False, monitored=False) if r["first_nonfinite"] is not None else None
        overflow = r["first_nonfinite"] is not None and control is not None and control["first_nonfinite"] is None
        rows.append({"spec": asdict(spec), "first_nonfinite": r["first_nonfinite"], "fp32_finite": overflow,
                     "fp16_overflow": overflow, **score(spec, r), "alerts": r["alerts"][:6]})
        print({k: rows[-1][k] for k in ("first_nonfinite", "fp16_overflow", "origin", "absolute+trend")},
              spec.kind, spec.lr, spec.scale, spec.seed, flush=True)
    over = [r for r in rows if r["fp16_overflow"]]
    finite = [r for r in rows if r["first_nonfinite"] is None]
    summary: dict[str, Any] = {"runs": len(rows), "fp16_overflow_runs": len(over),
                               "stayed_finite": len(finite), "fp32_also_diverged": len(rows) - len(over) - len(finite)}
    for rule in ("absolute", "absolute+trend"):
        named = [r for r in over if r[rule]["named_origin_at"] is not None]
        leads = [r[rule]["lead"] for r in named]
        summary[rule] = {"named_before_first_inf": len(named),
                         "share_named_before_first_inf": len(named) / len(over) if over else None,
                         "any_alert_before_first_inf": sum(1 for r in over if r[rule]["first"] is not None),
                         "median_lead": statistics.median(leads) if leads else None,
                         "min_lead": min(leads) if leads else None,
                         "alerted_runs_that_stayed_finite": sum(1 for r in finite if r[rule]["first"] is not None)}
    return {"goal": "fp16 overflow named with its module before the first inf in >= 90% of runs",
            "summary": summary, "runs": rows}
