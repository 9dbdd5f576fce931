"""Run a grid of independent tasks: here, in this process, or on Ray.

``run_tasks(fn, tasks)`` returns ``[fn(t) for t in tasks]``, in task order.
With ``use_ray=True`` (or a ``ray_address``) each task is one Ray task
(``ray.remote(fn)``), on a local Ray started with ``ray.init()`` or on the
cluster at ``ray_address``; Ray is an optional extra (``pip install
signalprop[ray]``), imported only then.  Each task carries its own seed, and
``fn`` must be a function of its task alone, so a task computes the same
thing in any process: the results equal the serial run's.

``progress`` is the lab's two-method protocol (``start(total, description)``,
``advance(n, description=None)``, see :mod:`signalprop.report.progress`):
advanced once per finished task, in the order tasks finish.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

RAY_MISSING = ("running on Ray needs the ray package: pip install 'signalprop[ray]' (or pip install ray), "
               "or run without --ray / use_ray")


def run_tasks(fn: Callable[[T], R], tasks: Sequence[T], *, use_ray: bool = False, ray_address: str | None = None,
              progress: Any = None, description: str = "tasks", threads: int | None = None,
              cpus_per_task: float = 1.0) -> list[R]:
    """``[fn(t) for t in tasks]``, serially by default, on Ray when
    ``use_ray`` or ``ray_address`` is given (a Ray already initialized in
    this process is used as it is; otherwise ``ray.init(address=ray_address)``
    starts or joins one, and is shut down again at the end).

    ``threads``: torch's intra-op threads inside every task, here and on the
    workers alike (restored after each task).  Floating-point sums split over
    a different number of threads round differently, so results equal to the
    last bit need the same count on both sides; Ray starts its workers with
    one (``OMP_NUM_THREADS=1``)."""
    tasks = list(tasks)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive whole number or None, got {threads!r}")
    if progress is not None:
        progress.start(len(tasks), description)
    if not (use_ray or ray_address):
        out = []
        for t in tasks:
            out.append(_one(fn, threads, t))
            if progress is not None:
                progress.advance(1)
        return out
    return _on_ray(fn, threads, tasks, ray_address, progress, cpus_per_task)


def _one(fn: Callable[[T], R], threads: int | None, task: T) -> R:
    """One task, under ``threads`` torch threads when given (the same function here and on a Ray worker)."""
    if threads is None:
        return fn(task)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(task)
    finally:
        torch.set_num_threads(before)


def _on_ray(fn: Callable[[T], R], threads: int | None, tasks: list[T], address: str | None, progress: Any,
            cpus_per_task: float) -> list[R]:
    try:
        import ray
    except ImportError as e:
        raise ImportError(RAY_MISSING) from e
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    _by_value(ray, fn, tasks)
    try:
        remote: Any = ray.remote(num_cpus=cpus_per_task)(_one)
        index = {ref: i for i, ref in enumerate(remote.remote(fn, threads, t) for t in tasks)}
        results: list[Any] = [None] * len(tasks)
        pending = list(index)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                if progress is not None:
                    progress.advance(1)
        return results
    finally:
        if started:
            ray.shutdown()


# Packages a worker imports by name; any other code a task refers to (a script, a test, the user's own
# module that may not be on the workers' path) travels pickled by value.
_BY_NAME = ("signalprop", "torch", "numpy", "scipy", "mup", "ray", "functools", "builtins", "collections", "typing")


def _callables(obj: Any, depth: int = 0) -> list[Any]:
    """Functions reachable from a task: itself, its fields, a partial's function and arguments (shallow)."""
    import dataclasses
    import functools

    if depth > 2:
        return []
    out = []
    if isinstance(obj, functools.partial):
        out += _callables(obj.func, depth + 1)
        for a in (*obj.args, *obj.keywords.values()):
            out += _callables(a, depth + 1)
    elif callable(obj) and hasattr(obj, "__module__"):
        out.append(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out += _callables(getattr(obj, f.name), depth + 1)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            out += _callables(x, depth + 1)
    return out


def _by_value(ray: Any, fn: Any, tasks: list[Any]) -> None:
    import sys

    seen: set[str] = set()
    for c in _callables(fn) + [c for t in tasks[:1] for c in _callables(t)]:
        name = getattr(c, "__module__", None) or ""
        if name in seen or name.split(".")[0] in _BY_NAME or name == "__main__":
            continue
        seen.add(name)
        mod = sys.modules.get(name)
        if mod is not None:
            ray.cloudpickle.register_pickle_by_value(mod)
