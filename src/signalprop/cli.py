"""The ``signalprop`` command: argument parsing and printing only.

Exit codes: 0 healthy / success, 1 problems found, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the command line: reported on stderr, exit code 2."""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.6g}"
    return "-" if v is None else str(v)


def _kv_table(title: str, d: dict[str, Any]) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("quantity", style="bold")
    t.add_column("value")
    for k, v in d.items():
        t.add_row(k, _fmt(v))
    return t


# ---- theory -----------------------------------------------------------------

def cmd_theory(args: argparse.Namespace, out: Console) -> int:
    from . import theory

    summary = theory.summarize(args.act, args.sigma_b2, args.sigma_w2)
    if args.plot:
        import numpy as np

        from .report.figures import plot_phase_diagram

        w = np.linspace(0.25, 4.0 if summary["critical_sigma_w2"] is None else
                        max(4.0, 2.5 * summary["critical_sigma_w2"]), 100)
        b = np.linspace(0.0, 0.5, 100)
        plot_phase_diagram(theory.phase_diagram(args.act, w, b), Path(args.plot))
        summary["plot"] = args.plot
    if args.json:
        from .records import _clean

        out.print_json(json.dumps(_clean(summary)))
    else:
        out.print(_kv_table(f"mean-field theory: {summary['activation']}", summary))
    return EXIT_OK


# ---- lab --------------------------------------------------------------------

def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_lab(args: argparse.Namespace, out: Console) -> int:
    from .lab import experiments, run_experiment

    if args.lab_cmd == "list":
        t = Table(title="signalprop lab")
        t.add_column("name", style="bold")
        t.add_column("what it shows")
        for name, exp in experiments().items():
            t.add_row(name, exp.summary)
        out.print(t)
        return EXIT_OK
    dest = Path(args.out or f"lab-out/{args.name}")
    from .report.progress import progress_bar

    with progress_bar(out) as bar:
        results = run_experiment(args.name, dest, quick=args.quick, progress=bar, **_parse_sets(args.set))
    out.print(f"[bold]{args.name}[/bold]: results in {dest}/results.json")
    for line in results.get("headline", []):
        out.print(f"  {line}")
    return EXIT_OK


# ---- demo -------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace, out: Console) -> int:
    from .lab import run_experiment

    dest = Path(args.out)
    r = run_experiment("sigmoid", dest / "sigmoid")
    s = r["activations"]["sigmoid"]
    out.print(f"sigmoid: largest gradient {s['max_grad']:.3g} at x = {s['argmax_x']:.2g}; "
              f"{s['grad_at_start']:.2g} at x = -8 -> vanishing through depth")
    r = run_experiment("explode", dest / "explode")["products"]
    for name, row in r.items():
        out.print(f"product of 100 4x4 {name:<12} max |entry| = {row['max_abs_entry']:.3g}")
    out.print(f"figures and numbers in {dest}/")
    return EXIT_OK


# ---- parser -----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signalprop",
        description="Keep deep networks numerically stable: diagnose, initialize, predict.",
        epilog="Exit codes: 0 healthy/success, 1 problems found, 2 usage or input error.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the main job on built-in defaults")
    d.add_argument("--out", default="demo-out", help="folder for figures, JSON and HTML (default: demo-out)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("theory", help="mean-field numbers for an activation")
    t.add_argument("act", help="activation name, e.g. tanh, relu, sigmoid, gelu, leaky_relu(0.2)")
    t.add_argument("--sigma-b2", type=float, default=0.0, help="bias variance sigma_b^2 (default 0)")
    t.add_argument("--sigma-w2", type=float, default=None,
                   help="weight variance sigma_w^2 (default: the critical value at --sigma-b2)")
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t.add_argument("--plot", metavar="PATH", help="write the order-to-chaos phase diagram as a PNG")
    t.set_defaults(func=cmd_theory)

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
    args = parser.parse_args(argv)
    out = Console(soft_wrap=True)
    err = Console(stderr=True)
    try:
        return int(args.func(args, out))
    except (UsageError, ValueError, TypeError, FileNotFoundError, ImportError) as e:
        err.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
