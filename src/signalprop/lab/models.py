"""Built-in model specs (``mlp:depth=50,width=256,act=sigmoid,init=normal``) and user factories."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .. import activations as _act

# Activation names a spec may use: every registry entry with a torch.nn module
# (signalprop.activations is the one table), by its base name and aliases.
_ACT_NAMES = sorted({a.base for a in _act.REGISTRY.values() if a.module} | {"swish", "identity"})


def _act_module(name: str) -> nn.Module:
    return _act.get(name).torch_module()


class DeepMLP(nn.Sequential):
    """``depth`` blocks of Linear + activation, then a Linear read-out; no skips, no norms.

    ``fast_forward`` runs the same computation without per-module calls (no
    hooks fire): 10,000-layer training is dominated by Python overhead otherwise.
    """

    def __init__(self, depth: int, width: int, act: str, n_in: int, n_out: int) -> None:
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(n_in if i == 0 else width, width), _act_module(act)]
        layers.append(nn.Linear(width if depth else n_in, n_out))
        super().__init__(*layers)
        self.act_name = act

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self)
        f = _fast_act(mods[1]) if len(mods) > 1 else None
        for i in range(0, len(mods) - 1, 2):
            x = f(nn.functional.linear(x, mods[i].weight, mods[i].bias))  # type: ignore[misc, arg-type]
        last = mods[-1]
        return nn.functional.linear(x, last.weight, last.bias)  # type: ignore[arg-type]


def _fast_act(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    fast: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid,
                                                                  nn.ReLU: torch.relu}
    return fast.get(type(m), m)


class ResBlock(nn.Module):
    def __init__(self, width: int, act: str) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), _act_module(act), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class ResMLP(nn.Module):
    """Residual MLP without normalization: input Linear, ``blocks`` x (x + branch(x)), read-out."""

    def __init__(self, blocks: int, width: int, act: str, n_in: int, n_out: int) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.Sequential(*[ResBlock(width, act) for _ in range(blocks)])
        self.out = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


class SmallCNN(nn.Module):
    def __init__(self, depth: int, channels: int, act: str, in_channels: int, n_out: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1), _act_module(act)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self, layers: int, d_model: int, heads: int, vocab: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.encoder(self.embed(ids) + self.pos(pos)))


@dataclass
class Built:
    model: nn.Module
    inputs: torch.Tensor | tuple[Any, ...] | dict[str, Any]
    spec: str
    init_summary: Any = None


_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"depth": 50, "width": 256, "act": "sigmoid", "init": "default", "in": None, "out": 10},
    "resmlp": {"blocks": 20, "width": 128, "act": "relu", "init": "kaiming_normal", "residual": "fixup",
               "in": None, "out": 10},
    "cnn": {"depth": 10, "channels": 32, "act": "relu", "init": "default", "size": 16, "in_channels": 3,
            "out": 10},
    "transformer": {"layers": 2, "d_model": 64, "heads": 4, "vocab": 100, "seq": 32, "init": "default"},
}


def _parse_value(v: str) -> Any:
    for convert in (int, float):
        try:
            return convert(v)
        except ValueError:
            pass
    return v


# options that count something: positive integers (``in``: None means "= width")
_COUNTS = {"depth", "width", "blocks", "channels", "size", "in_channels", "out", "layers", "d_model", "heads",
           "vocab", "seq", "in"}
_RESIDUALS = ("none", "fixup", "skipinit")
MEMORY_FRACTION = 0.5  # refuse a model whose estimated footprint exceeds this share of the machine's memory


def _machine_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
        return 16 << 30


def estimate_bytes(kind: str, o: dict[str, Any], batch: int) -> int:
    """A float32 estimate of what check needs: parameters (and their
    gradients) plus every layer's output and its gradient for the batch."""
    if kind == "mlp":
        n_in = o["in"] or o["width"]
        params = o["depth"] * o["width"] * (o["width"] + 1) + n_in * o["width"]
        acts = 2 * o["depth"] * batch * o["width"]
    elif kind == "resmlp":
        params = o["blocks"] * 2 * o["width"] * (o["width"] + 1)
        acts = 5 * o["blocks"] * batch * o["width"]
    elif kind == "cnn":
        params = o["depth"] * o["channels"] * (o["channels"] * 9 + 1)
        acts = 2 * o["depth"] * batch * o["channels"] * o["size"] ** 2
    else:
        params = o["layers"] * 12 * o["d_model"] ** 2 + o["vocab"] * o["d_model"]
        acts = o["layers"] * batch * o["seq"] * (16 * o["d_model"] + 2 * o["heads"] * o["seq"])
    return 4 * (2 * params + 2 * acts)


def _check_options(kind: str, o: dict[str, Any]) -> None:
    for k in sorted(_COUNTS & set(o)):
        v = o[k]
        if k == "in" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{kind} option {k}={v!r} must be a whole number")
        if v < 1:
            raise ValueError(f"{kind} option {k}={v} must be at least 1")
    if "act" in o and o["act"] not in _ACT_NAMES:
        raise ValueError(f"unknown act {o['act']!r}; choose from {_ACT_NAMES}")
    if "residual" in o and o["residual"] not in _RESIDUALS:
        raise ValueError(f"unknown residual {o['residual']!r}; choose from {list(_RESIDUALS)}")
    if kind == "transformer" and o["d_model"] % o["heads"]:
        raise ValueError(f"transformer: d_model={o['d_model']} is not divisible by heads={o['heads']} "
                         "(each head gets d_model / heads dimensions)")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    kind, _, rest = spec.partition(":")
    if kind not in _DEFAULTS:
        raise ValueError(f"unknown model kind {kind!r}; built-in: {sorted(_DEFAULTS)} "
                         "(or package.module:factory)")
    opts = dict(_DEFAULTS[kind])
    for item in filter(None, rest.split(",")):
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"model option {item!r} is not KEY=VALUE")
        if k not in opts:
            raise ValueError(f"{kind} has no option {k!r}; options: {sorted(opts)}")
        opts[k] = _parse_value(v)
    _check_options(kind, opts)
    return kind, opts


def _initialize(model: nn.Module, init: str, inputs: Any, generator: torch.Generator,
                act: str | None = None, residual: str | None = None) -> Any:
    from .. import init as spi

    res = cast(Any, None if residual in (None, "none") else residual)  # "fixup" / "skipinit", checked there
    if init == "default":
        return spi.scale_residual_(model, res) if res else None
    if init == "critical":
        return spi.critical_(model, inputs, generator=generator, residual=res)
    if init == "lsuv":
        s = spi.lsuv_(model, inputs, generator=generator)
        if res:
            spi.scale_residual_(model, res)
        return s
    # Named schemes as their papers define them (Xavier: gain 1; Kaiming: sqrt(2)), so
    # comparisons show what each scheme itself buys; critical_ is where the activation enters.
    return spi.apply_(model, init, generator=generator, residual=res)


def build(spec: str, *, batch: int = 64, seed: int = 0, init: str | None = None,
          input_shape: tuple[int, ...] | None = None) -> Built:
    """A built-in model from its spec, or ``package.module:factory`` from the
    user's code (the factory returns a model, or ``(model, inputs)``; keyword
    arguments as ``package.module:factory:key=value,key=value``), with
    example inputs drawn from ``seed``; the model is built under
    ``torch.manual_seed(seed)`` too (the global RNG is restored after), so
    one seed gives one model."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive whole number, got {batch!r}")
    if input_shape is not None and any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                       for d in input_shape):
        raise ValueError(f"input shape must be positive whole numbers, got {input_shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(spec, batch, seed, init, input_shape)


def _build(spec: str, batch: int, seed: int, init: str | None, input_shape: tuple[int, ...] | None) -> Built:
    g = torch.Generator().manual_seed(seed)
    kind = spec.partition(":")[0]
    if kind not in _DEFAULTS and ":" in spec:
        return _factory(spec, batch, g, input_shape, init)
    kind, o = parse_spec(spec)
    need = estimate_bytes(kind, o, batch)
    have = _machine_memory()
    if need > MEMORY_FRACTION * have:
        raise ValueError(f"{spec} at batch {batch} needs about {need / 2**30:.1f} GiB (parameters, outputs and "
                         f"their gradients in float32), more than half of this machine's {have / 2**30:.1f} GiB: "
                         "make it smaller")
    init = init or o.get("init", "default")
    if kind == "mlp":
        n_in = o["in"] or o["width"]
        model: nn.Module = DeepMLP(o["depth"], o["width"], o["act"], n_in, o["out"])
        x: Any = torch.randn(batch, *(input_shape or (n_in,)), generator=g)
    elif kind == "resmlp":
        n_in = o["in"] or o["width"]
        model = ResMLP(o["blocks"], o["width"], o["act"], n_in, o["out"])
        x = torch.randn(batch, *(input_shape or (n_in,)), generator=g)
    elif kind == "cnn":
        model = SmallCNN(o["depth"], o["channels"], o["act"], o["in_channels"], o["out"])
        x = torch.randn(batch, *(input_shape or (o["in_channels"], o["size"], o["size"])), generator=g)
    else:
        model = TinyTransformer(o["layers"], o["d_model"], o["heads"], o["vocab"], o["seq"])
        x = torch.randint(0, o["vocab"], (batch, o["seq"]), generator=g)
    s = _initialize(model, init, x, g, o.get("act"), o.get("residual"))
    return Built(model, x, spec, s)


def _factory(spec: str, batch: int, g: torch.Generator, input_shape: tuple[int, ...] | None,
             init: str | None) -> Built:
    mod_name, _, rest = spec.partition(":")
    attr, _, arg_text = rest.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, arg_text.split(",")):
        k, sep, v = item.partition("=")
        if not sep or not k.isidentifier():
            raise ValueError(f"factory argument {item!r} in {spec!r} is not KEY=VALUE")
        kwargs[k] = _parse_value(v)
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:
        raise ValueError(f"cannot import {mod_name!r} for {spec!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{mod_name!r} has no callable {attr!r} (from {spec!r})")
    try:
        out = fn(**kwargs)
    except Exception as e:
        raise ValueError(f"the factory {spec!r} raised {type(e).__name__}: {e}") from e
    model, inputs = (out if isinstance(out, tuple) and len(out) == 2 else (out, None))
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned {type(model).__name__}, not an nn.Module (or (model, inputs))")
    if inputs is None:
        if input_shape is None:
            raise ValueError(f"{spec} returned no example inputs: pass --input-shape, e.g. 3,32,32")
        inputs = torch.randn(batch, *input_shape, generator=g)
    s = _initialize(model, init, inputs, g, None) if init else None
    return Built(model, inputs, spec, s)
