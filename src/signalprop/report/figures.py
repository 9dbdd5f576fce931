"""PNG figures (matplotlib, imported lazily: the only place that uses it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """A figure and its axes drawn without pyplot: a ``matplotlib.figure.Figure``
    renders to PNG by itself, so the caller's backend and open figures are
    never touched.  ``figsize`` and ``layout`` go to the figure, the rest to
    ``subplots``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None), layout=kwargs.pop("layout", "constrained"))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def plot_activations(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Left: each activation; right: its autograd gradient (log scale)."""
    fig, (a, b) = new_figure(1, 2, figsize=(10, 3.6))
    for name, (x, yg) in curves.items():
        a.plot(x, yg[0], label=name)
        b.plot(x, np.maximum(yg[1], 1e-12), label=name)
    a.set(title="activation", xlabel="x")
    b.set(title="gradient (autograd)", xlabel="x", yscale="log", ylim=(1e-4, 2))
    b.axhline(0.25, ls=":", c="gray")
    a.legend()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_lognorms(lognorms: Mapping[str, list[float]], path: Path) -> Path:
    fig, ax = new_figure(figsize=(6, 3.8))
    for name, logs in lognorms.items():
        ax.plot(logs, label=name)
    ax.set(xlabel="number of factors", ylabel="log10 ||product||_F",
           title="products of random 4x4 matrices")
    ax.axhline(0, c="gray", lw=0.5)
    ax.legend()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_phase_diagram(pd: Any, path: Path, point: tuple[float, float] | None = None) -> Path:
    """Heat map of xi_c over (sigma_w2, sigma_b2) with the critical line chi1 = 1;
    ``point`` (sigma_w2, sigma_b2) marked when given (the one asked about)."""
    from matplotlib.colors import LogNorm

    fig, ax = new_figure(figsize=(6, 4.2))
    xi = np.clip(np.nan_to_num(pd.xi_c, nan=np.nan, posinf=1e4), 0.1, 1e4)
    mesh = ax.pcolormesh(pd.sigma_w2, pd.sigma_b2, xi, shading="auto", cmap="viridis",
                         norm=LogNorm(vmin=max(np.nanmin(xi), 0.1), vmax=min(np.nanmax(xi), 1e3)))
    fig.colorbar(mesh, ax=ax, label=r"correlation depth scale $\xi_c$ (layers)")
    ok = np.isfinite(pd.critical_sigma_w2)
    ax.plot(pd.critical_sigma_w2[ok], pd.sigma_b2[ok], "w--", lw=2, label=r"critical line $\chi_1 = 1$")
    if point is not None:
        ax.plot([point[0]], [point[1]], marker="*", ms=14, c="red", mec="white", ls="none",
                label=rf"asked: $\sigma_w^2$={point[0]:.3g}, $\sigma_b^2$={point[1]:.3g}")
    ax.set(xlabel=r"weight variance $\sigma_w^2$ (× fan-in)", ylabel=r"bias variance $\sigma_b^2$",
           title=f"order to chaos: {pd.activation}")
    if not np.isfinite(pd.xi_c).all():
        ax.text(0.5, -0.2, "blank cells: no finite fixed point (the signal diverges)", transform=ax.transAxes,
                ha="center", fontsize=7)
    ax.text(0.03, 0.92, "ordered", transform=ax.transAxes, color="w")
    ax.text(0.80, 0.92, "chaotic", transform=ax.transAxes, color="w")
    ax.legend(loc="lower right", fontsize=8)
    # a name without a suffix is written as PNG under that very name (matplotlib would append ".png")
    fig.savefig(path, dpi=110, format=Path(path).suffix[1:] or "png")
    return Path(path)


def plot_depth_sweep(cells: list[dict[str, Any]], path: Path, chance: float) -> Path:
    """Heat maps of test accuracy and log10 gradient ratio (rows act/init,
    columns depth), and the loss curves at the largest depth per activation."""
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
    fig, axes = new_figure(1, 2 + len(acts), figsize=(6 + 4.2 * (1 + len(acts)), 0.35 * len(rows) + 2.5))
    labels = [f"{a} / {i}" for a, i in rows]
    for ax, m, title, cmap, lim in ((axes[0], acc, "test accuracy", "viridis", (chance, 1.0)),
                                    (axes[1], ratio, "log10 grad ratio first/last at init", "coolwarm", (-6, 6))):
        im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=lim[0], vmax=lim[1])
        ax.set(xticks=range(len(depths)), xticklabels=depths, yticks=range(len(rows)), yticklabels=labels,
               xlabel="depth", title=title)
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):  # dark text on light cells, white on dark ones
                shade = im.cmap(im.norm(v))
                light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.5
                ax.text(j, i, f"{v:.2f}" if m is acc else f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if light else "white")
        fig.colorbar(im, ax=ax, fraction=0.04)
        if not np.isfinite(m).all():
            ax.set_xlabel("depth (blank: not run, or no finite ratio)")
    for ax, act in zip(axes[2:], acts):
        deepest = max(c["depth"] for c in cells if c["act"] == act)
        for c in cells:
            if c["act"] == act and c["depth"] == deepest and c.get("losses"):
                ax.plot(np.arange(len(c["losses"])), c["losses"], label=c["init"])
        ax.set(title=f"{act}, depth {deepest}: training loss", xlabel="logged step (x25)", yscale="log")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return Path(path)
