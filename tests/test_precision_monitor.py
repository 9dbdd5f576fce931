"""The monitor's low-precision headroom alerts: a float16 run (CPU autocast, no
loss scaling) whose read-out grows toward 65504 is warned about, naming the
module, well before its first inf; the same run in float32 is not; and the
trend rule's conditions, one at a time, on synthetic samples."""

import math

import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.monitor.precision_alerts import precision_alerts, trend_alerts
from signalprop.records import LayerStats, MonitorStep

LEAD = 10  # steps: the early-warning benchmark's bar for "ahead"


def _regression_run(half: bool, steps: int = 200):
    """An MLP regressing targets in raw units (a teacher's outputs x 1e5),
    Adam at 1e-2 on the MSE / 1e10: its outputs grow steadily past float16's
    65504 (measured: the loss turns inf near step 80 in float16; float32 trains on)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    first_bad = None
    with sp.monitor(model, every=10) as mon:
        for step in range(steps):
            x = torch.randn(128, 32, generator=g)
            with torch.no_grad():
                t = teacher(x) * 1e5
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
