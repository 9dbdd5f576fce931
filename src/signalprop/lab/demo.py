"""The demo: the story of Dive into Deep Learning's chapter on numerical
stability and initialization, on a real model and real data.

A 50-layer sigmoid MLP on scikit-learn's digits: naive N(0, 1) weights,
torch's default, Xavier and critical initialization, each diagnosed by
``check`` at initialization and trained briefly to show what the diagnosis
predicts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..probe.check import check
from ..records import _clean
from ..words import span_label
from .datasets import digits
from .models import build
from .registry import environment, run_experiment
from .train import flush_denormals, torch_threads, train


@dataclass(frozen=True)
class DemoConfig:
    depth: int = 50
    width: int = 256
    act: str = "sigmoid"
    inits: tuple[str, ...] = ("normal", "default", "xavier_normal", "critical")
    steps: int = 200
    lr: float = 0.01  # best of {0.01, 0.05} for critical init on the validation split
    momentum: float = 0.9
    batch: int = 128
    seed: int = 0
    # torch threads for these small models, the caller's again after.  A step's products (128 x 256 by
    # 256 x 256) are too small to gain from a second thread, and on a loaded machine every parallel
    # region waits for its slowest thread.  Measured on a 2-core machine with 4 `yes > /dev/null` and
    # other users' work running (load ~10): one model's 200 steps took 50 s with 1 thread; with 2
    # (torch's default there), 5 steps took 98 s.
    threads: int = 1
    # subnormal floats flushed to zero while training (not while checking: check reports what the model
    # computes).  The vanishing models' gradients are subnormal, and each CPU multiply on one takes a slow
    # path: with them, torch default's steps took 14x and the naive init's 6x the critical model's, and
    # the time left that the progress line showed swung from 2m to 4m and back to 40 s.  The losses and
    # accuracies are the same either way (their updates are 0 or nearly).
    flush_denormals: bool = True


_LABEL = {"normal": "naive N(0,1)", "default": "torch default", "xavier_normal": "Xavier normal",
          "critical": "critical (signalprop)"}


def _where(report: Any, p: Any) -> str:
    """Where a problem is, in words (``layers 0–99``)."""
    if not 0 <= p.first <= p.last < len(report.layers):
        return p.layer
    a, b = report.layers[p.first], report.layers[p.last]
    return span_label(a.name, a.kind, b.name, b.kind)


def demo_seed(cfg: DemoConfig, out: Path) -> dict[str, float]:
    """The numbers of Dive into Deep Learning's two demonstrations (the
    ``sigmoid`` and ``explode`` experiments, figures under ``out``): quick,
    so that they can be shown before the training starts."""
    with torch_threads(cfg.threads):
        sig = run_experiment("sigmoid", out / "seed-sigmoid")["activations"]["sigmoid"]
        prod = run_experiment("explode", out / "seed-explode", seed=cfg.seed)["products"]
    return {"sigmoid_max_grad": sig["max_grad"], "sigmoid_grad_at_-8": sig["grad_at_start"],
            "normal_product": prod["normal(0,1)"]["max_abs_entry"],
            "orthogonal_product_norm": 10 ** prod["orthogonal"]["final_log10_norm"]}


def run_demo(cfg: DemoConfig, out: Path, progress: Any = None, seed: dict[str, float] | None = None) -> dict[str, Any]:
    """The whole demo (``seed``: :func:`demo_seed`'s numbers when already
    computed), written to ``out/demo.json``; torch's thread count is
    ``cfg.threads`` inside and the caller's again after."""
    out.mkdir(parents=True, exist_ok=True)
    if seed is None:
        seed = demo_seed(cfg, out)
    with torch_threads(cfg.threads):
        return _run(cfg, out, progress, seed)


def _run(cfg: DemoConfig, out: Path, progress: Any, seed: dict[str, float]) -> dict[str, Any]:
    data = digits(cfg.seed)
    spec = f"mlp:depth={cfg.depth},width={cfg.width},act={cfg.act},in={data.n_features},out={data.n_classes}"
    probe_batch = data.x_train[: cfg.batch]
    rows, html = [], []
    if progress is not None:
        progress.start(cfg.steps * len(cfg.inits), "training")
    for init in cfg.inits:
        if progress is not None:
            progress.advance(0, description=f"training ({_LABEL.get(init, init)})")
        b = build(spec, init=init, seed=cfg.seed, batch=cfg.batch)
        if init == "critical":  # calibrate on real inputs, not on the builder's random ones
            import torch

            from ..init import critical_

            critical_(b.model, probe_batch, generator=torch.Generator().manual_seed(cfg.seed))
        before = check(b.model, probe_batch)
        if init in ("normal", "critical"):
            path = out / f"report-{init}.html"
            before.save_html(path)
            html.append(str(path))
        with flush_denormals(cfg.flush_denormals):
            res = train(b.model, data, steps=cfg.steps, lr=cfg.lr, momentum=cfg.momentum, batch=cfg.batch,
                        seed=cfg.seed, progress=progress)
        after = check(b.model, probe_batch)
        s = before.summary
        sat = max((layer.saturation or 0.0) for layer in before.layers)
        rows.append({
            "init": _LABEL.get(init, init), "scheme": init, "verdict": before.verdict,
            "grad_first": before.layers[0].grad_rms,
            "grad_last": next((layer.grad_rms for layer in reversed(before.layers[:-1]) if layer.param_grad_rms is not None),
                              None),
            "first_last_grad_ratio": s.first_last_grad_ratio, "max_saturation": sat,
            "problem": before.problems[0].message if before.problems else "",
            "problems": [f"{p.kind} ({_where(before, p)})" for p in before.problems],
            "suggestion": before.problems[0].suggestion if before.problems else "",
            "cli_suggestion": before.problems[0].fix("cli") if before.problems else "",
            "final_loss": res.losses[-1] if res.losses else None, "test_acc": res.test_acc,
            "val_acc": res.val_acc, "diverged": res.diverged, "verdict_after": after.verdict,
            "loss_curve": res.losses,
        })
    result = {
        "config": asdict(cfg), "environment": environment(), "model": spec,
        "data": f"{data.source}, {len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} test, "
                f"split seed {data.seed}",
        "seed": seed,
        "rows": rows, "html": html,
    }
    (out / "demo.json").write_text(json.dumps(_clean(result), indent=2))
    return result
