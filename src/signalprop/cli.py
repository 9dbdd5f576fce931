"""The ``signalprop`` command: argument parsing and printing only.

Exit codes: 0 healthy / success, 1 problems found, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the command line: reported on stderr, exit code 2."""


def _fmt(v: Any, digits: int = 6) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}g}"
    return "-" if v is None else str(v)


def _kv_table(title: str, d: dict[str, Any], width: int) -> Table:
    from .report.terminal import fitted_table

    return fitted_table(title, ["quantity", "value"], [[k, _fmt(v)] for k, v in d.items()], width, wrap=("value",))


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {v}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _under_a_folder(p: Path, what: str) -> Path:
    """``p`` whose nearest existing ancestor is a folder (so it can be created)."""
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{what} {str(p)!r}: {str(parent)!r} is a file, not a folder")
    return p


def _out_file(path: str | None, what: str) -> Path | None:
    """An output file path that can be written: refused before any work
    when it is a directory or lies under a regular file."""
    if not path:
        return None
    if Path(path).is_dir():
        raise UsageError(f"{what} {path!r} is a directory; give a file name, e.g. {Path(path) / 'report'}")
    return _under_a_folder(Path(path), what)


def _write(what: str, path: Path, write: Callable[[Path], Any]) -> str | None:
    """Run ``write(path)``; the reason it failed (a full disk, /dev/full, no
    permission), or None."""
    try:
        write(path)
    except OSError as e:
        return f"cannot write {what} {str(path)!r}: {e.strerror or e}"
    return None


def _out_dir(path: str, what: str) -> Path:
    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{what} {path!r} is a file, not a folder")
    return _under_a_folder(Path(path), what)


# ---- theory -----------------------------------------------------------------

def cmd_theory(args: argparse.Namespace, out: Console) -> int:
    from . import theory

    plot = _out_file(args.plot, "--plot")  # sigma values are checked by summarize (ValueError: exit 2)
    asked_line = args.sigma_b2 is not None  # the critical point on this line, unless --sigma-w2 names a weight
    args.sigma_b2 = 0.0 if args.sigma_b2 is None else args.sigma_b2
    summary = theory.summarize(args.act, args.sigma_b2, args.sigma_w2)
    if asked_line and args.sigma_w2 is None and summary["critical_sigma_w2"] is None:
        # the numbers were asked at the critical point of this line and it has none: say why, rather than
        # print a table whose point is missing (without --sigma-b2 the table is the activation's overview:
        # gains, the critical_ point, and the reason the sigma_b2 = 0 line has none, as a note)
        raise UsageError(f"{summary.get('critical_note', 'no critical point')}; pass --sigma-w2 to evaluate a "
                         "weight variance of your choice")
    if plot is not None:
        import numpy as np

        from .report.figures import plot_phase_diagram

        w = np.linspace(0.25, 4.0 if summary["critical_sigma_w2"] is None else
                        max(4.0, 2.5 * summary["critical_sigma_w2"]), 100)
        b = np.linspace(0.0, 0.5, 100)
        point = (float(args.sigma_w2 if args.sigma_w2 is not None else summary["critical_sigma_w2"] or np.nan),
                 float(args.sigma_b2))
        diagram = theory.phase_diagram(args.act, w, b)
        failed = _write("--plot", plot, lambda p: plot_phase_diagram(diagram, p, point if math.isfinite(point[0])
                                                                      else None))
        if failed:
            raise UsageError(failed)
        summary["plot"] = args.plot
    if args.json:
        from .records import _clean

        out.print_json(json.dumps(_clean(summary)))
    else:
        about = summary.pop("about", None)
        out.print(_kv_table(f"mean-field theory: {summary['activation']}", summary, out.width))
        if about:
            out.print(escape(about), highlight=False)
    return EXIT_OK


# ---- lab --------------------------------------------------------------------

def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if not k.isidentifier():
            raise UsageError(f"--set expects KEY=VALUE with a field name as KEY, got {item!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_lab(args: argparse.Namespace, out: Console) -> int:
    from .lab import experiments, run_experiment
    from .report.terminal import fitted_table

    if args.lab_cmd == "list":
        out.print(fitted_table("signalprop lab", ["name", "what it shows"],
                               [[name, exp.summary] for name, exp in experiments().items()], out.width,
                               wrap=("what it shows",)))
        return EXIT_OK
    dest = _out_dir(args.out or f"lab-out/{args.name}", "--out")
    from .report.progress import progress_bar

    with progress_bar(out) as bar:
        results = run_experiment(args.name, dest, quick=args.quick, progress=bar, **_parse_sets(args.set))
    if "table" in results:
        cols = [str(c) for c in results["table"]["columns"]]
        out.print(fitted_table(args.name, cols, [["-" if v is None else str(v) for v in row]
                                                 for row in results["table"]["rows"]], out.width, wrap=tuple(cols)))
    out.print(f"[bold]{escape(args.name)}[/bold]: results in {escape(str(dest))}/results.json")
    for line in results.get("headline", []):
        out.print(f"  {escape(str(line))}", highlight=False)
    return EXIT_OK


# ---- check ------------------------------------------------------------------

DEFAULT_MODEL = "mlp:depth=50,width=256,act=sigmoid,init=normal"


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        dims = tuple(int(v) for v in parts)
    except ValueError:
        raise UsageError(f"--input-shape expects positive integers like 3,32,32, got {text!r}") from None
    if any(d < 1 for d in dims):
        raise UsageError(f"--input-shape expects positive integers like 3,32,32, got {text!r}")
    return dims


def _format(text: str) -> str:
    from .formats import resolve

    try:
        return resolve(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_check(args: argparse.Namespace, out: Console) -> int:
    import torch

    from . import check
    from .lab.models import build
    from .report.terminal import renderable

    json_path, html_path = _out_file(args.json, "--json"), _out_file(args.html, "--html")
    if not 0 < args.low < args.high:
        raise UsageError(f"--low and --high must satisfy 0 < low < high, got {args.low} and {args.high}")
    built = build(args.model, batch=args.batch, seed=args.seed, init=args.init, input_shape=_shape(args.input_shape))
    with torch.random.fork_rng(devices=[]):
        # the pass's own random draws (a factory's model in train mode: its dropout masks) from --seed, as the
        # inputs are: one seed, one report (the process's RNG starts from a random seed)
        torch.manual_seed(args.seed)
        report = check(built.model, built.inputs, bounds=(args.low, args.high), spectrum=args.spectrum,
                       dtype=args.dtype)
    out.print(f"[bold]signalprop check[/bold] {escape(built.spec)}" +
              (f" (init: {escape(args.init)})" if args.init else ""))
    out.print(renderable(report, out.width, surface="cli"))  # fixes as flags (--init critical), not Python
    precision = report.precision() if args.dtype is not None else None
    if precision is not None:
        style = "green" if precision.verdict == "fits" else "red"
        out.print(f"[bold {style}]{precision.verdict}[/bold {style}] in {escape(precision.summary)}")
    # the report is on the screen already; a file that cannot be written (a full disk) is an input error
    # (exit 2), after the other file has been tried
    failed = []
    for what, path, write, label in (("--json", json_path, report.to_json, "JSON"),
                                     ("--html", html_path, report.save_html, "HTML report")):
        if path is not None:
            err = _write(what, path, write)
            if err:
                failed.append(err)
            else:
                out.print(f"{label}: {escape(str(path))}")
    if failed:
        raise UsageError("; ".join(failed))
    fits = precision is None or precision.verdict == "fits"
    return EXIT_OK if report.verdict == "healthy" and fits else EXIT_PROBLEMS


# ---- demo -------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace, out: Console) -> int:
    from .lab.demo import DemoConfig, demo_seed, run_demo
    from .report.progress import progress_bar
    from .report.terminal import STYLE as _VERDICT_STYLE
    from .report.terminal import fitted_table

    cfg = DemoConfig(steps=args.steps)
    dest = _out_dir(args.out, "--out")
    out.rule("[bold]signalprop demo[/bold]: why a deep sigmoid network will not train, and the fix")
    out.print("First the two demonstrations of Dive into Deep Learning's chapter on numerical stability and "
              "initialization (figures in the output folder):")
    dest.mkdir(parents=True, exist_ok=True)
    s = demo_seed(cfg, dest)
    out.print(f"  sigmoid'(x) peaks at {s['sigmoid_max_grad']:.3g} (x = 0) and is {s['sigmoid_grad_at_-8']:.2g} "
              f"at x = -8: through 50 layers at best 0.25^50 = {0.25 ** 50:.1g}")
    out.print(f"  100 random 4x4 N(0,1) matrices multiply to entries of {s['normal_product']:.2g}; "
              f"orthogonal factors keep norm {s['orthogonal_product_norm']:.3g}")
    out.print(f"\nNow {len(cfg.inits)} initializations of a {cfg.depth}-layer {cfg.act} MLP, each checked and "
              f"trained for {cfg.steps} steps:")
    with progress_bar(out) as bar:
        res = run_demo(cfg, dest, bar, seed=s)
    out.print(f"\nModel: {res['model']} on scikit-learn's digits ({res['data']}).")
    verdicts = {v: _VERDICT_STYLE.get(v, "") for r in res["rows"] for v in (r["verdict"], r["verdict_after"])}
    out.print(fitted_table(
        "at initialization: signalprop.check",
        ["init", "verdict", "grad RMS layer 1", "grad RMS last hidden", "max saturation", "problems"],
        [[r["init"], r["verdict"], _fmt(r["grad_first"], 3), _fmt(r["grad_last"], 3), f"{r['max_saturation']:.0%}",
          ", ".join(r["problems"]) or "-"] for r in res["rows"]], out.width,
        wrap=("init", "grad RMS layer 1", "grad RMS last hidden", "max saturation", "problems"),
        right=("grad RMS layer 1", "grad RMS last hidden", "max saturation"), styles={"verdict": verdicts}))
    worst = res["rows"][0]
    if worst["problem"]:
        out.print(f"[bold]{escape(worst['init'])}[/bold]: {escape(worst['problem'])}\n  [bold]fix:[/bold] "
                  f"{escape(worst.get('cli_suggestion') or worst['suggestion'])}")
    out.print(fitted_table(
        f"after {cfg.steps} steps of SGD (lr {cfg.lr}, momentum {cfg.momentum})",
        ["init", "final train loss", "test accuracy", "verdict after training"],
        [[r["init"], _fmt(r["final_loss"], 3), f"{r['test_acc']:.1%}", r["verdict_after"]] for r in res["rows"]],
        out.width, wrap=("init", "final train loss", "test accuracy", "verdict after training"),
        right=("final train loss", "test accuracy"), styles={"verdict after training": verdicts}))
    out.print(f"HTML reports: {', '.join(res['html'])}")
    out.print(f"all numbers: {dest / 'demo.json'}")
    return EXIT_OK


# ---- coord-check ------------------------------------------------------------

def _widths(text: str) -> list[int]:
    try:
        ws = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 64,128,256, got {text!r}") from None
    if len(set(ws)) < 2 or min(ws) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two different positive widths, got {text!r}")
    return ws


def _coord_factory(spec: str) -> tuple[Any, dict[str, Any]]:
    """``package.module:factory[:key=value,...]`` -> (factory, keyword arguments
    read as the types the factory declares, see :func:`~.lab.factory_args.factory_kwargs`)."""
    from .lab.factory_args import load_factory

    try:
        return load_factory(spec)
    except ValueError as e:
        raise UsageError(str(e)) from None



def _model_only(fn: Any, kwargs: dict[str, Any], width: int) -> Any:
    out = fn(width, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def cmd_coord_check(args: argparse.Namespace, out: Console) -> int:
    import functools

    import torch

    from . import coord_check
    from .width import optimizer

    json_path, html_path = _out_file(args.json, "--json"), _out_file(args.html, "--html")
    fn, kwargs = _coord_factory(args.model)
    make_opt = optimizer(args.optimizer, args.lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        try:
            first = fn(min(args.widths), **kwargs)
        except Exception as e:
            raise UsageError(f"the factory {args.model!r} raised {type(e).__name__}: {e}") from e
        parts = first if isinstance(first, tuple) else (first,)
        if not isinstance(parts[0], torch.nn.Module):
            raise UsageError(f"{args.model} returned {type(parts[0]).__name__}, not an nn.Module "
                             "(or (model, inputs[, targets]))")
        g = torch.Generator().manual_seed(args.seed)
        if len(parts) > 1:
            inputs = parts[1]
        elif (shape := _shape(args.input_shape)) is not None:
            inputs = torch.randn(args.batch, *shape, generator=g)
        else:
            raise UsageError(f"{args.model} returned no example inputs: pass --input-shape, e.g. 64")
        if len(parts) > 2:
            targets = parts[2]
        else:  # class labels over the output's last dimension, drawn from --seed
            with torch.no_grad():
                y = parts[0](inputs)
            targets = torch.randint(0, y.shape[-1], y.shape[:-1], generator=g)
    del first, parts
    from .report.progress import progress_bar

    with progress_bar(out) as bar:
        result = coord_check(functools.partial(_model_only, fn, kwargs), args.widths, (inputs, targets), make_opt,
                             steps=args.steps, seeds=args.seeds, statistic=args.statistic, name=args.model,
                             use_ray=args.ray, ray_address=args.ray_address, progress=bar)
    out.print(escape(str(result)), highlight=False)
    if json_path is not None:
        result.to_json(json_path)
        out.print(f"JSON: {escape(str(json_path))}")
    if html_path is not None:
        result.save_html(html_path)
        out.print(f"HTML report: {escape(str(html_path))}")
    return EXIT_OK if result.verdict == "width-stable" else EXIT_PROBLEMS


# ---- replay -----------------------------------------------------------------

def _replay_model(spec: str) -> Any:
    """The model a ``package.module:factory[:key=value,...]`` spec builds
    (a factory may return ``(model, inputs, ...)``: the model is taken)."""
    import torch

    fn, kwargs = _coord_factory(spec)
    try:
        built = fn(**kwargs)
    except Exception as e:
        raise UsageError(f"the factory {spec!r} raised {type(e).__name__}: {e}") from e
    model = built[0] if isinstance(built, tuple) and built else built
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, not an nn.Module (or (model, inputs, ...))")
    return model


def _loss_function(spec: str) -> Any:
    """``package.module:name`` -> that callable (``torch.nn.functional:cross_entropy``); a class
    (``torch.nn:CrossEntropyLoss``) is instantiated with the spec's key=value arguments."""
    fn, kwargs = _coord_factory(spec)
    if isinstance(fn, type):
        try:
            return fn(**kwargs)
        except Exception as e:
            raise UsageError(f"--loss {spec!r}: {type(e).__name__}: {e}") from e
    if kwargs:
        import functools

        return functools.partial(fn, **kwargs)
    return fn


def cmd_replay(args: argparse.Namespace, out: Console) -> int:
    from . import replay

    json_path = _out_file(args.json, "--json")
    if not Path(args.dir).exists():
        raise UsageError(f"no dump at {args.dir!r}: the folder does not exist")
    model = _replay_model(args.model)
    loss_fn = _loss_function(args.loss) if args.loss else None
    result = replay(args.dir, model, loss_fn=loss_fn)
    out.print(escape(str(result)), highlight=False, soft_wrap=True)
    if json_path is not None:
        failed = _write("--json", json_path, lambda p: p.write_text(json.dumps(result.to_dict(), indent=1)))
        if failed:
            raise UsageError(failed)
        out.print(f"JSON: {escape(str(json_path))}")
    return EXIT_PROBLEMS if result.nonfinite else EXIT_OK


# ---- parser -----------------------------------------------------------------

def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signalprop",
        description="Keep deep networks numerically stable: diagnose, initialize, predict.",
        epilog="Exit codes: 0 healthy/success, 1 problems found, 2 usage or input error.",
    )
    p.add_argument("--version", action="version", version=f"signalprop {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the main job on built-in defaults: diagnose and fix a deep sigmoid MLP")
    d.add_argument("--out", default="demo-out", help="folder for figures, JSON and HTML (default: demo-out)")
    d.add_argument("--steps", type=_positive_int, default=200, help="training steps per initialization (default 200)")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("check", help="diagnose a model layer by layer (exit 1 when problems are found)")
    c.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="built-in spec (mlp:..., cnn:..., resmlp:..., transformer:...) or package.module:factory "
                        "[:key=value,...], values read as the types the factory declares "
                        f"(default: {DEFAULT_MODEL})")
    c.add_argument("--input-shape", help="shape of one example, e.g. 3,32,32 (factories without inputs)")
    c.add_argument("--batch", type=_positive_int, default=64, help="batch size of the random example inputs (default 64)")
    c.add_argument("--seed", type=int, default=0,
                   help="seed for inputs, initialization and the pass's random draws such as dropout masks "
                        "(default 0)")
    c.add_argument("--init", help="re-initialize first: an apply_ scheme, critical, lsuv or default")
    c.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    c.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    c.add_argument("--spectrum", action="store_true", help="also read the input-output Jacobian's singular values")
    c.add_argument("--low", type=_finite_float, default=1e-6,
                   help="lowest healthy gradient RMS, relative to the gradient RMS at the model's output (default 1e-6)")
    c.add_argument("--high", type=_finite_float, default=1e3,
                   help="highest healthy gradient RMS, relative to the output's (default 1e3)")
    c.add_argument("--dtype", type=_format, default=None,
                   help="also say which layers would not survive this low-precision format at their current scale "
                        "(overflow, underflow and flush-to-zero shares of outputs, gradients and weights; exit 1 when "
                        "one would not): float16, bfloat16, float8_e4m3fn, float8_e5m2 (or fp16, bf16, fp8_e4m3, "
                        "fp8_e5m2)")
    c.set_defaults(func=cmd_check)

    t = sub.add_parser("theory", help="mean-field numbers for an activation")
    t.add_argument("act", help="activation name, e.g. tanh, relu, sigmoid, gelu, leaky_relu(0.2)")
    t.add_argument("--sigma-b2", type=_finite_float, default=None,
                   help="bias variance sigma_b^2 (default 0): the numbers at this line's critical point; where "
                        "it has none, the reason is printed and the exit code is 2 (without --sigma-b2, a "
                        "missing critical point is a note in the table)")
    t.add_argument("--sigma-w2", type=_finite_float, default=None,
                   help="weight variance sigma_w^2 (default: the critical value at --sigma-b2)")
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t.add_argument("--plot", metavar="PATH", help="write the order-to-chaos phase diagram as a PNG")
    t.set_defaults(func=cmd_theory)

    w = sub.add_parser("coord-check", help="muP coordinate check: how each layer scales with width "
                                           "(exit 1 when a layer grows or shrinks)")
    w.add_argument("model", help="package.module:factory[:key=value,...]; factory(width, ...) returns a model, "
                                 "(model, inputs) or (model, inputs, targets), e.g. "
                                 "signalprop.lab.gpt:coord_model:parametrization=mup")
    w.add_argument("--widths", type=_widths, default=[64, 128, 256, 512, 1024],
                   help="comma-separated widths (default 64,128,256,512,1024)")
    w.add_argument("--steps", type=_positive_int, default=3, help="training steps (default 3)")
    w.add_argument("--seeds", type=_positive_int, default=3, help="seeds per width (default 3)")
    w.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "mu-sgd", "mu-adam", "mu-adamw"], default="adam",
                   help="torch's or mup's (mu-*) optimizer (default adam)")
    w.add_argument("--lr", type=_finite_float, default=1e-2, help="learning rate (default 1e-2)")
    w.add_argument("--statistic", choices=["l1", "rms"], default="l1",
                   help="per-coordinate scale: l1 = mean |x| as mup (default), rms")
    w.add_argument("--input-shape", help="shape of one example when the factory returns no inputs, e.g. 64")
    w.add_argument("--batch", type=_positive_int, default=8, help="batch size of random inputs (default 8)")
    w.add_argument("--seed", type=int, default=0, help="seed for random inputs and targets (default 0)")
    w.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    w.add_argument("--html", metavar="PATH", help="write the plots and verdicts as one HTML file")
    w.add_argument("--ray", action="store_true", help="run the (width, seed) cells as Ray tasks (local ray.init())")
    w.add_argument("--ray-address", metavar="ADDR", help="run on the Ray cluster at ADDR (implies --ray)")
    w.set_defaults(func=cmd_coord_check)

    rp = sub.add_parser("replay", help="rerun a step saved by monitor(dump_on_nonfinite=DIR) and name the module, "
                                       "phase, operation and line of code of its first NaN/Inf (exit 1 when found)")
    rp.add_argument("dir", help="the folder given to monitor(..., dump_on_nonfinite=DIR)")
    rp.add_argument("--model", required=True, metavar="SPEC",
                    help="package.module:factory[:key=value,...] that builds the dumped model (its weights are "
                         "loaded from the dump)")
    rp.add_argument("--loss", metavar="SPEC", help="the loss as package.module:function, called as loss(output, "
                                                   "targets), e.g. torch.nn.functional:cross_entropy (default: the one "
                                                   "the monitor saved, if any)")
    rp.add_argument("--json", metavar="PATH", help="write the result as JSON")
    rp.set_defaults(func=cmd_replay)

    lab = sub.add_parser("lab", help="reproducible experiments")
    lsub = lab.add_subparsers(dest="lab_cmd", required=True)
    lsub.add_parser("list", help="list experiments")
    r = lsub.add_parser("run", help="run an experiment")
    r.add_argument("name")
    r.add_argument("--quick", action="store_true", help="a small subset (about a minute)")
    r.add_argument("--out", help="output folder (default: lab-out/NAME)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (JSON value), repeatable")
    lab.set_defaults(func=cmd_lab)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own errors (exit 2), --help and --version (exit 0)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    from .report.terminal import terminal_width

    out = Console(width=None if sys.stdout.isatty() and "COLUMNS" not in os.environ else terminal_width())
    err = Console(stderr=True, soft_wrap=True)  # one line per error, however long
    try:
        return int(args.func(args, out))
    except (UsageError, ValueError, FileNotFoundError, ImportError) as e:
        # bad input; anything else (TypeError included) is a bug and keeps its traceback
        err.print(f"[red]error:[/red] {escape(str(e))}", markup=True, highlight=False)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
