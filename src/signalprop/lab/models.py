"""Built-in model specs (``mlp:depth=50,width=256,act=sigmoid,init=normal``) and user factories."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .. import activations as _act
from .factory_args import load_factory, parse_value

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


# options that count something: positive integers (``in``: None means "= width")
_COUNTS = {"depth", "width", "blocks", "channels", "size", "in_channels", "out", "layers", "d_model", "heads",
           "vocab", "seq", "in"}
_NAMES = {"act", "init", "residual"}  # options that name something: read as text, never as a number
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


# How deep a model check can take.  After check's pass, freeing the autograd graph recurses in
# PyTorch's C++ code once per node that a Python object ever referred to (check hooks the node that
# made each row's output): a graph deeper than the stack allows ends the process with a segmentation
# fault, which no exception handler sees.  Measured with `signalprop check` in a subprocess (torch
# 2.13, CPU, main thread, 8 MiB stack): mlp crashed between depth 18,031 and 18,062 (about 36,100
# rows), cnn between 17,985 and 18,093, transformer between 4,157 and 4,437 layers (37,400-40,000
# rows), resmlp between 10,438 and 10,500 blocks (31,300 rows: each block's residual add is one more
# node, which check does not hook); a 16 MiB stack doubled the depth (mlp ok at 30,000, crashed at
# 37,000), 4 MiB halved it (ok at 8,500, crashed at 9,500), an unlimited stack took depth 20,000.
STACK_BYTES_PER_ROW = 8 * 2**20 / 36_000  # ~233 bytes of stack per hooked row
GRAPH_MARGIN = 0.8  # refuse beyond this share of the measured limit (other frames use the stack too)
NO_RLIMIT_STACK = 1 << 20  # without POSIX rlimits (Windows): assume a 1 MiB main-thread stack


def _stack_bytes() -> int | None:
    """This process's stack limit (None: unlimited)."""
    try:
        import resource
    except ImportError:
        return NO_RLIMIT_STACK
    soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


# per unit of depth: the rows check hooks, plus half a row for each residual add (see above)
_ROWS_PER_UNIT = {"mlp": ("depth", 2.0, 1), "cnn": ("depth", 2.0, 2), "resmlp": ("blocks", 3.5, 2),
                  "transformer": ("layers", 9.0, 3)}


def _check_graph_depth(kind: str, o: dict[str, Any], spec: str) -> None:
    stack = _stack_bytes()
    if stack is None:
        return
    unit, per, fixed = _ROWS_PER_UNIT[kind]
    rows = per * o[unit] + fixed
    limit = GRAPH_MARGIN * stack / STACK_BYTES_PER_ROW
    if rows > limit:
        most = int((limit - fixed) // per)
        raise ValueError(f"{spec}: {unit}={o[unit]} is deeper than check can take with this process's "
                         f"{stack / 2**20:g} MiB stack (at most {unit}={most}): freeing the autograd graph after "
                         "the pass recurses once per layer in PyTorch and would crash the process; lower "
                         f"{unit}, or raise the stack limit (ulimit -s) and run again")


def _check_options(kind: str, o: dict[str, Any]) -> None:
    for k in sorted(_COUNTS & set(o)):
        v = o[k]
        if k == "in" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{kind} option {k}={v!r} must be a whole number (int)")
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
        opts[k] = v if k in _NAMES else parse_value(v)  # in=none: the default, as wide as the hidden layers
    _check_options(kind, opts)
    return kind, opts


def _initialize(model: nn.Module, init: str, inputs: Any, generator: torch.Generator,
                act: str | None = None, residual: str | None = None) -> Any:
    from .. import init as spi
    from ..probe.pipeline import check_materialised

    res = cast(Any, None if residual in (None, "none") else residual)  # "fixup" / "skipinit", checked there
    check_materialised(list(model.named_modules()), "init")  # a lazy layer: refused as check refuses it
    if init in ("critical", "lsuv"):
        _runs(model, inputs, init)
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


def _runs(model: nn.Module, inputs: Any, init: str) -> None:
    """A data-dependent initializer runs the model: a forward that fails on
    these inputs (a wrong input shape) is the caller's input error, said as
    check says it, not a traceback from inside the initializer.  One forward
    without gradients; the model comes back as it was (BatchNorm statistics,
    RNG)."""
    from ..probe.inputs import call_model, shapes
    from ..probe.state import preserved

    try:
        with preserved(model), torch.no_grad():
            call_model(model, inputs)
    except Exception as e:
        raise ValueError(f"init {init!r} runs the model, but its forward failed on inputs of shape "
                         f"{shapes(inputs)}: {type(e).__name__}: {e}") from e


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
    if input_shape is not None:
        _check_input_size(batch, input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(spec, batch, seed, init, input_shape)


def _check_input_size(batch: int, shape: tuple[int, ...]) -> None:
    """Refuse, before allocating, example inputs that could not fit in memory
    (float32, the model's own needs not even counted)."""
    need, have = 4 * batch * math.prod(shape), _machine_memory()
    if need > MEMORY_FRACTION * have:
        raise ValueError(f"inputs of shape {(batch, *shape)} hold {need // 4:.3g} values, {need / 2**30:.3g} GiB "
                         f"in float32: more than half of this machine's {have / 2**30:.1f} GiB; "
                         "give the shape of one example (e.g. 3,32,32) and a smaller batch")


def _randn(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Example inputs; an allocation that fails all the same (memory taken by
    others) is a ValueError that says so, not the allocator's traceback."""
    try:
        return torch.randn(shape, generator=g)
    except (RuntimeError, MemoryError) as e:
        if isinstance(e, RuntimeError) and "alloc" not in str(e):
            raise
        raise ValueError(f"could not allocate example inputs of shape {shape} "
                         f"({4 * math.prod(shape) / 2**30:.3g} GiB in float32): make the shape or the batch "
                         "smaller") from None


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
    _check_graph_depth(kind, o, spec)
    init = init or o.get("init", "default")
    if kind == "mlp":
        n_in = o["in"] or o["width"]
        model: nn.Module = DeepMLP(o["depth"], o["width"], o["act"], n_in, o["out"])
        x: Any = _randn((batch, *(input_shape or (n_in,))), g)
    elif kind == "resmlp":
        n_in = o["in"] or o["width"]
        model = ResMLP(o["blocks"], o["width"], o["act"], n_in, o["out"])
        x = _randn((batch, *(input_shape or (n_in,))), g)
    elif kind == "cnn":
        model = SmallCNN(o["depth"], o["channels"], o["act"], o["in_channels"], o["out"])
        x = _randn((batch, *(input_shape or (o["in_channels"], o["size"], o["size"]))), g)
    else:
        model = TinyTransformer(o["layers"], o["d_model"], o["heads"], o["vocab"], o["seq"])
        x = torch.randint(0, o["vocab"], (batch, o["seq"]), generator=g)
    s = _initialize(model, init, x, g, o.get("act"), o.get("residual"))
    return Built(model, x, spec, s)


def _factory(spec: str, batch: int, g: torch.Generator, input_shape: tuple[int, ...] | None,
             init: str | None) -> Built:
    fn, kwargs = load_factory(spec)
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
        inputs = _randn((batch, *input_shape), g)
    s = _initialize(model, init, inputs, g, None) if init else None
    return Built(model, inputs, spec, s)
