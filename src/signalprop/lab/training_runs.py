"""Real training runs watched by ``sp.monitor``: runs that diverge and the fix.

Three models on real data that ships with Python packages or Python itself:

* ``mlp``: 6-layer ReLU MLP (He init) on scikit-learn's bundled digits;
* ``resmlp``: the same width with 6 residual blocks (x + W2 relu(W1 x));
* ``transformer``: a 2-layer causal character-level transformer (d=64) on the
  text of the standard library's own source files (``json``, ``argparse``, ...),
  read from the running interpreter's installation.

SGD with momentum 0.9; a learning rate too large diverges (the loss turns
non-finite), a usual one trains.  ``lab run monitor`` trains one diverging run
per model, then the same run with adaptive gradient clipping
(``monitor(..., agc=...)``), and records when the first alert fired and when
the loss first turned non-finite.  ``benchmarks/bench_early_warning.py``
repeats this over seeds and learning rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Experiment, register

KINDS = ("mlp", "resmlp", "transformer")


class _ResMLP(nn.Module):
    def __init__(self, width: int = 128, blocks: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class _CharTransformer(nn.Module):
    def __init__(self, vocab: int, d: int = 64, layers: int = 2, seq: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = cast(torch.Tensor, self.mask)
        h = self.emb(ids) + self.pos[:t]
        return self.head(self.body(h, mask=mask[:t, :t], is_causal=True))


def stdlib_text(max_chars: int = 400_000) -> str:
    """Source of a few standard-library modules, from this interpreter's installation."""
    import argparse
    import inspect
    import json.decoder
    import textwrap

    parts = []
    for mod in (argparse, json.decoder, textwrap, inspect):
        parts.append(Path(mod.__file__).read_text(encoding="utf-8"))  # type: ignore[arg-type]
    return "".join(parts)[:max_chars]


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .datasets import digits

    d = digits(seed)
    return d.x_train, d.y_train


def build(kind: str, seed: int) -> tuple[nn.Module, Any]:
    """The model and a ``batch(generator) -> (loss_fn inputs)`` sampler."""
    import signalprop as sp

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if kind in ("mlp", "resmlp"):
        x, y = _digits(seed)
        if kind == "mlp":
            layers: list[nn.Module] = [nn.Linear(x.shape[1], 128), nn.ReLU()]
            for _ in range(4):
                layers += [nn.Linear(128, 128), nn.ReLU()]
            model: nn.Module = nn.Sequential(*layers, nn.Linear(128, 10))
            sp.init.apply_(model, "kaiming_normal", generator=gen)
        else:
            model = _ResMLP()

        def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(0, len(x), (64,), generator=g)
            return x[idx], y[idx]

        return model, batch
    if kind == "transformer":
        text = stdlib_text()
        chars = sorted(set(text))
        index = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([index[c] for c in text])
        model = _CharTransformer(len(chars))

        def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            start = torch.randint(0, len(ids) - 65, (16,), generator=g)
            seqs = torch.stack([ids[s:s + 65] for s in start.tolist()])
            return seqs[:, :-1], seqs[:, 1:]

        return model, batch
    raise ValueError(f"unknown model kind {kind!r}; one of {KINDS}")


def train(kind: str, lr: float, seed: int = 0, steps: int = 300, *, every: int = 25, agc: float | None = None,
          monitored: bool = True) -> dict[str, Any]:
    """One run: losses, the first non-finite step, and the monitor's alerts."""
    import signalprop as sp

    model, batch = build(kind, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1000 + seed)
    mon = sp.monitor(model, every=every, agc=agc) if monitored else None
    losses: list[float] = []
    first_bad = None
    try:
        for step in range(steps):
            xb, yb = batch(g)
            out = model(xb)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1))
            opt.zero_grad()
            loss.backward()
            if mon is not None:
                mon.step(loss)
            if agc is not None and mon is None:
                sp.clip.agc_(model.parameters(), clipping=agc)
            opt.step()
            v = loss.item()
            losses.append(v)
            if not math.isfinite(v):
                first_bad = step
                break
    finally:
        if mon is not None:
            mon.close()
    alerts = list(mon.alerts) if mon is not None else []
    return {"kind": kind, "lr": lr, "seed": seed, "steps": len(losses), "losses": losses,
            "first_nonfinite": first_bad, "alerts": [a.to_dict() for a in alerts],
            "first_alert": alerts[0].step if alerts else None, "report": mon.report() if mon else None}


# learning rates measured to diverge within 300 steps (seed 0) and to train
DIVERGING = {"mlp": 0.3, "resmlp": 0.3, "transformer": 1.0}
HEALTHY = {"mlp": 0.03, "resmlp": 0.01, "transformer": 0.1}


@dataclass(frozen=True)
class MonitorConfig:
    kinds: tuple[str, ...] = KINDS
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
