"""check and monitor under torch.distributed: 2 CPU ranks on gloo, DDP and FSDP2.

The oracle is one process on the concatenated batch (the training objective
of DDP and FSDP2 is the mean of the ranks' losses, which with equal halves
and a mean-reduced loss is the loss on the whole batch).  Forward second
moments, saturation, dead shares, max |value| of outputs and gradients (the largest
on any rank; a gradient divided by the world size) and gradient RMS (activations and
parameters, sharded ones included) must agree within 1e-4 relative: the
sums are the same numbers added in another order in float32 (~1e-7
relative), so 1e-4 leaves room for that and nothing else -- an unscaled
activation gradient is off by 2x, a per-rank dead share by 50%.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import signalprop as sp
import signalprop.statistics as S

WORLD = 2
BATCH = 64  # 32 per rank: dead shares are reported from 32 samples per unit on
STEPS = 5
EVERY = 2
REL = 1e-4


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    with torch.no_grad():
        # unit 0 reads only feature 0, which is positive in the second half of
        # the batch only: dead on rank 0's half, alive on rank 1's -- alive overall
        m[0].weight[0].zero_()
        m[0].weight[0, 0] = 1.0
        m[0].bias[0] = 0.0
        m[0].bias[1:4] = -50.0  # dead everywhere
        m[2].weight.mul_(4.0)  # push the tanh into saturation
    return m


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 6, generator=g)
    x[:, 0] = x[:, 0].abs() * torch.where(torch.arange(BATCH) < BATCH // 2, -1.0, 1.0)
    return x, torch.randn(BATCH, 3, generator=g)


LAYER_FIELDS = ("forward_second_moment", "grad_rms", "param_grad_rms", "saturation", "dead_fraction", "forward_absmax",
                "grad_absmax")


def _layers(layers) -> list[dict]:
    return [{"name": layer.name, **{f: getattr(layer, f) for f in LAYER_FIELDS}} for layer in layers]


def _history(mon) -> dict:
    return {"steps": [h.step for h in mon.history], "losses": mon.losses, "grad_norms": mon.grad_norms,
            "layers": [_layers(h.layers) for h in mon.history],
            "updates": [list(h.update_ratios or ()) for h in mon.history],
            "relative_updates": mon.relative_updates, "alerts": [str(a) for a in mon.alerts]}


class _Gain(nn.Module):
    """A (1, 3) gain: its first dimension is smaller than the world, so under
    FSDP2 one rank's shard of it is empty."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.full((1, 3), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.g


def _train(model: nn.Module, mon, shard: slice) -> list[int]:
    """STEPS steps of SGD; returns the number of all-reduce calls made by
    each ``mon.step``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    counts = []
    for k in range(STEPS):
        x, y = _data(k)
        loss = nn.functional.mse_loss(model(x[shard]), y[shard])
        opt.zero_grad()
        loss.backward()
        before = _CALLS["all_reduce"]
        mon.step(loss)
        counts.append(_CALLS["all_reduce"] - before)
        opt.step()
    mon.close()
    return counts


_CALLS = {"all_reduce": 0}


class _NaNOnOneRank(nn.Module):
    """Identity, except that it turns rank 1's activations to NaN when armed."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank, self.armed = rank, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan") if self.armed and self.rank == 1 else x


class _AfterTheRows(nn.Module):
    """Layers, then the model's own code: on rank 1 the output is made after
    the last layer (a NaN in it when ``nan``), on rank 0 it is the last
    layer's output itself -- which rank's output a row measured differs."""

    def __init__(self, rank: int, nan: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.rank, self.nan = rank, nan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if self.rank == 1:
            y = y + torch.where(torch.arange(3) == 0, float("nan") if self.nan else 0.0, 0.0)
        return y


def _after_the_rows(rank: int, shard: slice, nan: bool) -> str:
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _data(0)
    r = sp.check(DDP(_AfterTheRows(rank, nan)), x[shard],
                 loss_fn=lambda out: nn.functional.mse_loss(out.nan_to_num(), y[shard]))
    return f"{r.verdict}|{r.problems[0].layer if r.problems else ''}"


def _planted_nan(model: nn.Module, boom: _NaNOnOneRank, shard: slice) -> list[str]:
    mon = sp.monitor(model, every=EVERY, grad_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for k in range(4):
        boom.armed = k == 3
        x, y = _data(k)
        loss = nn.functional.mse_loss(model(x[shard]), y[shard])
        opt.zero_grad()
        loss.backward()
        mon.step(loss)
        opt.step()
    mon.close()
    return [f"{a.step}|{a.layer}|{a.phase}" for a in mon.alerts if a.kind == "non-finite"]


def _exits_without_teardown(rank: int, target, *args) -> None:
    """Run a spawned rank's work, then leave by os._exit once it has returned.

    torch's own teardown race: after destroy_process_group() a gloo worker
    thread can still be joinable when the interpreter's static destructors
    run, and the process aborts ("terminate called without an active
    exception", SIGABRT) after its work and results are complete -- ~1 run
    in 10 under load, with or without signalprop (pytorch/pytorch#179291
    discusses it).  A rank whose work raised still exits the normal way, so
    spawn reports its traceback."""
    import sys

    target(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Reduction.gather's values of every form (floats, 0-d tensors of two dtypes, entries of batch vectors, rows
# of a matrix, an empty tensor) and every kind, different on each rank: (value on rank r, kind)
GATHER_CASES = [
    (lambda r: 3.0 + r, S.SUM), (lambda r: torch.tensor(2.0 + r), S.NORM), (lambda r: torch.tensor(1.0 + r), S.MEAN),
    (lambda r: torch.tensor(4.0 * (r + 1), dtype=torch.float64), S.GRAD_SQ), (lambda r: float(r), S.ANY),
    (lambda r: torch.tensor([1.0 - r, 0.0, 2.0]), S.ANY), (lambda r: torch.tensor(5.0 - 4 * r), S.MAX),
    (lambda r: torch.tensor(5.0 - 4 * r), S.MIN), (lambda r: torch.tensor(6.0 + r), S.GRAD_MAX),
    (lambda r: torch.tensor(6.0 + r), S.GRAD_MIN), (lambda r: torch.tensor(3.0), S.REPLICA_NORM),
    (lambda r: torch.tensor(1.0 + r), S.SHARD_NORM), (lambda r: torch.tensor(2.0 * (r + 1)), S.GRAD_NORM),
    (lambda r: torch.zeros(0), S.SUM),
    # a NaN on the second rank, after a number: NaN, as one process's amax/amin over both ranks' data
    (lambda r: torch.tensor(1.0 if r == 0 else math.nan), S.MAX),
    (lambda r: torch.tensor(1.0 if r == 0 else math.nan), S.MIN),
]


def _gather_kinds(rank: int) -> list[float]:
    from signalprop.probe.distributed import Reduction
    from signalprop.probe.stats import Part

    values: list = []
    vec = torch.tensor([10.0 + rank, 20.0 + rank, 30.0 + rank])  # a batch vector: its entries as Parts
    mat = torch.tensor([[1.0, 2.0], [3.0 + rank, 4.0]])
    for make, _ in GATHER_CASES:
        values.append(make(rank))
    values += [Part(vec, 2), Part(vec, 0), Part(mat, 1)]
    kinds = [k for _, k in GATHER_CASES] + [S.SUM, S.NORM, S.MAX]
    return Reduction(torch.distributed.group.WORLD).gather(values, kinds)


# the cases of one value each (a float or a one-entry tensor): few enough to be packed one by one
FEW_CASES = [i for i, (make, _) in enumerate(GATHER_CASES) if not isinstance(v := make(0), torch.Tensor) or v.numel() == 1]


def _gather_few(rank: int) -> dict:
    """The single-valued cases gathered as a step that is not sampled hands
    them (packed one by one), and whether that buffer is the one the general
    packing lays out, entry for entry."""
    from signalprop.probe.distributed import FEW, Reduction

    values = [GATHER_CASES[i][0](rank) for i in FEW_CASES]
    kinds = [GATHER_CASES[i][1] for i in FEW_CASES]
    assert len(values) <= FEW
    red = Reduction(torch.distributed.group.WORLD)
    few, general = red._pack_few(values, kinds), red._pack(values, kinds)
    assert few is not None
    return {"values": red.gather(values, kinds), "same_buffer": few[1] == general[1] and few[0].shape == general[0].shape
            and torch.allclose(few[0], general[0], rtol=0, atol=0, equal_nan=True)}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    real = dist.all_reduce

    def counting(*a, **k):  # signalprop's own collectives (DDP's reducer calls C++ directly)
        _CALLS["all_reduce"] += 1
        return real(*a, **k)

    dist.all_reduce = counting
    torch.set_num_threads(1)
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    res: dict = {}
    try:
        # check: a DDP wrapper, a plain replica, an FSDP2-sharded model
        x, y = _data(0)
        ddp = DDP(_model())
        res["check_ddp"] = _layers(sp.check(ddp, x[half], loss_fn=nn.functional.mse_loss, targets=y[half]).layers)
        res["check_ddp_grads_none"] = all(p.grad is None for p in ddp.parameters())
        res["check_plain"] = _layers(sp.check(_model(), x[half], loss_fn=nn.functional.mse_loss,
                                              targets=y[half]).layers)
        fs = _model()
        for m in fs:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(fs)
        res["check_fsdp"] = _layers(sp.check(fs, x[half], loss_fn=nn.functional.mse_loss, targets=y[half]).layers)
        before = _CALLS["all_reduce"]
        sp.check(_model(), x[half])  # random cotangent, plain replica: one for the gradients, one for the stats
        res["check_calls"] = _CALLS["all_reduce"] - before
        # monitor: DDP and FSDP2 training
        ddp = DDP(_model())
        mon = sp.monitor(ddp, every=EVERY, grad_every=1)
        res["mon_ddp_calls"] = _train(ddp, mon, half)
        res["mon_ddp"] = _history(mon)
        fs = _model()
        for m in fs:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(fs)
        mon = sp.monitor(fs, every=EVERY, grad_every=1)
        res["mon_fsdp_calls"] = _train(fs, mon, half)
        res["mon_fsdp"] = _history(mon)
        # a parameter whose shard is empty on one rank: the same values go to the all-reduce on both
        fs = _model()
        fs.append(_Gain())
        for m in fs:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(fs)
        res["empty_shard_local"] = fs[-1].g.to_local().numel()
        mon = sp.monitor(fs, every=EVERY, grad_every=1)
        _train(fs, mon, half)
        res["mon_fsdp_gain"] = _history(mon)
        # a NaN from rank 1's data only: both ranks name the same step, module and phase
        for key in ("nan_ddp", "nan_fsdp"):
            m = _model()
            boom = _NaNOnOneRank(rank)
            m.insert(3, boom)
            if key == "nan_ddp":
                model: nn.Module = DDP(m)
            else:
                for sub in m:
                    if isinstance(sub, nn.Linear):
                        fully_shard(sub)
                model = fully_shard(m)
            res[key] = _planted_nan(model, boom, half)
        # the output's largest entry where no row measured it: on both ranks alike, a NaN on rank 1 seen by both
        res["after_rows"] = [_after_the_rows(rank, half, nan) for nan in (False, True)]
        res["gather_kinds"] = _gather_kinds(rank)
        res["gather_few"] = _gather_few(rank)
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
        # rank 0 hosts the rendezvous store: nobody leaves before everyone has finished with it
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_exits_without_teardown, args=(_worker, port, str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _close(a, b, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, f"{what}: {a} vs {b}"
        return
    assert math.isclose(a, b, rel_tol=REL, abs_tol=1e-12), f"{what}: {a} vs {b} (one process)"


def _same_layers(got: list[dict], want: list[dict], what: str) -> None:
    assert [layer["name"] for layer in got] == [layer["name"] for layer in want], what
    for g, w in zip(got, want):
        for f in LAYER_FIELDS:
            _close(g[f], w[f], f"{what} {g['name']} {f}")


def _reference_check() -> list[dict]:
    x, y = _data(0)
    return _layers(sp.check(_model(), x, loss_fn=nn.functional.mse_loss, targets=y).layers)


def test_check_equals_one_process_on_the_whole_batch(ranks):
    want = _reference_check()
    dead = next(layer for layer in want if layer["name"] == "1")["dead_fraction"]
    assert dead == pytest.approx(3 / 32)  # units 1-3 dead, unit 0 alive thanks to rank 1's half only
    for r, res in enumerate(ranks):
        for key in ("check_ddp", "check_plain", "check_fsdp"):
            _same_layers(res[key], want, f"rank {r} {key}")
    assert all(res["check_ddp_grads_none"] for res in ranks)  # .grad left as it was
    assert all(res["check_calls"] == 2 for res in ranks)


def test_monitor_history_equals_one_process_and_every_rank_agrees(ranks):
    ref_model = _model()
    mon = sp.monitor(ref_model, every=EVERY, grad_every=1)
    _CALLS["all_reduce"] = 0
    _train(ref_model, mon, slice(None))
    want = _history(mon)
    for key in ("mon_ddp", "mon_fsdp"):
        got = [res[key] for res in ranks]
        assert got[0] == got[1], f"{key}: ranks disagree"  # identical, not merely close
        h = got[0]
        assert h["steps"] == want["steps"] == [0, 2, 4]
        for k, (a, b) in enumerate(zip(h["losses"], want["losses"])):
            _close(a, b, f"{key} loss at step {k}")
        for k, (a, b) in enumerate(zip(h["grad_norms"], want["grad_norms"])):
            _close(a, b, f"{key} gradient norm at step {k}")
        for s, (g, w) in enumerate(zip(h["layers"], want["layers"])):
            _same_layers(g, w, f"{key} sample {s}")
        for g, w in zip(h["updates"], want["updates"]):
            assert [n for n, _ in g] == [n for n, _ in w]
            for (n, a), (_, b) in zip(g, w):
                _close(a, b, f"{key} update ratio {n}")
        # the relative update of every step: each tensor here is read whole, so the shards' norms add up exactly
        assert h["relative_updates"][0] is None and len(h["relative_updates"]) == STEPS
        for k, (a, b) in enumerate(zip(h["relative_updates"], want["relative_updates"])):
            _close(a, b, f"{key} relative update at step {k}")


def test_an_empty_shard_on_one_rank_does_not_break_the_reduction(ranks):
    """FSDP2 with a (1, 3) gain on 2 ranks: rank 1 holds none of it.  Both
    ranks still send the same values to the one all-reduce per step (the
    previous version raised on the empty shard there, dropped the relative
    update on that rank only, and gloo aborted on the size mismatch), and
    the run equals one process on the whole batch."""
    assert sorted(res["empty_shard_local"] for res in ranks) == [0, 3]
    ref = _model()
    ref.append(_Gain())
    mon = sp.monitor(ref, every=EVERY, grad_every=1)
    _train(ref, mon, slice(None))
    want = _history(mon)
    got = [res["mon_fsdp_gain"] for res in ranks]
    assert got[0] == got[1]
    for k, (a, b) in enumerate(zip(got[0]["relative_updates"], want["relative_updates"])):
        _close(a, b, f"relative update at step {k}")
    for k, (a, b) in enumerate(zip(got[0]["losses"], want["losses"])):
        _close(a, b, f"loss at step {k}")


def test_nan_on_one_rank_is_named_alike_on_every_rank(ranks):
    for key in ("nan_ddp", "nan_fsdp"):
        assert [res[key] for res in ranks] == [["3|3|forward"]] * WORLD, key


def test_an_output_made_after_the_rows_on_one_rank_only(ranks):
    """check reads the output's largest entry where no row measured it (the
    model's own code after its last layer); which rank's output that is may
    differ (here rank 1's only): the all-reduce got an extra value from that
    rank alone and gloo aborted the process, and a NaN there on rank 1 was
    dropped by the maximum over ranks (both called the model healthy, where
    one process on rank 1's half names the root)."""
    for r, res in enumerate(ranks):
        assert res["after_rows"] == ["healthy|", "non-finite|(root)"], (r, res["after_rows"])


def test_the_reduction_combines_every_form_of_value_by_its_kind(ranks):
    """Each kind's rule from the module docstring, worked by hand over the two
    ranks' values (rank r's in GATHER_CASES), for values handed as floats,
    0-d tensors, entries of a batch vector and a row of a matrix."""
    w = WORLD
    want = [3 + 4, math.sqrt(2**2 + 3**2), (1 + 2) / w, (4 + 8) / w**2, 1, 2, 5, 1, 7 / w, 6 / w,
            math.sqrt((9 + 9) / w), math.sqrt(1 + 4), math.sqrt(4 + 16) / w, 0.0, math.nan, math.nan,
            30 + 31, math.sqrt(10**2 + 11**2), 4.0]
    for res in ranks:
        assert res["gather_kinds"] == pytest.approx(want, rel=1e-12, nan_ok=True)
        # a few single values (a step that is not sampled) are packed one by one: the same buffer, the same values
        assert res["gather_few"]["same_buffer"]
        assert res["gather_few"]["values"] == pytest.approx([want[i] for i in FEW_CASES], rel=1e-12, nan_ok=True)


def test_one_all_reduce_per_step(ranks):
    for res in ranks:
        assert res["mon_ddp_calls"] == [1] * STEPS
        assert res["mon_fsdp_calls"] == [1] * STEPS


def test_readme_torchrun_example_runs_on_two_ranks(tmp_path):
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    script = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if b.startswith("# train_ddp.py"))
    (tmp_path / "train_ddp.py").write_text(script)
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", str(port), "train_ddp.py"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        done = "rank 0: healthy" in run.stdout and "rank 1: healthy" in run.stdout
        # the user's script ends the normal way, so torch's teardown race (see
        # _exits_without_teardown) can abort it after both ranks finished: only that is run again
        if run.returncode == 0 or not (done and "terminate called without an active exception" in run.stderr):
            break
    assert run.returncode == 0, run.stderr[-2000:]
    assert done


def _single_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    real = dist.all_reduce

    def counting(*a, **k):
        _CALLS["all_reduce"] += 1
        return real(*a, **k)

    dist.all_reduce = counting
    try:
        res = {}
        for key, group in (("default", None), ("explicit", dist.group.WORLD)):
            model = _model()
            mon = sp.monitor(model, every=EVERY, grad_every=1, group=group)
            _CALLS["all_reduce"] = 0
            res[key + "_calls"] = _train(model, mon, slice(None))
            res[key] = _history(mon)
    finally:
        dist.destroy_process_group()
    Path(out, "single.json").write_text(json.dumps(res))


def test_a_group_passed_explicitly_is_reduced_over_even_with_one_rank(tmp_path):
    """group=None on a one-rank world measures locally (no collective); an
    explicit group= is used as given (how benchmarks/device_check.py times the
    NCCL path on one GPU), and gives the same numbers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_exits_without_teardown, args=(_single_rank, port, str(tmp_path)), nprocs=1, join=True)
    res = json.loads((tmp_path / "single.json").read_text())
    assert res["default_calls"] == [0] * STEPS and res["explicit_calls"] == [1] * STEPS
    for a, b in zip(res["default"]["grad_norms"], res["explicit"]["grad_norms"]):
        _close(a, b, "gradient norm")
    for g, w in zip(res["explicit"]["layers"], res["default"]["layers"]):
        _same_layers(g, w, "one rank")
