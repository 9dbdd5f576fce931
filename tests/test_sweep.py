"""signalprop.sweep.run_tasks: serial by default, on a local Ray with the same results."""

import sys

import pytest
import torch

import signalprop as sp
from signalprop.lab.gpt import gpt, token_batch
from signalprop.lab.schoenholz import QUICK, SchoenholzConfig, cells, train_cell
from signalprop.sweep import run_tasks


class Recorder:
    """The progress protocol, remembered."""

    def __init__(self):
        self.calls = []

    def start(self, total, description=""):
        self.calls.append(("start", total, description))

    def advance(self, n=1, description=None):
        self.calls.append(("advance", n))


def test_serial_is_the_plain_loop_in_order_with_progress():
    bar = Recorder()
    assert run_tasks(abs, [-3, 1, -2], progress=bar, description="abs") == [3, 1, 2]
    assert bar.calls == [("start", 3, "abs"), ("advance", 1), ("advance", 1), ("advance", 1)]


def test_threads_per_task_restored():
    before = torch.get_num_threads()
    seen = run_tasks(lambda _: torch.get_num_threads(), [0, 1], threads=1)
    assert seen == [1, 1] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive whole number or None, got 0"):
        run_tasks(abs, [1], threads=0)


def test_without_ray_installed_the_error_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'signalprop\[ray\]'"):
        run_tasks(abs, [1], use_ray=True)


def _gpt_sp(width):
    return gpt(width, "sp", seq=8)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")  # in the test extra: installed by `make test`, so this never skips there
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_results_equal_the_serial_runs(local_ray, tmp_path):
    # a coordinate check: 3 widths x 2 seeds as 6 Ray tasks, one torch thread each as in the serial run
    data = token_batch(batch=2, seq=8)
    opt = sp.width.optimizer("adam", 1e-2)
    serial = sp.coord_check(_gpt_sp, [32, 64, 128], data, opt, steps=2, seeds=2, threads=1)
    bar = Recorder()
    remote = sp.coord_check(_gpt_sp, [32, 64, 128], data, opt, steps=2, seeds=2, threads=1, use_ray=True,
                            progress=bar)
    a, b = serial.to_dict(), remote.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b  # every value to the last bit, the verdicts with them
    assert bar.calls[0] == ("start", 6, "coordinate check") and bar.calls.count(("advance", 1)) == 6
    # the lab's new experiment: its quick grid's cells
    tasks = cells(SchoenholzConfig(**{**QUICK, "steps": 20}))

    def untimed(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert untimed(run_tasks(train_cell, tasks, use_ray=True, threads=1)) == untimed(run_tasks(train_cell, tasks,
                                                                                               threads=1))
    # the lab's depth sweep: the same cells on Ray as serially
    from signalprop.lab import run_experiment

    small = {"depths": [4, 8], "acts": ["tanh"], "inits": ["default", "critical"], "steps": 15, "lr_scale": [1.0],
             "residual_blocks": 0, "threads": 1}
    a = run_experiment("depth", tmp_path / "serial", **small)["cells"]
    b = run_experiment("depth", tmp_path / "ray", use_ray=True, **small)["cells"]

    def untimed_cells(rows):
        return [{k: ([{q: u for q, u in x.items() if q != "seconds"} for x in v] if k == "runs" else v)
                 for k, v in r.items() if k != "check_seconds"} for r in rows]
    assert len(a) == 4 and untimed_cells(a) == untimed_cells(b)
    assert local_ray.is_initialized()  # a Ray the caller started is left running
