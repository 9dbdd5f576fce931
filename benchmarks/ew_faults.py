"""Scoring the fault families of the early-warning benchmark against their truth.

* **attention** (AdamW at high rates; qk-layernorm beside): the truth is each
  step's largest causal attention logit |q.k|/sqrt(d) (computed inside the
  model's attention on every step, not by the monitor); a run's event is the
  first step it passes ``ATTN_LIMIT = 100``.  Hit: an ``attention-logit-growth``
  alert (its message says attention) at most ``WITHIN = 10`` steps after the
  event; false alarm: such an alert on a run whose logits never passed 100.
* **output-logits** (AdamW at rates where the log-partition drifts; z-loss
  beside): the truth is each step's mean log-partition log sum exp(z); the
  event is the first step it is ``LOGZ_DRIFT = 50`` nats from its first
  steps' (median of the first 3).  Hit: an ``output-logit-divergence`` alert
  within 10 steps of it; false alarm: one without the event.
* **corrupted-batch** (one batch of random labels / tokens at a known step
  of a healthy run, skip= on): whether signalprop called it a ``batch-spike``
  at that step and skipped its optimizer step, whether it called anything a
  divergence, and the step each peer rule first fired (their skip-step
  counterparts act on that).

For every run: the truth, signalprop's first alert of each kind, and each
peer rule's first alert.
"""

from __future__ import annotations

import statistics
from typing import Any

ATTN_LIMIT = 100.0
LOGZ_DRIFT = 50.0
WITHIN = 10


def _first(series: list[float | None], test: Any) -> int | None:
    return next((t for t, v in enumerate(series) if v is not None and test(v)), None)


def _kinds(run: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in run["alerts"]:
        out.setdefault(a["kind"], a["step"])
    return out


def _event_family(rows: list[dict[str, Any]], runs: list[dict[str, Any]], kind: str,
                  truth: Any) -> dict[str, Any]:
    per_run = []
    for row, run in zip(rows, runs):
        event = truth(run)
        kinds = _kinds(run)
        alert = kinds.get(kind)
        per_run.append({"spec": {k: row["spec"][k] for k in ("kind", "lr", "seed", "z_loss")},
                        "every": run["every"], "event_step": event, "alert_step": alert,
                        "hit": event is not None and alert is not None and alert - event <= WITHIN,
                        "first_alert_of_each_kind": kinds, "first_nonfinite": run["first_nonfinite"],
                        "final_loss": row["final_loss"], "peers": {k: v for k, v in row["alerts"].items()
                                                                   if not k.startswith(("signalprop", "candidate"))}})
    events = [r for r in per_run if r["event_step"] is not None]
    quiet = [r for r in per_run if r["event_step"] is None]
    return {"runs": len(per_run), "with_event": len(events),
            "alerted_within_10": sum(1 for r in events if r["hit"]),
            "recall_within_10": sum(1 for r in events if r["hit"]) / len(events) if events else None,
            "median_delay": statistics.median(r["alert_step"] - r["event_step"] for r in events
                                              if r["alert_step"] is not None) if any(
                r["alert_step"] is not None for r in events) else None,
            "without_event": len(quiet), "false_alarms": sum(1 for r in quiet if r["alert_step"] is not None),
            "per_run": per_run}


def _attention_event(run: dict[str, Any]) -> int | None:
    return _first(run.get("attn_logit_max") or [], lambda v: v > ATTN_LIMIT)


def _logit_event(run: dict[str, Any]) -> int | None:
    z = [v for v in run.get("log_partition") or [] if v is not None]
    if len(z) < 3:
        return None
    base = statistics.median(z[:3])
    return _first(run["log_partition"], lambda v: abs(v - base) > LOGZ_DRIFT)


def _corrupted(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    per_run = []
    for row, run in zip(rows, runs):
        step = row["spec"]["corrupt_step"]
        spikes = [a["step"] for a in run["alerts"] if a["kind"] == "batch-spike"]
        divergence = [(a["step"], a["kind"]) for a in run["alerts"] if a["kind"] in ("loss-spike", "update-spike")
                      or (a["kind"] == "non-finite")]
        per_run.append({"spec": {k: row["spec"][k] for k in ("kind", "lr", "seed")}, "corrupt_step": step,
                        "batch_spike_steps": spikes, "skipped": run.get("skipped", []),
                        "spike_at_corrupt_step": step in spikes, "skipped_corrupt_step": step in run.get("skipped", []),
                        "called_divergence": divergence, "first_nonfinite": run["first_nonfinite"],
                        "first_alert_of_each_kind": _kinds(run),
                        "peers_first_alert": {k: v for k, v in row["alerts"].items()
                                              if not k.startswith(("signalprop", "candidate"))}})
    peers = sorted({k for r in per_run for k in r["peers_first_alert"]})
    return {"runs": len(per_run),
            "signalprop_spike_at_corrupt_step": sum(r["spike_at_corrupt_step"] for r in per_run),
            "signalprop_skipped_it": sum(r["skipped_corrupt_step"] for r in per_run),
            "signalprop_other_batch_spikes": sum(len([s for s in r["batch_spike_steps"] if s != r["corrupt_step"]])
                                                 for r in per_run),
            "signalprop_called_divergence": sum(1 for r in per_run if r["called_divergence"]),
            "peers_fired_at_corrupt_step": {p: sum(1 for r in per_run if r["peers_first_alert"].get(p)
                                                   and r["peers_first_alert"][p][0] == r["corrupt_step"])
                                            for p in peers},
            "peers_fired_before_it": {p: sum(1 for r in per_run if r["peers_first_alert"].get(p)
                                             and r["peers_first_alert"][p][0] < r["corrupt_step"]) for p in peers},
            "per_run": per_run}


def fault_scores(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per fault family with a truth of its own (``rows``: the benchmark's rows, ``runs``: their records)."""
    out: dict[str, Any] = {}
    for fam, kind, truth in (("attention", "attention-logit-growth", _attention_event),
                             ("output-logits", "output-logit-divergence", _logit_event)):
        idx = [i for i, r in enumerate(rows) if r["family"] == fam]
        if idx:
            out[fam] = _event_family([rows[i] for i in idx], [runs[i] for i in idx], kind, truth)
    idx = [i for i, r in enumerate(rows) if r["family"] == "corrupted-batch"]
    if idx:
        out["corrupted-batch"] = _corrupted([rows[i] for i in idx], [runs[i] for i in idx])
    return out
