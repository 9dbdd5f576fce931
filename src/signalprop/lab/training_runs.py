"""Real training runs watched by ``sp.monitor``: runs that diverge and the fix.

The models and data are in :mod:`signalprop.lab.run_models` (a ReLU MLP, a
residual MLP and a character transformer on data that ships with Python or
its packages, and held-out architectures).  A run is a frozen
:class:`RunSpec`: SGD with momentum 0.9 (or AdamW), a constant learning rate
or a linear warm-up to it, float32 or the forward under float16 autocast
without loss scaling, optionally one corrupted batch.  A learning rate too
large diverges (the loss turns non-finite), a usual one trains.  ``lab run
monitor`` trains one diverging run per model, then the same run with adaptive
gradient clipping (``monitor(..., agc=...)``), and records when the first
alert fired and when the loss first turned non-finite.
``benchmarks/bench_early_warning.py`` repeats this over seeds, learning rates,
schedules and models, with other projects' rules side by side.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .registry import Experiment, register
from .run_models import KINDS, build, corrupt

OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("float32", "float16")


@dataclass(frozen=True)
class RunSpec:
    """One training run.  ``warmup``: the learning rate rises linearly from
    ``lr / warmup`` to ``lr`` over this many steps (0: constant).
    ``precision="float16"``: the forward runs under
    ``torch.autocast("cpu", dtype=torch.float16)`` (weights and optimizer in
    float32) with no loss scaling, so an activation or gradient past 65504
    overflows.  ``corrupt_step``: that step's batch is corrupted
    (:func:`signalprop.lab.run_models.corrupt`).  ``z_loss``: add
    ``z_loss * mean(logsumexp(logits)^2)`` to the loss (PaLM's z-loss, 1e-4
    there), which keeps the output logits' log-partition near 0.  ``skip``:
    the monitor skips the optimizer step of a step it alerted as a spike
    (``monitor(..., skip=optimizer)``)."""

    kind: str
    lr: float
    seed: int = 0
    steps: int = 300
    warmup: int = 0
    optimizer: str = "sgd"
    precision: str = "float32"
    corrupt_step: int | None = None
    z_loss: float = 0.0
    skip: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (("kind", self.kind, KINDS), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; one of {allowed}")

    def lr_at(self, step: int) -> float:
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else self.lr


def _optimizer(spec: RunSpec, params: Any) -> torch.optim.Optimizer:
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr_at(0), weight_decay=0.0)
    return torch.optim.SGD(params, lr=spec.lr_at(0), momentum=0.9)


def run(spec: RunSpec, *, every: int = 25, agc: float | None = None, monitored: bool = True,
        grad_every: int | None = None, record_updates: bool = False,
        record_logits: bool = False) -> dict[str, Any]:
    """One run: the per-step losses, the first non-finite step, the monitor's
    alerts and, when monitored, its per-step gradient norms (every
    ``grad_every``-th step; None between).  ``record_updates``: also the norm
    of every optimizer step's update, ||w_{t+1} - w_t||, and of the weights
    before it (one copy of the weights per step: for studies, not for speed).
    ``record_logits``: also each step's largest attention logit |q.k|/sqrt(d)
    (models with :class:`~signalprop.lab.run_models.Attention`; None for
    others) and the output logits' mean log-partition."""
    import signalprop as sp

    model, batch = build(spec.kind, spec.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(spec, params)
    g = torch.Generator().manual_seed(1000 + spec.seed)
    bad_g = torch.Generator().manual_seed(2000 + spec.seed)
    mon = sp.monitor(model, every=every, agc=agc, grad_every=grad_every, optimizer=opt,
                     skip=opt if spec.skip else None) if monitored else None
    attn: list[Any] = [m for m in model.modules() if hasattr(m, "track_logits")] if record_logits else []
    for m in attn:
        m.track_logits = True
    attn_max: list[float | None] = []
    log_z: list[float] = []
    losses: list[float] = []
    updates: list[float] = []
    weights: list[float] = []
    first_bad = None
    half = torch.autocast("cpu", dtype=torch.float16) if spec.precision == "float16" else contextlib.nullcontext()
    try:
        for step in range(spec.steps):
            for group in opt.param_groups:
                group["lr"] = spec.lr_at(step)
            xb, yb = batch(g)
            if step == spec.corrupt_step:
                xb, yb = corrupt(xb, yb, bad_g, _classes(model))
            with half:
                out = model(xb)
            logits = out.float().reshape(-1, out.shape[-1])
            loss = F.cross_entropy(logits, yb.reshape(-1))
            if spec.z_loss:
                loss = loss + spec.z_loss * logits.logsumexp(-1).pow(2).mean()
            if record_logits:
                log_z.append(float(logits.detach().logsumexp(-1).mean()))
                attn_max.append(max(float(m.logit_max) for m in attn) if attn else None)
            opt.zero_grad()
            loss.backward()
            if mon is not None:
                mon.step(loss)
            if agc is not None and mon is None:
                sp.clip.agc_(model.parameters(), clipping=agc)
            before = [p.detach().clone() for p in params] if record_updates else None
            opt.step()
            if before is not None:
                with torch.no_grad():
                    weights.append(math.sqrt(sum(float(b.double().pow(2).sum()) for b in before)))
                    updates.append(math.sqrt(sum(float((p.detach() - b).double().pow(2).sum())
                                                 for p, b in zip(params, before))))
            v = loss.item()
            losses.append(v)
            if not math.isfinite(v):
                first_bad = step
                break
    finally:
        if mon is not None:
            mon.close()
    alerts = list(mon.alerts) if mon is not None else []
    out_d: dict[str, Any] = {**asdict(spec), "steps": len(losses), "losses": losses, "first_nonfinite": first_bad,
                             "alerts": [a.to_dict() for a in alerts], "first_alert": alerts[0].step if alerts else None,
                             "grad_norms": list(mon.grad_norms) if mon is not None else [],
                             "report": mon.report() if mon else None}
    if record_updates:
        out_d.update(update_norms=updates, weight_norms=weights)
    if record_logits:
        out_d.update(attn_logit_max=attn_max, log_partition=log_z)
    return out_d


def _classes(model: Any) -> int:
    head = getattr(model, "head", None) or getattr(model, "out", None) or list(model.children())[-1]
    return int(head.out_features)


def train(kind: str, lr: float, seed: int = 0, steps: int = 300, *, every: int = 25, agc: float | None = None,
          monitored: bool = True, **spec: Any) -> dict[str, Any]:
    """:func:`run` of ``RunSpec(kind, lr, seed, steps, **spec)``."""
    return run(RunSpec(kind, lr, seed, steps, **spec), every=every, agc=agc, monitored=monitored)


# learning rates measured to diverge within 300 steps (seed 0) and to train
DIVERGING = {"mlp": 0.3, "resmlp": 0.3, "transformer": 1.0}
HEALTHY = {"mlp": 0.03, "resmlp": 0.01, "transformer": 0.1}


@dataclass(frozen=True)
class MonitorConfig:
    kinds: tuple[str, ...] = ("mlp", "resmlp", "transformer")
    steps: int = 300
    every: int = 25
    agc: float = 0.01
    seed: int = 0


def _run(cfg: MonitorConfig, out: Path, progress: Any) -> dict[str, Any]:
    from ..report.figures import new_figure

    if progress is not None:
        progress.start(2 * len(cfg.kinds), "monitor")
    runs = {}
    headline = []
    fig, axes = new_figure(1, len(cfg.kinds), figsize=(5 * len(cfg.kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], cfg.kinds):
        bad = train(kind, DIVERGING[kind], cfg.seed, cfg.steps, every=cfg.every)
        fixed = train(kind, DIVERGING[kind], cfg.seed, cfg.steps, every=cfg.every, agc=cfg.agc)
        for r, label in ((bad, "plain"), (fixed, f"agc={cfg.agc}")):
            ys = [v if math.isfinite(v) else float("nan") for v in r["losses"]]
            ax.semilogy(range(len(ys)), ys, lw=1, label=f"{label} (lr {r['lr']:g})")
        if bad["first_alert"] is not None:
            ax.axvline(bad["first_alert"], c="red", ls="--", lw=1, label=f"first alert (step {bad['first_alert']})")
        if bad["first_nonfinite"] is not None:
            ax.axvline(bad["first_nonfinite"], c="black", ls=":", lw=1,
                       label=f"loss non-finite (step {bad['first_nonfinite']})")
        ax.set(title=kind, xlabel="step", ylabel="training loss")
        ax.legend(fontsize=7)
        first = bad["alerts"][0] if bad["alerts"] else None
        lead = (bad["first_nonfinite"] - bad["first_alert"]) if bad["first_nonfinite"] is not None and \
            bad["first_alert"] is not None else None
        headline.append(f"{kind}: lr {bad['lr']:g} loss non-finite at step {bad['first_nonfinite']}, first alert at "
                        f"step {bad['first_alert']}" + _lead(lead)
                        + (f": {first['kind']} at {first['layer']}" if first else "")
                        + f"; with AGC the loss ends at {fixed['losses'][-1]:.3g} after {fixed['steps']} steps"
                        + ("" if fixed["first_nonfinite"] is None else f" (non-finite at {fixed['first_nonfinite']})"))
        bad["report"].save_html(out / f"monitor-{kind}.html")
        for r in (bad, fixed):
            r.pop("report")
        runs[kind] = {"diverging": bad, "agc": fixed}
        if progress is not None:
            progress.advance(2, f"monitor: {kind}")
    fig.savefig(out / "monitor.png", dpi=100)
    return {"runs": runs, "headline": headline, "figure": "monitor.png"}


def _lead(lead: int | None) -> str:
    """How long before the loss turned non-finite the first alert came, in words that fit its sign."""
    if lead is None:
        return ""
    return f" ({lead} steps earlier)" if lead > 0 else " (the same step)" if lead == 0 else f" ({-lead} steps later)"


register(Experiment("monitor", "training runs that diverge, the alert that came first, and the fix (AGC)",
                    MonitorConfig, _run, quick={"kinds": ("mlp",), "steps": 120}))
