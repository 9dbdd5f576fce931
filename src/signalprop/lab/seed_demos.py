"""The two demonstrations of Dive into Deep Learning's chapter on numerical
stability and initialization, reproduced and taken one step further."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import special

from ..init.orthogonal import orthogonal_
from .registry import Experiment, register


@dataclass(frozen=True)
class SigmoidConfig:
    start: float = -8.0  # the chapter's x = torch.arange(-8.0, 8.0, 0.1)
    stop: float = 8.0
    step: float = 0.1
    small_grad: float = 1e-2  # a gradient below this counts as "nearly vanished"


def run_sigmoid(cfg: SigmoidConfig, out: Path, progress: Any = None) -> dict[str, Any]:
    """sigma(x) and its autograd gradient, as in the chapter, beside tanh and ReLU."""
    rows: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, fn in (("sigmoid", torch.sigmoid), ("tanh", torch.tanh), ("relu", torch.relu)):
        x = torch.arange(cfg.start, cfg.stop, cfg.step, requires_grad=True)
        y = fn(x)
        # y is not a scalar: backward needs an explicit all-ones cotangent (the chapter's call).
        y.backward(gradient=torch.ones_like(x))
        assert x.grad is not None
        g, xd = x.grad.detach(), x.detach()
        i = int(torch.argmax(g))
        rows[name] = {
            "max_grad": float(g[i]), "argmax_x": float(xd[i]),
            "grad_at_start": float(g[0]), "grad_at_end": float(g[-1]),
            "x_start": float(xd[0]), "x_end": float(xd[-1]),
            "fraction_below_small_grad": float((g < cfg.small_grad).float().mean()),
        }
        curves[name] = (xd.numpy(), np.stack([y.detach().numpy(), g.numpy()]))
    # Through L sigmoid layers the gradient picks up a factor <= 1/4 per layer.
    rows["sigmoid"]["best_case_grad_after_10_layers"] = 0.25**10
    from ..report.figures import plot_activations

    plot_activations(curves, out / "sigmoid.png")
    sg = rows["sigmoid"]
    headline = [f"sigmoid'(x) peaks at {sg['max_grad']:.4g} (x = {round(sg['argmax_x'], 6):g}); at x = {sg['x_start']:.3g} it "
                f"is {sg['grad_at_start']:.2e}; {sg['fraction_below_small_grad']:.0%} of [{cfg.start:g}, {cfg.stop:g}) "
                f"has a gradient below {cfg.small_grad:g}",
                f"through 10 sigmoid layers the gradient keeps at best 0.25^10 = {0.25 ** 10:.2e}",
                f"tanh'(x) peaks at {rows['tanh']['max_grad']:.4g}; relu'(x) is 1 for every x > 0"]
    return {"activations": rows, "figure": "sigmoid.png", "headline": headline}


@dataclass(frozen=True)
class ExplodeConfig:
    n: int = 4  # the chapter's 4 x 4 matrices
    factors: int = 100
    seed: int = 0


def _lyapunov(n: int, var: float) -> float:
    """Top Lyapunov exponent of products of n x n i.i.d. N(0, var) matrices:
    0.5 * (ln(2 var) + digamma(n / 2)) (Newman 1986); per factor, natural log."""
    return 0.5 * (math.log(2.0 * var) + float(special.digamma(n / 2.0)))


def run_explode(cfg: ExplodeConfig, out: Path, progress: Any = None) -> dict[str, Any]:
    """Product of 100 random 4x4 matrices: N(0,1), Xavier-scaled and orthogonal factors."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n
    xavier_var = 2.0 / (n + n)  # Xavier for a square n x n layer: variance 1/n

    def gaussian(std: float) -> torch.Tensor:
        return torch.normal(0.0, std, (n, n), generator=g, dtype=torch.float64)

    def ortho() -> torch.Tensor:
        return orthogonal_(torch.empty(n, n, dtype=torch.float64), generator=g)

    makers = {"normal(0,1)": lambda: gaussian(1.0), "xavier": lambda: gaussian(math.sqrt(xavier_var)),
              "orthogonal": ortho}
    results: dict[str, Any] = {}
    lognorms: dict[str, list[float]] = {}
    for name, make in makers.items():
        m = make()
        logs = [math.log10(float(torch.linalg.matrix_norm(m)))]
        for _ in range(cfg.factors):
            m = m @ make()
            logs.append(math.log10(float(torch.linalg.matrix_norm(m))))
        slope = float(np.polyfit(np.arange(len(logs)), logs, 1)[0])  # log10 growth per factor
        results[name] = {"max_abs_entry": float(m.abs().max()), "final_log10_norm": logs[-1],
                         "log10_growth_per_factor": slope}
        lognorms[name] = logs
    results["normal(0,1)"]["theory_log10_growth_per_factor"] = _lyapunov(n, 1.0) / math.log(10)
    results["xavier"]["theory_log10_growth_per_factor"] = _lyapunov(n, xavier_var) / math.log(10)
    results["orthogonal"]["theory_log10_growth_per_factor"] = 0.0
    from ..report.figures import plot_lognorms

    plot_lognorms(lognorms, out / "explode.png")
    headline = [f"{name}: after {cfg.factors} factors the product's norm is 1e{r['final_log10_norm']:.1f} "
                f"({r['log10_growth_per_factor']:+.3f} decades per factor; theory "
                f"{r['theory_log10_growth_per_factor']:+.3f})" for name, r in results.items()]
    return {"products": results, "log10_norms": lognorms, "figure": "explode.png", "headline": headline,
            "reading": "Gaussian factors explode, Xavier-scaled ones still drift "
                       "(E[log] < log E: variance matching fixes the mean square, not the "
                       "typical growth), orthogonal ones keep the norm exactly."}


register(Experiment("sigmoid", "sigmoid, tanh and ReLU with their autograd gradients on [-8, 8) "
                    "(Dive into Deep Learning's vanishing-gradient figure)", SigmoidConfig, run_sigmoid))
register(Experiment("explode", "product of 100 random 4x4 matrices: N(0,1) vs Xavier vs orthogonal "
                    "(Dive into Deep Learning's exploding-gradient demo)", ExplodeConfig, run_explode))
