"""One training run recorded for the early-warning benchmark: the truth, the
per-step series every rule reads, signalprop's alerts, and the per-layer
statistics of the sampled steps in compact form."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from signalprop.lab.training_runs import RunSpec, run

UPDATE_STATS = ("update_rms", "update_lr_rms", "adam_lag_rms", "adam_lag_max")


def key(spec: RunSpec, every: int, grad_every: int) -> str:
    blob = json.dumps({**asdict(spec), "every": every, "grad_every": grad_every}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _samples(report: Any) -> list[dict[str, Any]]:
    """Per sampled step: each layer's relative gradient RMS, max |y| and max |dL/dy|."""
    out = []
    for h in report.history:
        out.append({"step": h.step, "incomplete": bool(h.incomplete),
                    "layers": [[layer.name, layer.kind, layer.relative_grad_rms, layer.stats.get("forward_absmax"),
                                layer.stats.get("grad_absmax")] for layer in h.layers],
                    # per module (its first row): the optimizer step after the sample, and attention logits
                    "update": {layer.name: {k: layer.stats[k] for k in UPDATE_STATS if k in layer.stats}
                               for layer in h.layers if any(k in layer.stats for k in UPDATE_STATS)},
                    "attn_logit_max": {layer.name: layer.stats["attn_logit_max"] for layer in h.layers
                                       if layer.stats.get("attn_logit_max") is not None},
                    "log_partition": h.output_logits.log_partition if h.output_logits is not None else None,
                    "update_ratios": [list(x) for x in h.update_ratios]})
    return out


def _finite(xs: list[Any]) -> list[float | None]:
    return [None if x is None or not math.isfinite(x) else float(x) for x in xs]


def record(spec: RunSpec, *, every: int = 25, grad_every: int = 1, cache: Path | None = None) -> dict[str, Any]:
    """The run of ``spec`` with the monitor (``grad_every=1``: the gradient norm
    of every step, which the peers' rules read), as plain JSON values; read from
    ``cache`` when it holds this run."""
    path = cache / f"{key(spec, every, grad_every)}.json" if cache is not None else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    r = run(spec, every=every, grad_every=grad_every, record_updates=True, record_logits=True)
    report = r.pop("report")
    losses = r["losses"]
    out = {"spec": asdict(spec), "every": every, "grad_every": grad_every, "steps": r["steps"],
           "first_nonfinite": r["first_nonfinite"],
           # the non-finite value itself is dropped from the series the rules read: every rule here is
           # judged on the steps before the loss turned non-finite
           "losses": _finite(losses), "grad_norms": _finite(r["grad_norms"]),
           "update_norms": _finite(r["update_norms"]), "weight_norms": _finite(r["weight_norms"]),
           "attn_logit_max": _finite(r["attn_logit_max"]), "log_partition": _finite(r["log_partition"]),
           "skipped": list(report.skipped),
           "alerts": [{k: a[k] for k in ("step", "kind", "layer", "message")} for a in r["alerts"]],
           "samples": _samples(report)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return out
