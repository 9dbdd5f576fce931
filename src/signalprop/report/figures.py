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


def plot_depth_sweep(cells: list[dict[str, Any]], path: Path, chance: float) -> Path:
    """Heat maps of test accuracy and log10 gradient ratio (rows act/init,
    columns depth), and the loss curves at the largest depth per activation."""
    plt = _plt()
    rows = sorted({(c["act"], c["init"]) for c in cells})
    depths = sorted({c["depth"] for c in cells})
    acc = np.full((len(rows), len(depths)), np.nan)
    ratio = np.full_like(acc, np.nan)
    for c in cells:
        i, j = rows.index((c["act"], c["init"])), depths.index(c["depth"])
        acc[i, j] = c["test_acc"]
        r = c.get("grad_ratio")
        r = float(r) if r is not None else np.nan  # cached cells keep "inf" as a string
        ratio[i, j] = np.log10(r) if np.isfinite(r) and r > 0 else np.nan
    acts = sorted({a for a, _ in rows})
    fig, axes = plt.subplots(1, 2 + len(acts), figsize=(6 + 4.2 * (1 + len(acts)), 0.35 * len(rows) + 2.5))
    labels = [f"{a} / {i}" for a, i in rows]
    for ax, m, title, cmap, lim in ((axes[0], acc, "test accuracy", "viridis", (chance, 1.0)),
                                    (axes[1], ratio, "log10 grad ratio first/last at init", "coolwarm", (-6, 6))):
        im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=lim[0], vmax=lim[1])
        ax.set(xticks=range(len(depths)), xticklabels=depths, yticks=range(len(rows)), yticklabels=labels,
               xlabel="depth", title=title)
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}" if m is acc else f"{v:.1f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.04)
    for ax, act in zip(axes[2:], acts):
        deepest = max(c["depth"] for c in cells if c["act"] == act)
        for c in cells:
            if c["act"] == act and c["depth"] == deepest and c.get("losses"):
                ax.plot(np.arange(len(c["losses"])), c["losses"], label=c["init"])
        ax.set(title=f"{act}, depth {deepest}: training loss", xlabel="logged step (x25)", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
