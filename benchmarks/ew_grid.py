"""The runs of the early-warning benchmark: families, learning rates, schedules, seeds.

Two grids.  The **tuned** grid is the one the rules' thresholds were studied
on (seeds 0-3 of the ReLU MLP, residual MLP and character transformer, SGD
with momentum 0.9, constant rates and 100-step linear warm-ups).  The
**held-out** grid was run only after the rules were fixed: other seeds
(10-12), other rates and warm-up lengths, and architectures the tuning never
saw (a 10-layer MLP of width 64, 12 residual blocks of width 64, a CNN, a
nanoGPT-style LM trained with SGD warm-ups).  Besides divergence, three fault
families: float16 autocast without loss scaling, one corrupted batch in a
healthy run, and attention-logit growth (AdamW at high rates, with and
without qk-layernorm).

``intent``: "high" for rates past the stable one (expected to diverge; the
truth is what happened), "low" for the rates a practitioner would use (the
healthy runs that false alarms are counted on).
"""

from __future__ import annotations

from dataclasses import dataclass

from signalprop.lab.training_runs import RunSpec


@dataclass(frozen=True)
class Case:
    family: str  # "plain", "residual", "transformer", "fp16", "corrupted-batch", "attention"
    intent: str  # "high" | "low"
    split: str  # "tuned" | "held-out"
    spec: RunSpec
    every: int = 25  # the monitor's sampling (10 where the alert must come within 10 steps of the truth)


FAMILY = {"mlp": "plain", "mlp10": "plain", "cnn": "plain", "resmlp": "residual", "resmlp12": "residual",
          "transformer": "transformer", "gpt": "transformer", "gpt-qknorm": "transformer"}

# (kind, warm-up steps, high rates, low rates)
TUNED = [("mlp", 0, (0.2, 0.3), (0.03, 0.05)), ("mlp", 100, (0.3, 0.5, 1.0), (0.05,)),
         ("resmlp", 0, (0.1, 0.2), (0.03, 0.05)), ("resmlp", 100, (0.3, 0.5, 1.0), (0.05,)),
         ("transformer", 0, (0.35,), (0.1,)), ("transformer", 100, (1.0, 2.0), (0.3,))]
HELD_OUT = [("mlp", 0, (0.15, 0.5), (0.02,)), ("mlp", 50, (0.4, 0.8), (0.04,)), ("mlp", 200, (0.7, 2.0), ()),
            ("resmlp", 0, (0.15, 0.3), (0.02,)), ("resmlp", 50, (0.4, 0.8), (0.04,)), ("resmlp", 200, (0.7,), ()),
            ("transformer", 50, (1.5,), (0.2,)), ("transformer", 200, (3.0,), ()),
            ("mlp10", 0, (0.1, 0.2), (0.02,)), ("mlp10", 100, (0.3, 1.0), ()),
            ("resmlp12", 0, (0.1,), (0.02,)), ("resmlp12", 100, (0.3, 1.0), ()),
            ("cnn", 100, (0.5, 1.0), (0.05,)),
            ("gpt", 100, (1.0, 3.0), (0.1,))]
TUNED_SEEDS = (0, 1, 2, 3)
HELD_OUT_SEEDS = (10, 11, 12)


def divergence(split: str, seeds: tuple[int, ...] | None = None, steps: int = 300) -> list[Case]:
    table, default = (TUNED, TUNED_SEEDS) if split == "tuned" else (HELD_OUT, HELD_OUT_SEEDS)
    out = []
    for kind, warmup, high, low in table:
        for intent, lrs in (("high", high), ("low", low)):
            for lr in lrs:
                for seed in seeds or default:
                    out.append(Case(FAMILY[kind], intent, split, RunSpec(kind, lr, seed, steps, warmup=warmup)))
    return out


def faults(seeds: tuple[int, ...] = (0, 1, 2), steps: int = 300) -> list[Case]:
    """float16 overflow, a corrupted batch, attention-logit growth (held out from tuning)."""
    out = []
    for seed in seeds:
        # float16 autocast, no loss scaling: rates that run in float32 for a while before diverging
        for kind, lr, warmup in (("mlp", 0.3, 100), ("resmlp", 0.3, 100), ("mlp", 0.03, 0), ("transformer", 1.0, 100)):
            out.append(Case("fp16", "low" if lr < 0.1 else "high", "held-out",
                            RunSpec(kind, lr, seed, steps, warmup=warmup, precision="float16")))
        # one corrupted batch at step 150 of a healthy run: a transient spike, not a divergence; the monitor
        # skips its optimizer step (skip=)
        for kind, lr in (("mlp", 0.03), ("resmlp", 0.03), ("transformer", 0.1)):
            out.append(Case("corrupted-batch", "low", "held-out",
                            RunSpec(kind, lr, seed, steps, corrupt_step=150, skip=True)))
        # attention-logit growth: AdamW at high rates (Wortsman et al. 2023), qk-layernorm as the control;
        # sampled every 10 steps (the truth is each step's largest logit)
        for kind in ("gpt", "gpt-qknorm"):
            for lr in (0.01, 0.1):
                out.append(Case("attention", "high", "held-out", RunSpec(kind, lr, seed, 200, optimizer="adamw"),
                                every=10))
        # output-logit divergence: AdamW at rates where the log-partition drifts, z-loss (PaLM's 1e-4) beside
        for lr in (0.3, 1.0):
            for z in (0.0, 1e-4):
                out.append(Case("output-logits", "high", "held-out",
                                RunSpec("gpt-qknorm", lr, seed, 200, optimizer="adamw", z_loss=z), every=10))
    return out
