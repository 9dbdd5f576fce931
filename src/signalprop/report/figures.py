"""PNG figures (matplotlib, imported lazily: the only place that uses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_activations(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Left: each activation; right: its autograd gradient (log scale)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, (x, yg) in curves.items():
        a.plot(x, yg[0], label=name)
        b.plot(x, np.maximum(yg[1], 1e-12), label=name)
    a.set(title="activation", xlabel="x")
    b.set(title="gradient (autograd)", xlabel="x", yscale="log", ylim=(1e-4, 2))
    b.axhline(0.25, ls=":", c="gray")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_lognorms(lognorms: Mapping[str, list[float]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, logs in lognorms.items():
        ax.plot(logs, label=name)
    ax.set(xlabel="number of factors", ylabel="log10 ||product||_F",
           title="products of random 4x4 matrices")
    ax.axhline(0, c="gray", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_phase_diagram(pd: Any, path: Path) -> Path:
    """Heat map of xi_c over (sigma_w2, sigma_b2) with the critical line chi1 = 1."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(6, 4.2))
    xi = np.clip(np.nan_to_num(pd.xi_c, nan=np.nan, posinf=1e4), 0.1, 1e4)
    mesh = ax.pcolormesh(pd.sigma_w2, pd.sigma_b2, xi, shading="auto", cmap="viridis",
                         norm=LogNorm(vmin=max(np.nanmin(xi), 0.1), vmax=min(np.nanmax(xi), 1e3)))
    fig.colorbar(mesh, ax=ax, label="correlation depth scale xi_c")
    ok = np.isfinite(pd.critical_sigma_w2)
    ax.plot(pd.critical_sigma_w2[ok], pd.sigma_b2[ok], "w--", lw=2, label="critical line chi1 = 1")
    ax.set(xlabel="sigma_w^2", ylabel="sigma_b^2", title=f"order to chaos: {pd.activation}")
    ax.text(0.03, 0.92, "ordered", transform=ax.transAxes, color="w")
    ax.text(0.80, 0.92, "chaotic", transform=ax.transAxes, color="w")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
