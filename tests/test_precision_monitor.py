"""The monitor's low-precision headroom alerts: a float16 run (CPU autocast, no
loss scaling) whose read-out grows toward 65504 is warned about, naming the
module, well before its first inf; the same run in float32 is not; and the
trend rule's conditions, one at a time, on synthetic samples."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.monitor.precision_alerts import precision_alerts, trend_alerts
from signalprop.records import LayerStats, MonitorStep

LEAD = 10  # steps: the early-warning benchmark's bar for "ahead"


def _regression_run(half: bool, steps: int = 200, model=None, lr: float = 1e-2, scale: float = 1e5, every: int = 10,
                    out: list | None = None):
    """An MLP regressing targets in raw units (a teacher's outputs x 1e5),
    Adam at 1e-2 on the MSE / 1e10: its outputs grow steadily past float16's
    65504 (measured: the loss turns inf near step 80 in float16; float32 trains on).
    ``model``, ``lr``, ``scale``: another model, rate and target scale."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    if model is None:
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    first_bad = None
    with sp.monitor(model, every=every) as mon:
        for step in range(steps):
            x = torch.randn(128, 32, generator=g)
            with torch.no_grad():
                t = teacher(x) * scale
            with torch.autocast("cpu", dtype=torch.float16, enabled=half):
                y = model(x)
            loss = F.mse_loss(y.float(), t) / 1e10
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
            if not math.isfinite(loss.item()):
                first_bad = step
                break
    if out is not None:
        out.append(mon)
    return first_bad, list(mon.alerts)


def test_float16_overflow_is_named_before_the_first_inf():
    """The property, not the step: the float16 run turns non-finite, the
    monitor locates the inf in a module, and an overflow-risk alert naming
    that module came at least LEAD steps before; the float32 run (no
    low-precision format) stays finite with no overflow-risk alert."""
    bad, alerts = _regression_run(half=True)
    assert bad is not None
    origin = next(a.layer for a in alerts if a.kind == "non-finite")
    risk = [a for a in alerts if a.kind == "overflow-risk" and a.layer == origin]
    assert risk and bad - risk[0].step >= LEAD, (bad, [(a.step, a.kind, a.layer) for a in alerts])
    assert "65504" in risk[0].message and risk[0].phase == "forward"
    bad32, alerts32 = _regression_run(half=False, steps=bad + 1)
    assert bad32 is None and not [a for a in alerts32 if a.kind == "overflow-risk"]


def _sample(step, values):
    layers = tuple(LayerStats(i, name, "Linear", 1, (), 0.0, 0.0, 0.0, 0.0, 1.0, stats={"forward_absmax": v})
                   for i, (name, v) in enumerate(values.items()))
    return MonitorStep(step, 1.0, "healthy", layers, (), 1.0)


def test_trend_rule_extrapolates_growth_relative_to_the_layers_own_baseline():
    """Every 10 steps: "a" doubles each sample from 1 (baseline 2), "b" sits
    at 3000 (11 binades below, large by design), "c" doubles but from 1e-3.
    The trend alert comes for "a" once, at its rate, it would reach 65504
    within two intervals (log2(65504 / 2^k) <= 2 doublings: k >= 14); the
    absolute bound (within 16x) fires from k = 12 (65504 / 4096 < 16); b and
    c never alert; a float32 run (no format) and bfloat16 (3.4e38) get none."""
    hist = []
    first = {}
    for k in range(17):
        s = _sample(10 * k, {"a": 2.0 ** k, "b": 3000.0 * (1 + 0.01 * (-1) ** k), "c": 1e-3 * 2.0 ** k})
        for a in trend_alerts(s, hist, 65504.0, "float16"):
            first.setdefault(("trend", a.layer), k)
        for a in precision_alerts(s, hist, "float16"):
            first.setdefault(("any", a.layer), k)
        hist.append(s)
    assert first[("trend", "a")] == 14 and ("trend", "b") not in first and ("trend", "c") not in first
    assert first[("any", "a")] == 12 and ("any", "b") not in first and ("any", "c") not in first
    assert precision_alerts(s, hist, None) == [] and precision_alerts(s, hist, "bfloat16") == []


def test_trend_rule_needs_steady_growth():
    """Growth over the last two intervals (1 -> 8 -> 4000: about 7 steps to
    65504 at that rate) is alerted; once the value fell back (4000 -> 3000
    -> 3500, not growing on each interval) it is not extrapolated."""
    vals = [1.0, 1.0, 1.0, 8.0, 4000.0, 3000.0, 3500.0]
    hist = []
    got = []
    for k, v in enumerate(vals):
        s = _sample(10 * k, {"a": v})
        if trend_alerts(s, hist, 65504.0, "float16"):
            got.append(k)
        hist.append(s)
    assert got == [4]


class _Residual(nn.Module):
    """Residual blocks whose stream h + block(h) is summed in this forward:
    a tensor no module outputs (each block's Linear reads it)."""

    def __init__(self, width=64, blocks=3):
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(blocks))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def test_input_made_by_a_parents_own_code_is_measured():
    """input_absmax is measured on the rows whose input no row wrote (here the
    residual sums read by blocks 1 and 2 and by the read-out), equal to the
    sum's largest |entry|, and on no row that reads a module's output; by
    check when a format is asked for (the monitor always: its headroom
    alerts read it), not on check's plain pass."""
    torch.manual_seed(0)
    model = _Residual()
    x = torch.randn(16, 32)
    assert all("input_absmax" not in lay.stats for lay in sp.check(model, x).layers)
    r = sp.check(model, x, dtype="float16")
    got = {lay.name: lay.stats.get("input_absmax") for lay in r.layers}
    assert {n for n, v in got.items() if v is not None} == {"blocks.1.0", "blocks.2.0", "out"}
    with torch.no_grad():
        h = model.inp(x)
        h = h + model.blocks[0](h)
    assert got["blocks.1.0"] == pytest.approx(float(h.abs().max()), rel=1e-6)


def test_float16_overflow_after_a_residual_sum_is_located_and_named_first():
    """A residual MLP regressing raw-unit targets: the read-out, whose input is
    the stream summed in the root's own forward, overflows float16.  The inf
    is located at that module (its input was finite: the row's own operation
    made it, not the root's code), and an overflow-risk alert named it at
    least LEAD steps before.  (Before, the exact pass blamed the root's code
    for any NaN after an unrecorded operation.)"""
    torch.manual_seed(0)
    bad, alerts = _regression_run(half=True, steps=400, model=_Residual(), lr=3e-3, scale=3e5)
    seen = [(a.step, a.kind, a.layer) for a in alerts]
    assert bad is not None, seen
    origin = next(a.layer for a in alerts if a.kind == "non-finite")
    assert origin == "out", seen
    risk = [a for a in alerts if a.kind == "overflow-risk" and a.layer == origin]
    assert risk and bad - risk[0].step >= LEAD, seen


def test_sampling_follows_the_risk_when_growth_outruns_the_samples():
    """Sampled one step in 25, a residual net's float16 read-out overflows
    a few samples in, growing faster than the samples can follow (measured:
    with regular sampling alone, no alert came before the inf, near step 74).
    A sample that finds a module within 12 binades of 65504 and doubled since
    the last sample makes the monitor sample every step for the next 25; the
    trend rule then names the module before the first inf.  The float32 run
    is sampled only one step in 25."""
    torch.manual_seed(0)
    mons: list = []
    bad, alerts = _regression_run(half=True, steps=400, model=_Residual(), lr=3e-3, scale=3e5, every=25, out=mons)
    seen = [(a.step, a.kind, a.layer) for a in alerts]
    assert bad is not None, seen
    origin = next(a.layer for a in alerts if a.kind == "non-finite")
    risk = [a for a in alerts if a.kind == "overflow-risk" and a.layer == origin]
    assert risk and risk[0].step < bad, seen
    sampled = [h.step for h in mons[0].history]
    dense = [b for a, b in zip(sampled, sampled[1:]) if b - a == 1]
    assert dense and any(s % 25 for s in sampled), sampled
    torch.manual_seed(0)
    mons32: list = []
    _regression_run(half=False, steps=bad + 1, model=_Residual(), lr=3e-3, scale=3e5, every=25, out=mons32)
    assert all(h.step % 25 == 0 for h in mons32[0].history)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eval_pass", [False, True])
def test_largest_values_are_measured_where_a_low_precision_format_computes(dtype, eval_pass):
    """max |y| and max |dL/dy| (the overflow rules' input) on every sample of a
    run whose training forward computes in a low-precision format (here
    autocast's), decided when that forward starts; a float32 run leaves them
    out, since no rule reads them there.  ``eval_pass``: a float32 forward
    with gradients on and no backward before every training forward (an
    evaluation pass outside autocast) changes neither.  check measures them
    always.  The first Linear's value is compared with the oracle, torch's
    max over that layer's output in the training forward."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    seen = []  # the oracle: the first Linear's largest |output| entry in each training forward
    hook = m[0].register_forward_hook(
        lambda mod, args, out: seen.append(out.detach().abs().max().float().item()) if out.shape[0] == 64 else None)
    with sp.monitor(m, every=2) as mon:
        for _ in range(6):
            if eval_pass:
                m(x[:8])  # float32, gradients on, never backpropagated
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = m(x).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    hook.remove()
    measured = [h.layers[0].forward_absmax for h in mon.history]
    assert [h.step for h in mon.history] == [0, 2, 4]
    if dtype is None:
        assert measured == [None, None, None]
        assert all(layer.grad_absmax is None for h in mon.history for layer in h.layers)
    else:
        assert measured == [seen[0], seen[2], seen[4]]
        assert all(h.layers[0].grad_absmax > 0 for h in mon.history)
    assert sp.check(m, x).layers[0].forward_absmax is not None
