"""``sp.replay(DIR, model=...)``: rerun a step that turned non-finite and say where and why.

A dump (written by ``sp.monitor(..., dump_on_nonfinite=DIR)``, see
:mod:`signalprop.monitor.dump`) holds the step's inputs, random states and
weights.  The replay loads the weights into the model you give (a fresh
instance from your own code: the model is not pickled), restores the random
states, and reruns the step twice from the same state:

1. :func:`signalprop.check`'s exact pass, which names the module and the
   phase (forward or backward) as check does for any NaN/Inf -- including a
   NaN made by a module's own code rather than a submodule;
2. the same forward and backward under :func:`.nonfinite_op.locate`, which
   names the operation that made the first NaN/Inf and the line of your code
   that called it, as ``torch.autograd.detect_anomaly`` would.

The loss: ``loss_fn`` given here, else the one the monitor saved (when it
pickled), called as ``loss_fn(output, targets)`` with the targets passed to
``mon.step(loss, targets=...)`` (``loss_fn(output)`` without them); with no
loss function the backward starts from check's fixed random cotangent on
the output, which finds the model's own NaN/Inf but not one the loss makes.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..records import Report, _clean
from .inputs import CallArgs, call_model, cotangent, prepare_inputs
from .nonfinite_op import Origin, locate
from .recorder import first_float_tensor
from .state import preserved

FORMAT = "signalprop-nonfinite-dump"
VERSION = 1
FILES = {"manifest": "manifest.json", "inputs": "inputs.pt", "rng": "rng.pt", "model": "model.pt",
         "optimizer": "optimizer.pt", "loss_fn": "loss_fn.pt"}


@dataclass(frozen=True)
class Dump:
    """A dump as read back: the manifest and what the step needs."""

    path: Path
    manifest: dict[str, Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    targets: Any
    rng: dict[str, Any]
    state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    loss_fn: Any


def _load(path: Path, map_location: Any, trusted: bool) -> Any:
    """``torch.load``: tensors only first; arbitrary pickled objects (inputs
    of a custom type, a loss module) only where they may be."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        if not trusted:
            raise
        return torch.load(path, map_location=map_location, weights_only=False)


def read_dump(path: str | Path, map_location: Any = None) -> Dump:
    """Read the dump in folder ``path``.  FileNotFoundError when it does not
    exist; ValueError when it is not a readable dump of this format."""
    d = Path(path)
    if not d.exists():
        raise FileNotFoundError(f"no dump at {str(d)!r}: the folder does not exist")
    if not d.is_dir():
        raise ValueError(f"{str(d)!r} is a file; a dump is the folder given to monitor(dump_on_nonfinite=...)")
    mf = d / FILES["manifest"]
    if not mf.is_file():
        raise ValueError(f"{str(d)!r} holds no dump ({FILES['manifest']} is missing): give the folder passed to "
                         "monitor(..., dump_on_nonfinite=...) after a non-finite step")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable dump manifest {str(mf)!r}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{str(mf)!r} is not a signalprop non-finite dump")
    if manifest.get("version") != VERSION:
        raise ValueError(f"dump version {manifest.get('version')!r} in {str(d)!r}; this signalprop reads version "
                         f"{VERSION}")
    try:
        inputs = _load(d / FILES["inputs"], map_location, trusted=True)
        rng = _load(d / FILES["rng"], "cpu", trusted=False)
        state = _load(d / FILES["model"], map_location, trusted=False)
        opt_path = d / FILES["optimizer"]
        opt_state = _load(opt_path, map_location, trusted=False) if opt_path.is_file() else None
        loss_path = d / FILES["loss_fn"]
        loss_fn = _load(loss_path, map_location, trusted=True) if loss_path.is_file() else None
    except Exception as e:  # a missing or truncated file, a class that no longer imports
        raise ValueError(f"unreadable dump {str(d)!r}: {type(e).__name__}: {e}") from None
    if not (isinstance(inputs, dict) and isinstance(state, dict) and isinstance(rng, dict)):
        raise ValueError(f"unreadable dump {str(d)!r}: its files do not hold what a dump holds")
    return Dump(d, manifest, tuple(inputs.get("args", ())), dict(inputs.get("kwargs", {})), inputs.get("targets"),
                rng, state, opt_state, loss_fn)


@dataclass(frozen=True)
class ReplayResult:
    """What the replay found.  ``nonfinite``: whether the replayed step made
    a NaN/Inf again; ``module``/``kind``/``phase``: where (check's naming,
    "input" for the inputs themselves, "(loss)" for the loss function,
    "(weights)" when the saved weights are non-finite); ``origin``: the
    operation and your line of code; ``message``/``suggestion``: check's
    words for it; ``report``: check's report of the replayed pass."""

    path: str
    step: int | None
    loss: str | None
    nonfinite: bool
    module: str
    kind: str
    phase: str
    message: str
    suggestion: str
    origin: Origin | None
    report: Report | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("report", "origin")}
        d["origin"] = None if self.origin is None else {
            "operation": self.origin.operation, "phase": self.origin.phase, "module": self.origin.module,
            "frames": [asdict(f) for f in self.origin.frames]}
        d["report"] = None if self.report is None else self.report.to_dict()
        return _clean(d)

    def __str__(self) -> str:
        head = f"replay of step {self.step} (loss {self.loss}) from {self.path}: "
        if not self.nonfinite:
            return head + "finite -- " + self.message + "".join(f"\n  note: {n}" for n in self.notes)
        lines = [head + "non-finite",
                 f"  where:      {self.module or '(root)'}" + (f" ({self.kind})" if self.kind else "")
                 + (f", {self.phase} pass" if self.phase else "")]
        o = self.origin
        if o is not None:
            what = "its output" if o.phase == "forward" else "the gradient its backward returned"
            lines.append(f"  operation:  {o.operation} ({what} is the first NaN/Inf; in "
                         f"{o.module or '(root)'})")
            if o.line is not None:
                lines.append(f"  your code:  {o.line.file}:{o.line.line}, in {o.line.function}")
                if o.line.code:
                    lines.append(f"                {o.line.code}")
                lines += [f"    called from {f.file}:{f.line}, in {f.function}" for f in reversed(o.frames[-4:-1])]
        lines.append(f"  why:        {self.message}")
        if self.suggestion:
            lines.append(f"  fix:        {self.suggestion}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _set_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        for dev, s in rng.get("cuda", []):
            if dev < torch.cuda.device_count():
                torch.cuda.set_rng_state(s, dev)
    if "python" in rng:
        v = rng["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in rng:
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


class _OtherRng:
    """Python's and NumPy's global random states, put back on exit (torch's
    are by :func:`preserved`)."""

    def __enter__(self) -> _OtherRng:
        self.py = random.getstate()
        np = sys.modules.get("numpy")
        self.np = np.random.get_state() if np is not None else None
        return self

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.py)
        if self.np is not None:
            sys.modules["numpy"].random.set_state(self.np)


def _load_weights(model: nn.Module, dump: Dump) -> None:
    want = dump.manifest.get("model_class", "")
    cls = type(model)
    have = f"{cls.__module__}.{cls.__qualname__}"
    if want and want.rpartition(".")[2] != cls.__qualname__.rpartition(".")[2]:
        raise ValueError(f"the dump in {str(dump.path)!r} is of a {want}, the model given is a {have}: build the "
                         "model the dump came from")
    try:
        model.load_state_dict(dump.state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"the model given does not fit the dump in {str(dump.path)!r} (another configuration of "
                         f"{cls.__name__}?): {' '.join(x.strip() for x in first[:3])}") from None
    model.train(bool(dump.manifest.get("training", True)))


def _nonfinite_weights(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]


def replay(path: str | Path, model: nn.Module, *, loss_fn: Any = None, bounds: tuple[float, float] = (1e-6, 1e3),
           trend: float = 100.0) -> ReplayResult:
    """Rerun the step dumped in ``path`` on ``model`` (loaded with the dump's
    weights: the call's job; it keeps them) and name the module, phase,
    operation and your source line of the first NaN/Inf.  See the module
    docstring.  FileNotFoundError / ValueError for a missing or unreadable
    dump or a model that does not fit it."""
    from .pipeline import check_limits, check_model, run_pass

    if not isinstance(model, nn.Module):
        raise TypeError(f"replay() takes the model as an nn.Module (a fresh instance of the dumped one), got "
                        f"{type(model).__name__}")
    check_model(model, "replay")
    check_limits(bounds, trend)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dump = read_dump(path, map_location=device)
    _load_weights(model, dump)
    fn = loss_fn if loss_fn is not None else dump.loss_fn
    notes = []
    if fn is None:
        notes.append("no loss function (pass loss_fn=, or give the monitor loss_fn= to have it saved): the backward "
                     "started from a fixed random gradient at the output, so a NaN made by the loss is not seen")
    elif loss_fn is None:
        notes.append("the loss is the monitor's saved loss_fn")
    targets = dump.targets
    inputs = CallArgs(dump.args, dump.kwargs)
    step, loss = dump.manifest.get("step"), dump.manifest.get("loss")
    bad_w = _nonfinite_weights(model)
    if bad_w:
        return ReplayResult(str(dump.path), step, loss, True, "(weights)", "", "update",
                            f"the saved weights are non-finite ({len(bad_w)} tensor(s), first {bad_w[0]}): an earlier "
                            "optimizer step overflowed them, the step itself is not where it started",
                            "resume from a checkpoint before the first non-finite step and dump there; lower the "
                            "learning rate or clip gradients", None, None, tuple(notes))
    autocast = [(dev, getattr(torch, dt)) for dev, dt in dump.manifest.get("autocast", [])]
    wrapped = _loss_call(fn, targets) if fn is not None else None
    with preserved(model, python_state=True), _OtherRng():
        _set_rng(dump.rng)
        with _autocast(autocast):
            report = run_pass(model, inputs, wrapped, None, bounds, trend, True)
    with preserved(model, python_state=True), _OtherRng():
        _set_rng(dump.rng)
        with _autocast(autocast):
            origin = _locate(model, inputs, wrapped)
    return _result(dump, report, origin, tuple(notes), {n: type(m).__name__ for n, m in model.named_modules()})


def _loss_call(fn: Any, targets: Any) -> Any:
    """``fn(output, targets)`` or ``fn(output)`` as check's one-argument ``loss_fn``."""
    def loss(out: Any) -> Any:
        return fn(out, targets) if targets is not None else fn(out)

    loss.__name__ = getattr(fn, "__name__", type(fn).__name__)
    return loss


def _autocast(state: list[tuple[str, torch.dtype]]) -> Any:
    import contextlib

    stack = contextlib.ExitStack()
    for dev, dtype in state:
        stack.enter_context(torch.autocast(dev, dtype=dtype))
    return stack


def _locate(model: nn.Module, inputs: CallArgs, loss_fn: Any) -> Origin | None:
    params = [p for p in model.parameters() if p.requires_grad]

    def forward() -> Any:
        x, leaves, _ = prepare_inputs(inputs)
        with torch.enable_grad():
            out = call_model(model, x)
            y = first_float_tensor(out)
            root = loss_fn(out) if loss_fn is not None else y
        return root, leaves

    def backward(result: Any) -> None:
        root, leaves = result
        if root is None or not root.requires_grad:
            return
        cot = None if loss_fn is not None else cotangent(root.detach())
        torch.autograd.grad(root, params + leaves, grad_outputs=cot, allow_unused=True)

    return locate(model, forward, backward)


def _result(dump: Dump, report: Report | None, origin: Origin | None, notes: tuple[str, ...],
            kinds: dict[str, str]) -> ReplayResult:
    step, loss = dump.manifest.get("step"), dump.manifest.get("loss")
    p = next((p for p in report.problems if p.kind == "non-finite"), None) if report is not None else None
    if origin is not None and origin.module == "(loss)" and origin.phase == "forward":
        p = None  # the model's output was finite: check's rows only see the loss's NaN coming back
    if p is not None and report is not None:
        forward = p.layer == "input" or any(layer.nonfinite_fraction > 0 for layer in report.layers)
        # the module whose code ran the operation, where the watch saw one: check's rows see modules' outputs
        where = origin.module if origin is not None and origin.module != "(loss)" and p.layer != "input" \
            else p.layer
        return ReplayResult(str(dump.path), step, loss, True, where, kinds.get(where, ""),
                            "forward" if forward else "backward", p.message, p.suggestion, origin, report, notes)
    if origin is not None:  # the loss function made it (check's rows are the model's)
        where = "(loss)" if origin.module == "(loss)" else origin.module
        msg = ("the model's output is finite; the loss function made the first NaN/Inf" if where == "(loss)"
               else f"the first NaN/Inf was made in {where or '(root)'}")
        fix = "clamp the loss's argument (e.g. log(p + eps)) or use a fused loss (F.cross_entropy on logits)" \
            if where == "(loss)" else ""
        return ReplayResult(str(dump.path), step, loss, True, where, "", origin.phase, msg, fix, origin, report, notes)
    alert = dump.manifest.get("alert") or {}
    msg = ("the replayed step stays finite: the NaN/Inf did not come back from the saved inputs, weights and random "
           "state")
    if alert:
        msg += f" (the monitor said: {alert.get('message', '')})"
    extra = ("nondeterministic kernels (GPU atomics, a different device or library version) can change the last "
             "bits; a NaN that depends on them needs the same device")
    return ReplayResult(str(dump.path), step, loss, False, "", "", "", msg, "", None, report, (*notes, extra))
