"""``monitor(..., dump_on_nonfinite=DIR)``: what replays the step that turned non-finite.

Written once, at the first non-finite step, from ``mon.step`` (after that
step's backward, before its optimizer step, so the weights are those its
forward ran with):

* ``inputs.pt`` -- the forward call's positional and keyword arguments (the
  call whose output's gradient turned non-finite, else the step's first), and
  the targets passed to ``mon.step(loss, targets=...)``;
* ``rng.pt`` -- the random-number states the forward started from: torch's
  CPU and CUDA generators, Python's ``random`` and NumPy's global state
  (taken at each forward call only when dumping is on, a few microseconds);
* ``model.pt`` -- the model's ``state_dict`` (buffers as after the forward:
  BatchNorm's running statistics have taken the step's batch, which does not
  change a training-mode forward);
* ``optimizer.pt`` -- the optimizer's ``state_dict`` when one was given;
* ``loss_fn.pt`` -- the monitor's ``loss_fn`` when it pickles (a module-level
  function or an ``nn.Module`` loss; a lambda or closure does not: pass it to
  :func:`signalprop.replay` instead);
* ``manifest.json`` -- step, loss, versions, the model's class, the alert and
  how to replay, written last (a folder without it is no dump).

The model itself is not pickled: :func:`signalprop.replay` takes an
instance (``signalprop replay DIR --model package.module:factory``) and loads
the saved weights into it.  A dump is pickled data: replay only dumps you
trust, as with ``torch.load``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..probe.replay import FILES, FORMAT, VERSION


def extra_rng_state() -> dict[str, Any]:
    """Python's and (when NumPy is loaded) NumPy's global random states, as
    plain lists and numbers (loadable with ``torch.load(weights_only=True)``)."""
    out: dict[str, Any] = {"python": _plain(random.getstate())}
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        out["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    return out


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _detached(v: Any, depth: int = 0) -> Any:
    """Tensors in (nested) arguments without their autograd history (which does not pickle)."""
    if isinstance(v, torch.Tensor):
        return v.detach()
    if depth > 6:
        return v
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return tuple(_detached(x, depth + 1) for x in v)
    if isinstance(v, list):
        return [_detached(x, depth + 1) for x in v]
    if type(v) is dict:
        return {k: _detached(x, depth + 1) for k, x in v.items()}
    return v


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_dump(folder: str | os.PathLike[str], *, step: int, loss: float | None, alert: Any, model: nn.Module,
               args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, rng: torch.Tensor,
               cuda_rng: list[tuple[int, torch.Tensor]], extra_rng: dict[str, Any] | None,
               autocast: list[tuple[str, torch.dtype]], optimizer: Any, loss_fn: Any) -> Path:
    """Write the dump of the module docstring into ``folder`` (created; the
    files of an earlier dump there are replaced).  Raises OSError or a
    pickling error; the monitor turns either into a warning."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    (d / FILES["manifest"]).unlink(missing_ok=True)  # the folder is no dump until the manifest is back
    _save({"args": _detached(args), "kwargs": _detached(kwargs), "targets": _detached(targets)}, d / FILES["inputs"])
    _save({"torch": rng, "cuda": cuda_rng, **(extra_rng or {})}, d / FILES["rng"])
    _save({k: v.detach() for k, v in model.state_dict().items()}, d / FILES["model"])
    if optimizer is not None:
        _save(optimizer.state_dict(), d / FILES["optimizer"])
    else:
        (d / FILES["optimizer"]).unlink(missing_ok=True)
    loss_note = "none given"
    (d / FILES["loss_fn"]).unlink(missing_ok=True)
    if loss_fn is not None:
        try:
            _save(loss_fn, d / FILES["loss_fn"])
            loss_note = "saved"
        except Exception as e:  # a lambda or closure: the user passes it to replay
            (d / FILES["loss_fn"]).with_name(FILES["loss_fn"] + ".tmp").unlink(missing_ok=True)
            loss_note = f"not saved ({type(e).__name__}: {e}); pass loss_fn= to sp.replay or --loss to the CLI"
    from .. import __version__

    cls = type(model)
    manifest = {
        "format": FORMAT, "version": VERSION, "step": step,
        "loss": None if loss is None else repr(float(loss)),
        "torch": torch.__version__, "signalprop": __version__,
        "model_class": f"{cls.__module__}.{cls.__qualname__}", "training": model.training,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(next(model.parameters()).device),
        "autocast": [[dev, str(dtype).removeprefix("torch.")] for dev, dtype in autocast],
        "targets": targets is not None, "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "loss_fn": loss_note,
        "alert": {"layer": alert.layer, "phase": alert.phase, "message": alert.message},
        "replay": f"signalprop replay {d} --model package.module:factory (your code that builds the "
                  f"{cls.__name__}), or sp.replay({str(d)!r}, model=...)",
    }
    tmp = d / (FILES["manifest"] + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, d / FILES["manifest"])
    return d
