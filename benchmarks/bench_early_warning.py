"""Early warning, measured: fault injection with other projects' rules side by side.

Real runs (signalprop.lab.training_runs, grids in ``ew_grid.py``): divergence
of a ReLU MLP, a residual MLP without normalisation and a character
transformer under SGD (momentum 0.9) at constant rates and linear warm-ups
past the stable rate -- a **tuned** grid (seeds 0-3: the rules' thresholds
were studied on it) and a **held-out** grid run only after the rules were
fixed (seeds 10-12, other rates and warm-up lengths, a 10-layer MLP, 12
residual blocks, a CNN, a nanoGPT-style LM).  Three fault families, all
held out: float16 autocast without loss scaling, one corrupted batch in a
healthy run (random labels; random tokens for text), and attention-logit
growth (AdamW at high rates, qk-layernorm as the control).

Each run records the truth (diverged = the loss turned non-finite; the
first such step) and, with the monitor reading the gradient norm every step
(``grad_every=1``), the per-step loss and gradient norm that every rule
reads.  Rules, each judged on the steps before the first non-finite loss:

* ``signalprop``: the monitor's first alert -- its sampled-step alerts as the
  monitor raised them, and its per-step rules (``scalar_alerts``) replayed
  over the recorded series exactly as the monitor calls them (so the runs can
  come from a cache); ``grad_every=4`` is the same with the gradient norm
  read every 4th step, the monitor's CPU default; ``previous rules`` is
  signalprop before issue 27;
* the peers (``ew_peers.py``): OLMo-core's 6 sigma over a 128-step rolling
  window of loss and gradient norm, Megatron-LM's loss >= 10x the largest
  of its first 100, ZClip's gradient-norm z-score (EMA, z > 2.5 and > 3);
* ``candidate: weight growth``: the weights' norm grown >= 2% over 5 steps,
  and faster than over the 5 before -- not in the monitor (it reads no
  weight norm per step); measured here to size what wiring it would buy.

Per family and rule: runs, diverged, warned >= 10 steps ahead (recall),
median lead over the diverged runs it alerted before the loss turned
non-finite, healthy (low-rate, not diverged) runs with any alert, and
precision (alerted runs that diverged).  ``limits`` says which signal leaves
the healthy range how many steps ahead, per family (``ew_limits.py``).
Goals (issue 27): >= 90% of diverging runs warned >= 10 steps ahead; median
lead above each peer's; <= 2% of healthy runs alerted.  ``fp16_overflow``
(``ew_fp16.py``): runs that train in float32 but overflow float16, and the
share whose module the monitor named before the first inf (goal >= 90%).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from _util import write
from ew_faults import fault_scores
from ew_fp16 import scenario as fp16_scenario
from ew_grid import Case, divergence, faults
from ew_limits import limits
from ew_record import record
from ew_score import first_alerts, markdown, summarise
from signalprop.monitor.alerts import overflow_alerts
from signalprop.records import LayerStats, MonitorStep

LEAD = 10
GOALS = {"recall_10_ahead": 0.9, "healthy_alerted": 0.02, "median_lead": "above each peer's"}


def _overflow(run: dict[str, Any]) -> tuple[int, str] | None:
    """The overflow-risk rule (float16's 65504) over the recorded samples: not yet wired into the
    monitor (it needs the dtype each module computes in), evaluated here on the float16 runs."""
    for s in run["samples"]:
        layers = tuple(LayerStats(i, name, kind, i, (), 0.0, 0.0, 0.0, 0.0, None,
                                  stats={"forward_absmax": f, "grad_absmax": g})
                       for i, (name, kind, _, f, g) in enumerate(s["layers"]))
        found = overflow_alerts(MonitorStep(s["step"], None, "healthy", layers, (), None))
        if found:
            return s["step"], f"overflow-risk at {found[0].layer}"
    return None


def _row(case: Case, run: dict[str, Any]) -> dict[str, Any]:
    losses = [v for v in run["losses"] if v is not None]
    alerts = first_alerts(run)
    kinds: dict[str, int] = {}
    for a in run["alerts"]:
        kinds.setdefault(a["kind"], a["step"])
    row = {"family": case.family, "intent": case.intent, "split": case.split, "spec": run["spec"],
           "first_nonfinite": run["first_nonfinite"], "steps": run["steps"],
           "final_loss": losses[-1] if losses else None, "min_loss": min(losses) if losses else None,
           "alerts": alerts, "live_first_alert_of_each_kind": kinds}
    if case.spec.precision == "float16":
        row["overflow_risk"] = _overflow(run)
    return row


def _cases(quick: bool) -> list[Case]:
    # the fault families first: the shortest runs, and each family's result does not wait for the grids
    if quick:
        return faults(seeds=(0,)) + divergence("tuned", seeds=(0,)) + divergence("held-out", seeds=(10,))
    return faults() + divergence("tuned") + divergence("held-out")


def _faults(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = fault_scores(rows, runs)
    fp16 = [r for r in rows if r["family"] == "fp16"]
    if fp16:
        div = [r for r in fp16 if r["first_nonfinite"] is not None]
        out["fp16"] = {
            "runs": len(fp16), "diverged": len(div),
            "overflow_risk_first_alert": [[r["spec"]["kind"], r["spec"]["lr"], r["spec"]["seed"], r["first_nonfinite"],
                                           r.get("overflow_risk")] for r in fp16],
            "overflow_risk_warned_10_ahead": sum(1 for r in div if r.get("overflow_risk")
                                                 and r["first_nonfinite"] - r["overflow_risk"][0] >= LEAD),
            "overflow_risk_on_runs_that_stayed_finite": sum(1 for r in fp16 if r["first_nonfinite"] is None
                                                            and r.get("overflow_risk"))}
    return out


def main(out: Path, repeat: int = 1, quick: bool = False, cache: Path | None = None) -> dict[str, Any]:
    rows = []
    runs = {}
    for case in _cases(quick):
        run = record(case.spec, every=case.every, cache=cache)
        rows.append(_row(case, run))
        runs[id(rows[-1])] = run
        print(json.dumps({k: rows[-1][k] for k in ("family", "split", "first_nonfinite")}
                         | {"spec": case.spec.kind + f" lr={case.spec.lr} wu={case.spec.warmup} s={case.spec.seed}",
                            "signalprop": rows[-1]["alerts"]["signalprop"]}), flush=True)
    grids = [r for r in rows if r["family"] in ("plain", "residual", "transformer")]
    healthy_tuned = [runs[id(r)] for r in grids if r["split"] == "tuned" and r["intent"] == "low"
                     and r["first_nonfinite"] is None]
    lim = {split: limits([dict(runs[id(r)], family=r["family"]) for r in grids if r["split"] == split], healthy_tuned)
           for split in ("tuned", "held-out")}
    summary = summarise(grids)
    fault_summary = summarise([r for r in rows if r not in grids], with_all=False)
    fp16 = fp16_scenario(quick)  # float16 overflow without loss scaling (ew_fp16.py): its own runs and controls
    res = {"goals": GOALS, "lead_steps": LEAD, "summary": summary, "fault_summary": fault_summary,
           "faults": _faults(rows, [runs[id(r)] for r in rows]), "fp16_overflow": fp16, "limits": lim,
           "tables": {split: markdown(summary, split) for split in summary}
           | {"faults": markdown(fault_summary, "held-out")}, "runs": rows}
    write(out, "bench_early_warning", res)
    head = {split: {rule: {k: t[k] for k in ("diverged", "warned_10_ahead", "recall_10_ahead", "median_lead",
                                               "healthy", "healthy_alerted", "precision")}
                    for rule, t in summary[split]["all"].items()} for split in summary}
    return {"headline": head, "median_runs_steps": statistics.median(r["steps"] for r in rows),
            "fp16_overflow": fp16["summary"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--repeat", type=int, default=1, help="unused (the runs are not timed)")
    ap.add_argument("--quick", action="store_true", help="one seed per grid: a smoke run of a few minutes")
    ap.add_argument("--cache", type=Path, default=None, help="keep each run's record here and reuse it")
    a = ap.parse_args()
    print(json.dumps(main(a.out, a.repeat, a.quick, a.cache), indent=1))
