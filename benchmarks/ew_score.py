"""Scoring the early-warning benchmark: each rule's first alert on each run,
then per family and rule: runs, divergences, warned >= 10 steps ahead, median
lead, healthy-run false alarms, precision and recall."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from ew_peers import PEERS
from ew_replay import first_alert, relative_updates

LEAD = 10
# signalprop's per-step kinds (replayed); every other kind is the monitor's own live alert on sampled steps
# (update-growth: replayed from the recorded per-step update norms)
SCALAR = ("loss-spike", "grad-surge", "batch-spike", "update-growth")  # batch-spike: one bad batch, scored apart


def _live(run: dict[str, Any]) -> tuple[int, str] | None:
    """The monitor's first sampled-step alert (update ratio, drift, saturation, ... and any kind added
    later, such as attention-logit growth); non-finite alerts are the truth, not a warning."""
    a = [(x["step"], x["kind"]) for x in run["alerts"] if x["kind"] not in SCALAR + ("non-finite",)]
    return min(a) if a else None


def _earliest(*alerts: tuple[int, str] | None) -> tuple[int, str] | None:
    found = [a for a in alerts if a is not None]
    return min(found) if found else None


def _signalprop(grad_every: int, rules: str) -> Callable[[dict[str, Any]], tuple[int, str] | None]:
    def rule(run: dict[str, Any]) -> tuple[int, str] | None:
        return _earliest(_live(run), first_alert(run["losses"], run["grad_norms"], grad_every=grad_every,
                                                 rules=rules, until=run["first_nonfinite"],
                                                 updates=relative_updates(run) if rules == "current" else ()))
    return rule


def _peer(fn: Callable[..., int | None]) -> Callable[[dict[str, Any]], tuple[int, str] | None]:
    def rule(run: dict[str, Any]) -> tuple[int, str] | None:
        n = run["first_nonfinite"]
        losses = run["losses"][:n] if n is not None else run["losses"]
        t = fn(losses, run["grad_norms"][:len(losses)])
        return (t, "spike") if t is not None else None
    return rule


def _weight_growth(run: dict[str, Any], grow: float = 0.02, m: int = 5, warm: int = 16) -> tuple[int, str] | None:
    """A candidate rule the monitor cannot run today (it reads no weight norm per step): the weights'
    norm grown >= 2% over the last 5 steps, and faster than over the 5 before (the positive feedback of a
    diverging homogeneous net: larger weights, larger gradients, larger updates)."""
    w = run["weight_norms"]
    for t in range(max(warm, 2 * m), len(w)):
        if None in (w[t], w[t - m], w[t - 2 * m]):
            continue
        g1, g0 = w[t] / w[t - m] - 1, w[t - m] / w[t - 2 * m] - 1
        if g1 >= grow and g1 >= g0:
            return t, "weight-growth"
    return None


SIGNALPROP = _signalprop(1, "current")
RULES: dict[str, Callable[[dict[str, Any]], tuple[int, str] | None]] = {
    "signalprop": SIGNALPROP,
    "signalprop, grad_every=4 (CPU default)": _signalprop(4, "current"),
    "signalprop, previous rules": _signalprop(1, "previous"),
    **{name: _peer(fn) for name, fn in PEERS.items()},
    "candidate: weight growth (not in the monitor)": _weight_growth,
    "signalprop + candidate weight growth": lambda r: _earliest(SIGNALPROP(r), _weight_growth(r)),
}


def first_alerts(run: dict[str, Any]) -> dict[str, tuple[int, str] | None]:
    """Each rule's first alert before the run's first non-finite loss (None: no alert)."""
    n = run["first_nonfinite"]
    out = {}
    for name, rule in RULES.items():
        a = rule(run)
        out[name] = a if a is not None and (n is None or a[0] < n) else None
    return out


def table(rows: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    """One rule over ``rows`` (each: first_nonfinite, intent, alerts[rule])."""
    div = [r for r in rows if r["first_nonfinite"] is not None]
    healthy = [r for r in rows if r["first_nonfinite"] is None and r["intent"] == "low"]
    alerted = [r for r in rows if r["alerts"][rule] is not None]
    leads = [r["first_nonfinite"] - r["alerts"][rule][0] for r in div if r["alerts"][rule] is not None]
    warned = sum(1 for x in leads if x >= LEAD)
    lasting = [r for r in div if r["first_nonfinite"] >= 2 * LEAD]
    warned_lasting = sum(1 for r in lasting if r["alerts"][rule] is not None
                         and r["first_nonfinite"] - r["alerts"][rule][0] >= LEAD)
    true_pos = sum(1 for r in alerted if r["first_nonfinite"] is not None)
    both = [r for r in div if r["alerts"][rule] is not None and r["alerts"]["signalprop"] is not None]
    return {"runs": len(rows), "diverged": len(div), "warned_10_ahead": warned,
            "recall_10_ahead": warned / len(div) if div else None,
            "alerted_before_nonfinite": len(leads),
            "median_lead": statistics.median(leads) if leads else None,
            "diverged_lasting_20": len(lasting), "warned_10_ahead_of_lasting_20": warned_lasting,
            "healthy": len(healthy), "healthy_alerted": sum(1 for r in healthy if r["alerts"][rule] is not None),
            "alerted": len(alerted), "precision": true_pos / len(alerted) if alerted else None,
            # on the same runs: the diverged runs both this rule and signalprop alerted before the loss turned non-finite
            "paired_runs": len(both),
            "paired_median_lead": statistics.median(r["first_nonfinite"] - r["alerts"][rule][0] for r in both)
            if both else None,
            "signalprop_paired_median_lead": statistics.median(
                r["first_nonfinite"] - r["alerts"]["signalprop"][0] for r in both) if both else None}


def summarise(rows: list[dict[str, Any]], with_all: bool = True) -> dict[str, Any]:
    """Per split, family (and "all" of them) and rule."""
    out: dict[str, Any] = {}
    for split in sorted({r["split"] for r in rows}):
        in_split = [r for r in rows if r["split"] == split]
        fams = sorted({r["family"] for r in in_split}) + (["all"] if with_all else [])
        out[split] = {fam: {rule: table([r for r in in_split if fam == "all" or r["family"] == fam], rule)
                            for rule in RULES} for fam in fams}
    return out


def markdown(summary: dict[str, Any], split: str, rules: list[str] | None = None) -> str:
    """The README's table for one split."""
    lines = ["| family | rule | runs | diverged | warned >= 10 ahead | median lead (same runs: rule / signalprop) | "
             "healthy alerted | precision |", "|---|---|---|---|---|---|---|---|"]
    for fam, by_rule in summary[split].items():
        for rule, t in by_rule.items():
            if rules is not None and rule not in rules:
                continue
            share = f"{t['warned_10_ahead']}/{t['diverged']}" + (
                f" ({t['recall_10_ahead']:.0%})" if t["diverged"] else "")
            prec = f"{t['precision']:.2f}" if t["precision"] is not None else "-"
            lead = f"{t['median_lead']:g}" if t["median_lead"] is not None else "-"
            if t["paired_runs"] and not rule.startswith("signalprop"):
                lead += f" ({t['paired_median_lead']:g} / {t['signalprop_paired_median_lead']:g} on {t['paired_runs']})"
            lines.append(f"| {fam} | {rule} | {t['runs']} | {t['diverged']} | {share} | {lead} | "
                         f"{t['healthy_alerted']}/{t['healthy']} | {prec} |")
    return "\n".join(lines)
