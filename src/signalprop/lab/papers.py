"""Classic results on initialization, rerun at laptop scale on shipped data.

Each experiment states what the paper reported (figure facts, as the paper
describes them) beside what this run measured, and saves a PNG and the numbers.

* ``glorot2010`` -- Glorot & Bengio (2010): per-layer activations and
  back-propagated gradients of tanh and softsign nets, "standard" init
  U[-1/sqrt(n_in), 1/sqrt(n_in)] vs their "normalized" init
  U[-sqrt(6/(n_in+n_out)), +...] (their figures 6-7).  Here the normalized
  init makes the gradients far flatter across layers than the standard one,
  but not level (softsign less flat than tanh): the reading says by how much.
* ``he2015`` -- He et al. (2015): a 30-layer plain ReLU net; Xavier's init
  stalls, theirs trains (their figure 3).
* ``saxe2014`` -- Saxe, McClelland & Ganguli (2014): deep *linear* nets; with
  orthogonal init the learning time stops growing with depth (here, with the
  step scaled as lr / depth: flat from depth 8 on, 2.4x longer at 8 than at
  2), with scaled Gaussian init it keeps growing.
* ``pennington2017`` -- Pennington, Schoenholz & Ganguli (2017): the squared
  singular values of the input-output Jacobian at criticality, orthogonal vs
  Gaussian weights, tanh vs ReLU, measured beside the free-probability
  density (:func:`signalprop.theory.jacobian_density`) and moments
  (:func:`signalprop.theory.jacobian_spectrum`).
* ``xiao2018`` -- Xiao et al. (2018): a 1,000-layer plain tanh CNN with
  delta-orthogonal kernels on the critical line trains; with Kaiming's
  variance it does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .registry import Experiment, register


def _fig(path: Path, fig: Any) -> str:
    fig.savefig(path, dpi=100)
    return path.name


def _trained(model: nn.Module, data: Any, init: str, *, steps: int, lr: float, momentum: float, batch: int,
             seed: int, progress: Any = None, optimizer: str = "sgd") -> dict[str, Any]:
    """check's verdict at initialization, then a seeded training run: the numbers a training experiment keeps."""
    from .. import check
    from .train import train

    report = check(model, data.x_train[:64])
    r = train(model, data, steps=steps, lr=lr, momentum=momentum, batch=batch, seed=seed, log_every=10,
              progress=progress, optimizer=optimizer)
    return {"init": init, "verdict_at_init": report.verdict,
            "grad_ratio_at_init": report.summary.first_last_grad_ratio, "losses": r.losses,
            "final_loss": r.losses[-1] if r.losses else None, "test_acc": r.test_acc, "diverged": r.diverged}


def _training_results(runs: dict[str, dict[str, Any]], paper: str, title: str, path: Path) -> dict[str, Any]:
    """Loss curves beside chance, and one headline line per run."""
    from ..report.figures import new_figure

    fig, ax = new_figure(figsize=(6.5, 4))
    for init, r in runs.items():
        ax.plot(np.arange(len(r["losses"])) * 10, r["losses"], label=f"{init} (test {r['test_acc']:.0%})")
    ax.axhline(math.log(10), c="gray", ls=":", label="chance: ln 10")
    ax.set(title=title, xlabel="step", ylabel="training loss")
    ax.legend()
    figure = _fig(path, fig)
    headline = [paper] + [f"{k}: final training loss {r['final_loss']:.3f} (chance {math.log(10):.3f}), test "
                          f"accuracy {r['test_acc']:.1%}, gradient ratio first/last at init "
                          f"{r['grad_ratio_at_init']:.2g}, verdict {r['verdict_at_init']}" for k, r in runs.items()]
    return {"paper": paper, "runs": runs, "headline": headline, "figure": figure}


# ---- Glorot & Bengio 2010 ----------------------------------------------------

@dataclass(frozen=True)
class GlorotConfig:
    hidden: int = 5  # their networks: five hidden layers
    width: int = 512  # theirs: 1,000 units
    batch: int = 512
    acts: tuple[str, ...] = ("tanh", "softsign")
    seed: int = 0


def _glorot_net(cfg: GlorotConfig, act: str, init: str, n_in: int, g: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    widths = [n_in] + [cfg.width] * cfg.hidden
    for i in range(cfg.hidden):
        lin = nn.Linear(widths[i], widths[i + 1])
        fan_in, fan_out = widths[i], widths[i + 1]
        a = 1 / math.sqrt(fan_in) if init == "standard" else math.sqrt(6 / (fan_in + fan_out))
        with torch.no_grad():
            lin.weight.uniform_(-a, a, generator=g)
            lin.bias.zero_()
        layers += [lin, nn.Tanh() if act == "tanh" else nn.Softsign()]
    out = nn.Linear(cfg.width, 10)
    with torch.no_grad():
        a = math.sqrt(6 / (cfg.width + 10))
        out.weight.uniform_(-a, a, generator=g)
        out.bias.zero_()
    return nn.Sequential(*layers, out)


def glorot_layer_stats(cfg: GlorotConfig, act: str, init: str) -> dict[str, Any]:
    """Per hidden layer: std of the activations and of the back-propagated
    gradient of the cross-entropy with respect to each layer's pre-activation."""
    from .datasets import digits

    data = digits(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    net = _glorot_net(cfg, act, init, data.n_features, g)
    x, y = data.x_train[:cfg.batch], data.y_train[:cfg.batch]
    pre: list[torch.Tensor] = []
    h = x
    for m in net:
        h = m(h)
        if isinstance(m, nn.Linear) and len(pre) < cfg.hidden:
            h.retain_grad()
            pre.append(h)
    nn.functional.cross_entropy(h, y).backward()
    acts = [float(net[2 * i + 1](p).detach().std()) for i, p in enumerate(pre)]
    grads = [float(p.grad.std()) for p in pre]  # type: ignore[union-attr]
    return {"activation_std": acts, "backprop_grad_std": grads,
            "grad_ratio_first_last": grads[0] / grads[-1]}


def run_glorot(cfg: GlorotConfig, out: Path, progress: Any = None) -> dict[str, Any]:
    from ..report.figures import new_figure

    res: dict[str, Any] = {}
    fig, axes = new_figure(2, len(cfg.acts), figsize=(5 * len(cfg.acts), 6.5), squeeze=False)
    for j, act in enumerate(cfg.acts):
        for init in ("standard", "normalized"):
            s = glorot_layer_stats(cfg, act, init)
            res[f"{act}/{init}"] = s
            layers = np.arange(1, cfg.hidden + 1)
            axes[0][j].plot(layers, s["activation_std"], "o-", label=init)
            axes[1][j].semilogy(layers, s["backprop_grad_std"], "o-", label=init)
        axes[0][j].set(title=f"{act}: activation std per layer", xlabel="hidden layer")
        axes[1][j].set(title=f"{act}: back-propagated gradient std", xlabel="hidden layer")
        axes[0][j].legend()
        axes[1][j].legend()
    figure = _fig(out / "glorot2010.png", fig)
    paper = ("Glorot & Bengio (2010), figures 6-7: with the standard initialization the back-propagated "
             "gradients shrink from the top layer toward the input; with the normalized initialization their "
             "variance is about the same at every layer")
    drop = {act: {init: 1.0 / res[f"{act}/{init}"]["grad_ratio_first_last"] for init in ("standard", "normalized")}
            for act in cfg.acts}
    reading = [_glorot_reading(act, drop[act], res[f"{act}/normalized"]["activation_std"],
                               res[f"{act}/standard"]["activation_std"]) for act in cfg.acts]
    headline = [paper] + [
        f"{k}: gradient std first/last hidden layer = {v['grad_ratio_first_last']:.3f}" for k, v in res.items()]
    return {"paper": paper, "runs": res, "gradient_drop": drop, "reading": reading,
            "headline": headline + ["this run: " + line for line in reading], "figure": figure}


GLOROT_LEVEL = 1.25  # "about level": the first hidden layer's gradient std within 25% of the last's
GLOROT_MUCH = 3.0  # "much flatter": a drop at least 3x smaller than the standard init's


def _glorot_reading(act: str, drop: dict[str, float], act_norm: list[float], act_std: list[float]) -> str:
    """What the run shows, in words no stronger than its numbers."""
    d_std, d_norm = drop["standard"], drop["normalized"]
    if d_norm <= GLOROT_LEVEL:
        shape = "about level"
    elif d_std >= GLOROT_MUCH * d_norm:
        shape = "much flatter than with the standard init, not level"
    elif d_std > d_norm:
        shape = "flatter than with the standard init, not level"
    else:
        shape = "not flatter than with the standard init"
    return (f"{act}: from the last hidden layer down to the first the gradient std shrinks {d_std:.1f}x with the "
            f"standard init and {d_norm:.1f}x with the normalized one: {shape}; activation std over the "
            f"{len(act_norm)} hidden layers {act_norm[0]:.3f} -> {act_norm[-1]:.3f} (normalized), "
            f"{act_std[0]:.3f} -> {act_std[-1]:.3f} (standard)")


register(Experiment("glorot2010", "Glorot & Bengio 2010: per-layer activations and back-propagated gradients, "
                    "standard vs normalized init, tanh and softsign (figures 6-7)", GlorotConfig, run_glorot,
                    quick={"width": 256, "batch": 256}))


# ---- He et al. 2015 -------------------------------------------------------------

@dataclass(frozen=True)
class HeConfig:
    depth: int = 30  # their figure 3: a 30-layer plain network
    width: int = 64
    steps: int = 600
    lr: float = 0.003
    momentum: float = 0.9
    seed: int = 0


def he_run(cfg: HeConfig, init: str) -> dict[str, Any]:
    from .. import init as spi
    from .datasets import digits
    from .models import DeepMLP

    data = digits(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = DeepMLP(cfg.depth, cfg.width, "relu", data.n_features, data.n_classes)
    spi.apply_(model, init, generator=torch.Generator().manual_seed(cfg.seed))  # Xavier gain 1, Kaiming sqrt(2)
    return _trained(model, data, init, steps=cfg.steps, lr=cfg.lr, momentum=cfg.momentum, batch=128, seed=cfg.seed)


def run_he(cfg: HeConfig, out: Path, progress: Any = None) -> dict[str, Any]:
    runs = {init: he_run(cfg, init) for init in ("xavier_normal", "kaiming_normal")}
    paper = ("He et al. (2015), figure 3: a 30-layer plain ReLU network with Xavier's initialization "
             "'completely stalls'; with theirs (variance 2/fan_in) it converges")
    return _training_results(runs, paper, f"{cfg.depth}-layer plain ReLU MLP on digits", out / "he2015.png")


register(Experiment("he2015", "He et al. 2015: a 30-layer plain ReLU MLP, Xavier stalls and Kaiming trains "
                    "(figure 3)", HeConfig, run_he, quick={"steps": 200}))


# ---- Saxe et al. 2014 -------------------------------------------------------------

@dataclass(frozen=True)
class SaxeConfig:
    depths: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    width: int = 16
    samples: int = 512
    lr: float = 0.05  # per layer: the step is lr / depth (the end-to-end map moves ~ depth x a layer's step)
    threshold: float = 0.05  # learning time: steps until the loss falls below this share of its start
    max_steps: int = 4000
    seed: int = 0


def saxe_learning_time(cfg: SaxeConfig, depth: int, init: str) -> int | None:
    """Full-batch gradient steps until a deep linear net y = W_L ... W_1 x
    (width ``width``, no biases) fits a fixed random linear map to
    ``threshold`` of its initial loss; None if not within ``max_steps``."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.width
    target = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0] * \
        torch.linspace(0.5, 2.0, n, dtype=torch.float64)  # singular values spread over [0.5, 2]
    x = torch.randn(cfg.samples, n, generator=g, dtype=torch.float64)
    y = x @ target.T
    ws = []
    for _ in range(depth):
        w = torch.empty(n, n, dtype=torch.float64)
        if init == "orthogonal":
            from ..init import orthogonal_

            orthogonal_(w, generator=g)
        else:  # scaled Gaussian: variance 1/n, isometric on average only
            w.normal_(0.0, 1.0 / math.sqrt(n), generator=g)
        ws.append(w.requires_grad_(True))
    lr = cfg.lr / depth

    def loss() -> torch.Tensor:
        h = x
        for w in ws:
            h = h @ w.T
        return ((h - y) ** 2).mean()

    start = float(loss().detach())
    for step in range(cfg.max_steps):
        val = loss()
        if float(val.detach()) <= cfg.threshold * start:
            return step
        if not math.isfinite(float(val.detach())):
            return None
        grads = torch.autograd.grad(val, ws)
        with torch.no_grad():
            for w, gr in zip(ws, grads):
                w -= lr * gr
    return None


def run_saxe(cfg: SaxeConfig, out: Path, progress: Any = None) -> dict[str, Any]:
    from ..report.figures import new_figure

    times: dict[str, list[int | None]] = {}
    for init in ("orthogonal", "gaussian"):
        times[init] = [saxe_learning_time(cfg, d, init) for d in cfg.depths]
    fig, ax = new_figure(figsize=(6.5, 4))
    for init, ts in times.items():
        ax.plot(cfg.depths, [t if t is not None else np.nan for t in ts], "o-", label=init)
    ax.set(xscale="log", yscale="log", xlabel="depth", ylabel=f"steps to {cfg.threshold:.0%} of the initial loss",
           title="deep linear networks: learning time vs depth")
    ax.legend()
    figure = _fig(out / "saxe2014.png", fig)
    paper = ("Saxe et al. (2014): with random orthogonal initialization the learning time of deep linear "
             "networks is independent of depth; with scaled random Gaussian initialization it grows with depth")
    flat = _flat_from(cfg.depths, times["orthogonal"])
    reading = [_saxe_reading(cfg, times, flat)]
    headline = [paper] + [f"{init}: steps by depth {dict(zip(cfg.depths, ts))}" for init, ts in times.items()]
    return {"paper": paper, "depths": list(cfg.depths), "learning_time": times, "step": f"{cfg.lr} / depth",
            "flat_from_depth": flat, "reading": reading,
            "headline": headline + ["this run: " + line for line in reading], "figure": figure}


SAXE_FLAT = 1.2  # "flat": the longest and shortest learning times of the range within 20% of each other


def _flat_from(depths: tuple[int, ...], times: list[int | None]) -> int | None:
    """The smallest depth from which every learning time to the deepest is
    within SAXE_FLAT of each other (None if only the deepest is)."""
    start = None
    for i in range(len(depths) - 2, -1, -1):
        ts = [t for t in times[i:] if t is not None]
        if len(ts) < len(depths) - i or max(ts) > SAXE_FLAT * min(ts):
            break
        start = depths[i]
    return start


def _saxe_reading(cfg: SaxeConfig, times: dict[str, list[int | None]], flat: int | None) -> str:
    ortho = times["orthogonal"]
    first = f"{ortho[0]} steps at depth {cfg.depths[0]}" if ortho[0] is not None else \
        f"not within {cfg.max_steps} steps at depth {cfg.depths[0]}"
    if flat is None:
        shape = "no range of depths over which it is flat"
    else:
        i = cfg.depths.index(flat)
        ts = [t for t in ortho[i:] if t is not None]
        rise = f"; at depth {flat} {ts[0] / ortho[0]:.1f}x depth {cfg.depths[0]}'s" if i > 0 and ortho[0] else ""
        shape = (f"flat from depth {flat} to {cfg.depths[-1]}: {min(ts)}-{max(ts)} steps "
                 f"(longest/shortest {max(ts) / min(ts):.2f}){rise}")
    slow = [d for d, t in zip(cfg.depths, times["gaussian"]) if t is None]
    gauss = ", ".join(f"{t} steps at depth {d}" for d, t in zip(cfg.depths, times["gaussian"]) if t is not None)
    gauss += f"{'; ' if gauss else ''}not within {cfg.max_steps} steps from depth {slow[0]}" if slow else ""
    return (f"with the step scaled as lr / depth (lr = {cfg.lr}), orthogonal init takes {first}; {shape}. "
            f"Scaled Gaussian: {gauss}")


register(Experiment("saxe2014", "Saxe et al. 2014: deep linear nets, learning time vs depth for orthogonal "
                    "vs scaled Gaussian init", SaxeConfig, run_saxe, quick={"depths": (2, 8, 32)}))


# ---- Pennington et al. 2017 ------------------------------------------------------

@dataclass(frozen=True)
class PenningtonConfig:
    depths: tuple[int, ...] = (2, 8, 32)
    width: int = 800
    acts: tuple[str, ...] = ("tanh", "relu")
    q_star: float = 0.025  # tanh's pre-activation second moment: small q* -> phi' nearly constant
    seed: int = 0
    # networks pooled per (activation, weights, depth), seeds seed .. seed + seeds - 1: one network's
    # spectrum misses the heavy tail of deep Gaussian products (tanh-Gaussian at depth 32: variance 11
    # against free probability's 32 for one width-300 network), and its variance swings with the seed
    seeds: int = 16


def _critical_weights(act: str, q_star: float) -> tuple[float, float]:
    from .. import theory

    if act == "relu":
        return 2.0, 0.0  # the critical point of ReLU (every q is a fixed point)
    c = theory.critical_point(act, q_star=q_star, center=False)
    return c.sigma_w2, c.sigma_b2


def jacobian_sq_singular_values(cfg: PenningtonConfig, act: str, weights: str, depth: int) -> dict[str, Any]:
    """Measured squared singular values of d out / d in for one input at the
    fixed point, pooled over ``cfg.seeds`` networks, and the free-probability
    mean and variance.  ``measured_variance`` is the pooled sample's (the
    spectral distribution's variance, which free probability predicts);
    ``variance_per_network`` each network's own."""
    from .. import theory

    sw2, sb2 = _critical_weights(act, cfg.q_star)
    spec = theory.jacobian_spectrum(act, sw2, sb2, depth, weights)  # type: ignore[arg-type]
    nets = [_network_sv2(cfg, act, weights, depth, sw2, sb2, spec.q, cfg.seed + k) for k in range(cfg.seeds)]
    sv2 = torch.cat(nets)
    return {"measured_mean": float(sv2.mean()), "measured_variance": float(sv2.var(unbiased=False)),
            "variance_per_network": [float(v.var(unbiased=False)) for v in nets], "networks": len(nets),
            "theory_mean": spec.mean, "theory_variance": spec.variance, "sigma_w2": sw2, "sigma_b2": sb2,
            "values": sv2.tolist()}


def _network_sv2(cfg: PenningtonConfig, act: str, weights: str, depth: int, sw2: float, sb2: float, q: float,
                 seed: int) -> torch.Tensor:
    """Squared singular values of one network's input-output Jacobian (its own seed)."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.width
    phi = torch.tanh if act == "tanh" else torch.relu
    h = torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(q)  # an input already at q*
    jac = torch.eye(n, dtype=torch.float64)
    for _ in range(depth):
        w = torch.empty(n, n, dtype=torch.float64)
        if weights == "orthogonal":
            from ..init import orthogonal_

            orthogonal_(w, gain=math.sqrt(sw2), generator=g)
        else:
            w.normal_(0.0, math.sqrt(sw2 / n), generator=g)
        b = torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(sb2)
        x = phi(h)
        d = (1 - x * x) if act == "tanh" else (h > 0).to(torch.float64)
        jac = w @ (d[:, None] * jac)
        h = w @ x + b
    return torch.linalg.svdvals(jac) ** 2


def run_pennington(cfg: PenningtonConfig, out: Path, progress: Any = None) -> dict[str, Any]:
    from .. import theory
    from ..report.figures import new_figure

    runs: dict[str, Any] = {}
    fig, axes = new_figure(len(cfg.acts), 2, figsize=(11, 3.6 * len(cfg.acts)), squeeze=False)
    for i, act in enumerate(cfg.acts):
        for j, weights in enumerate(("orthogonal", "gaussian")):
            ax = axes[i][j]
            for depth in cfg.depths:
                r = jacobian_sq_singular_values(cfg, act, weights, depth)
                vals = np.array(r.pop("values"))
                runs[f"{act}/{weights}/{depth}"] = r
                zero = float(np.mean(vals <= 1e-12))  # dead ReLU units, near-singular Gaussian products
                logv = np.log10(vals[vals > 1e-12])
                bins = np.linspace(logv.min() - 0.05, logv.max() + 0.05, 61)
                line = ax.hist(logv, bins=bins, histtype="step", weights=np.full(logv.size, 1.0 / (
                    vals.size * (bins[1] - bins[0]))), label=f"L={depth}: var {r['measured_variance']:.3g} "
                    f"(theory {r['theory_variance']:.3g})" + (f", {zero:.0%} below 1e-12" if zero else ""))[2][0]
                grid = np.logspace(bins[0], bins[-1], 400)
                dens = theory.jacobian_density(act, r["sigma_w2"], r["sigma_b2"], depth, grid,
                                               weights)  # type: ignore[arg-type]
                ax.plot(np.log10(grid), dens * grid * math.log(10), c=line.get_edgecolor(), lw=1, ls="--")
            ax.set(title=f"{act}, {weights}: measured, free probability (dashed)",
                   xlabel=r"$\log_{10}$ squared singular value", ylabel="density per decade")
            ax.legend(fontsize=7)
    figure = _fig(out / "pennington2017.png", fig)
    paper = ("Pennington et al. (2017): at criticality (chi1 = 1) the mean squared singular value of the "
             "Jacobian is 1 at any depth; its spread grows with depth linearly, and for orthogonal tanh networks "
             "with small q* it stays near 0 (dynamical isometry) while Gaussian weights and ReLU spread out")
    headline = [paper, f"each row pools {cfg.seeds} networks of width {cfg.width}"] + [
        f"{k}: variance measured {v['measured_variance']:.3g}, free probability {v['theory_variance']:.3g}; "
        f"mean {v['measured_mean']:.3g} (theory {v['theory_mean']:.3g})" for k, v in runs.items()]
    return {"paper": paper, "runs": runs, "headline": headline, "figure": figure}


register(Experiment("pennington2017", "Pennington et al. 2017: Jacobian singular values at criticality, "
                    "orthogonal vs Gaussian, tanh vs ReLU, measured beside free probability", PenningtonConfig,
                    run_pennington, quick={"depths": (2, 8), "width": 200, "seeds": 4}))


# ---- Xiao et al. 2018 --------------------------------------------------------------

@dataclass(frozen=True)
class XiaoConfig:
    depth: int = 1000  # their claim: plain CNNs of 1,000 (and 10,000) layers train with delta-orthogonal init
    channels: int = 8
    steps: int = 600
    lr: float = 3e-5  # Adam's step ~ 1 / depth, as SGD's for near-isometric nets (depth 10: 3e-3 trains)
    momentum: float = 0.9  # SGD only
    batch: int = 64
    seed: int = 0
    optimizer: str = "adam"  # or "sgd" (with momentum): at depth 10, 150 steps, Adam 92% vs SGD 68% test


def xiao_run(cfg: XiaoConfig, init: str, progress: Any = None) -> dict[str, Any]:
    """A plain tanh CNN (3x3 convolutions, no skips, no norms, global average
    pooling, a linear read-out) on the digits as 1x8x8 images: ``critical``
    (delta-orthogonal kernels on the critical line, :func:`signalprop.init.critical_`)
    or ``kaiming_normal`` (variance 2/fan_in)."""
    from .. import init as spi
    from .datasets import digits
    from .models import SmallCNN

    data = digits(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                          SmallCNN(cfg.depth, cfg.channels, "tanh", 1, data.n_classes))
    gen = torch.Generator().manual_seed(cfg.seed)
    if init == "critical":
        spi.critical_(model, data.x_train[:256], generator=gen)
    else:
        spi.apply_(model, init, generator=gen)
    return _trained(model, data, init, steps=cfg.steps, lr=cfg.lr, momentum=cfg.momentum, batch=cfg.batch,
                    seed=cfg.seed, progress=progress, optimizer=cfg.optimizer)


def run_xiao(cfg: XiaoConfig, out: Path, progress: Any = None) -> dict[str, Any]:
    inits = ("kaiming_normal", "critical")
    if progress is not None:
        progress.start(len(inits) * cfg.steps, f"xiao2018: depth {cfg.depth}")
    runs = {init: xiao_run(cfg, init, progress) for init in inits}
    paper = ("Xiao et al. (2018): with delta-orthogonal kernels on the critical line, plain convolutional "
             "networks of 1,000 and 10,000 layers train without skips or normalization; off criticality "
             "(e.g. variance 2/fan_in for tanh) they do not")
    return _training_results(runs, paper, f"{cfg.depth}-layer plain tanh CNN on digits", out / "xiao2018.png")


register(Experiment("xiao2018", "Xiao et al. 2018: a 1,000-layer plain tanh CNN on digits, delta-orthogonal "
                    "critical init trains where Kaiming does not", XiaoConfig, run_xiao,
                    quick={"depth": 100, "steps": 100, "lr": 3e-4}))
