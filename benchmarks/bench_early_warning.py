"""Early warning, measured: how often sp.monitor's first alert comes >= 10 steps
before a diverging run's loss turns non-finite, and how often a healthy run
gets any alert.

Real runs (signalprop.lab.training_runs): a ReLU MLP and a residual MLP on the
bundled digits, a character-level transformer on the standard library's
source; SGD with momentum 0.9; seeds x learning rates.  A run counts as
diverging when its loss turns non-finite within `steps` steps.  The learning
rates span fast and slow failures: each model has one rate at which it turns
non-finite within a few dozen steps or less (the transformer at 0.5 within 10:
no alert can lead those by 10 steps, and they count as misses) and slower ones.
The share is also reported over the runs that lasted at least 10 steps.
Goals: >= 80% of diverging runs warned >= 10 steps ahead; <= 5% of healthy
runs with any alert.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from _util import run_cli, write
from signalprop.lab.training_runs import train

DIVERGING = {"mlp": (0.1, 0.2, 0.3), "resmlp": (0.1, 0.3), "transformer": (0.3, 0.5)}
HEALTHY = {"mlp": (0.01, 0.03), "resmlp": (0.01, 0.03), "transformer": (0.1,)}
LEAD = 10


def main(out: Path, repeat: int, seeds: int = 4, steps: int = 300) -> dict[str, Any]:
    runs = []
    for group, table in (("diverging", DIVERGING), ("healthy", HEALTHY)):
        n_seeds = seeds if group == "diverging" else seeds + 1
        for kind, lrs in table.items():
            for lr in lrs:
                for seed in range(n_seeds):
                    r = train(kind, lr, seed, steps)
                    r.pop("report")
                    runs.append({"group": group, "kind": kind, "lr": lr, "seed": seed,
                                 "first_nonfinite": r["first_nonfinite"], "first_alert": r["first_alert"],
                                 "first_alert_kind": r["alerts"][0]["kind"] if r["alerts"] else None,
                                 "alerts": len(r["alerts"])})
                    print(runs[-1], flush=True)
    diverged = [r for r in runs if r["first_nonfinite"] is not None]
    healthy = [r for r in runs if r["group"] == "healthy" and r["first_nonfinite"] is None]
    late = [r for r in diverged if r["first_nonfinite"] >= LEAD]
    leads = [r["first_nonfinite"] - r["first_alert"] for r in diverged if r["first_alert"] is not None]

    def share_warned(group: list[dict[str, Any]]) -> float | None:
        warned = sum(1 for r in group if r["first_alert"] is not None and r["first_nonfinite"] - r["first_alert"] >= LEAD)
        return warned / len(group) if group else None

    res = {"diverging_runs": len(diverged), "healthy_runs": len(healthy),
           "share_warned_10_steps_ahead": share_warned(diverged),
           "share_warned_10_steps_ahead_of_runs_lasting_10": share_warned(late),
           "median_lead_steps": statistics.median(leads) if leads else None,
           "share_healthy_with_any_alert": sum(1 for r in healthy if r["alerts"]) / len(healthy) if healthy else None,
           "goals": {"share_warned_10_steps_ahead": 0.8, "share_healthy_with_any_alert": 0.05},
           "steps": steps, "seeds": seeds, "runs": runs}
    write(out, "bench_early_warning", res)
    return {k: v for k, v in res.items() if k != "runs"}


if __name__ == "__main__":
    run_cli(main, 1)
