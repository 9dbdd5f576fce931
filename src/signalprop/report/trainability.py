"""Schoenholz et al. (2017)'s picture: test accuracy over (sigma_w^2, depth) with the theory line 6 xi_c."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .figures import new_figure


def plot_trainable_depth(cfg: Any, rows: list[dict[str, Any]], critical: float, path: Path) -> Path:
    """Accuracy per cell as coloured squares on log-depth axes, 6 xi_c as a curve
    (:func:`signalprop.theory.depth_scales` on a fine sigma_w^2 grid), the
    critical sigma_w^2 dashed."""
    from ..theory import depth_scales

    fig, ax = new_figure(figsize=(7, 4.6))
    w = np.array([r["sigma_w2"] for r in rows], dtype=float)
    d = np.array([r["depth"] for r in rows], dtype=float)
    acc = np.array([r["test_acc"] for r in rows], dtype=float)
    sc = ax.scatter(w, d, c=acc, s=160, marker="s", cmap="viridis", vmin=0.0, vmax=1.0, edgecolors="none")
    fig.colorbar(sc, ax=ax, label="test accuracy")
    lo, hi = min(cfg.sigma_w2s), max(cfg.sigma_w2s)
    fine = np.linspace(lo, hi, 200)
    xi = np.array([depth_scales(cfg.act, float(s), cfg.sigma_b2)[1] for s in fine], dtype=float)
    ax.plot(fine, np.clip(6 * xi, 1, 1e6), "w-", lw=3)
    ax.plot(fine, np.clip(6 * xi, 1, 1e6), "k--", lw=1.5, label=r"$6\,\xi_c$ (mean-field theory)")
    ax.axvline(critical, color="gray", ls=":", label=rf"critical $\sigma_w^2$ = {critical:.2f}")
    ax.set(yscale="log", ylim=(min(cfg.depths) / 1.5, max(cfg.depths) * 1.5), xlabel=r"$\sigma_w^2$",
           ylabel="depth (layers)",
           title=rf"{cfg.act}, $\sigma_b^2$ = {cfg.sigma_b2:g}, width {cfg.width}, {cfg.steps} SGD steps on digits")
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=100)
    return Path(path)
