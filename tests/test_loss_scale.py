"""The monitor under a ``torch.amp.GradScaler`` (``monitor(..., scaler=)``,
:mod:`signalprop.monitor.loss_scale`): routine loss-scale overflows are not
alerts, gradient statistics are the true (unscaled) ones, the update of a
step the scaler skipped is not measured, and gradients that are non-finite
at any scale are still alerted.  The oracle for "skipped" is the scaler
itself: it lowers its scale after exactly the steps it skipped."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from _faults import NanBackward
from signalprop.records import MonitorReport, MonitorStep


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))


def _batch(step):
    g = torch.Generator().manual_seed(2600 + step)
    return torch.randn(64, 32, generator=g) * 3, torch.randint(0, 10, (64,), generator=g)


def _amp_run(scaler_arg: bool, steps=40, unscale=True, every=5, **kw):
    """A float16-autocast run whose GradScaler grows its scale every 3 steps
    (``growth_interval=3`` stands in for a long run's 2000), so it overflows
    and backs off several times: routine loss scaling.  Returns the model,
    the monitor and the steps the scaler skipped (its scale fell after them)."""
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", growth_interval=3, init_scale=2.0 ** 17)
    mon = sp.monitor(model, every=every, scaler=scaler if scaler_arg else None, optimizer=opt, **kw)
    skipped = []
    for k in range(steps):
        x, y = _batch(k)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        if unscale:
            scaler.unscale_(opt)
        mon.step(loss)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < before:
            skipped.append(k)
    mon.close()
    return model, mon, skipped


def test_routine_overflows_are_listed_not_alerted():
    """With ``scaler=``: no alert over 40 steps of routine back-off, the
    skipped steps listed are exactly the scaler's (at least 3 here, or the
    test would not test), no sample judged on an overflowed step, and the
    relative update after each skipped step is not measured (None, not the
    0 of weights that did not move).  Without it the same run raises
    non-finite alerts (what the argument is for)."""
    _, mon, skipped = _amp_run(True)
    assert len(skipped) >= 3
    assert mon.alerts == []
    assert mon.scaler_skipped == skipped
    assert mon.report().scaler_skipped == tuple(skipped)
    assert f"by the GradScaler, its scaled gradients overflowing: {skipped[0]}, " in str(mon.report()).replace("\n", " ")
    for h in mon.history:
        if h.step in skipped:
            assert h.verdict == "incomplete" and "GradScaler" in h.incomplete
        else:
            assert h.verdict == "healthy"
            assert h.loss_scale is not None and h.loss_scale >= 2.0 ** 16
    for k in skipped:
        if k + 1 in mon.steps:
            assert mon.relative_updates[mon.steps.index(k + 1)] is None
    assert all(v is None or v > 0 for v in mon.relative_updates)
    _, plain, _ = _amp_run(False)
    bad = [a for a in plain.alerts if a.kind == "non-finite"]
    assert bad and "pass sp.monitor(..., scaler=scaler)" in bad[0].message


def test_the_update_after_a_skipped_step_is_measured_at_the_next():
    """every=1: a sample's update is measured over the step after it; where
    the scaler skipped that step, the update is measured over the next step
    the scaler took instead -- never 0, no update-too-small alert."""
    _, mon, skipped = _amp_run(True, steps=24, every=1)
    assert skipped
    ratios = [h for h in mon.history if h.update_ratios]
    assert ratios
    for h in ratios:
        assert all(v > 0 for _, v in h.update_ratios), h.step
    assert not any(a.kind == "update-too-small" for a in mon.alerts)


@pytest.mark.parametrize("unscale", [True, False])
def test_gradient_statistics_are_the_true_gradients(unscale):
    """float32, a scale of 2**10 (a power of two: scaling is exact) against
    the same step without a scaler: every row's gradient RMS and max, the
    parameters' gradient RMS, the output gradient and the global gradient
    norm agree to float32 rounding, whether or not ``unscale_`` ran before
    ``step``; the forward statistics are untouched."""
    reports = []
    for scaled in (False, True):
        model = _mlp(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        mon = sp.monitor(model, every=1, scaler=scaler if scaled else None)
        x, y = _batch(0)
        loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaled else loss).backward()
        if scaled and unscale:
            scaler.unscale_(opt)
        mon.step(loss)
        mon.close()
        reports.append(mon)
    a, b = reports[0].history[0], reports[1].history[0]
    assert b.loss_scale == 2.0 ** 10 and a.loss_scale is None
    assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-6)
    assert b.output_grad_rms == pytest.approx(a.output_grad_rms, rel=1e-6)
    assert len(a.layers) == len(b.layers) == 5
    for la, lb in zip(a.layers, b.layers):
        assert lb.grad_rms == pytest.approx(la.grad_rms, rel=1e-6)
        assert lb.forward_second_moment == la.forward_second_moment
        if la.param_grad_rms is not None:
            assert lb.param_grad_rms == pytest.approx(la.param_grad_rms, rel=1e-6)
        for key in ("grad_absmax",):
            if key in la.stats:
                assert lb.stats[key] == pytest.approx(la.stats[key], rel=1e-6)
    assert reports[1].grad_norms[0] == pytest.approx(reports[0].grad_norms[0], rel=1e-6)


def _scaled(steps, init_scale, loss_of, **kw):
    """SGD steps under a GradScaler starting at ``init_scale``, monitored;
    ``loss_of(k, model, x, y)``: step k's loss."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    mon = sp.monitor(model, every=100, scaler=scaler, **kw)
    for k in range(steps):
        x, y = _batch(k)
        _scaled_step(model, opt, scaler, mon, loss_of(k, model, x, y))
    mon.close()
    return mon


def _scaled_step(model, opt, scaler, mon, loss):
    """One step of a loss-scaled loop, ``mon.step`` between the backward and the scaler's step."""
    opt.zero_grad()
    scaler.scale(loss).backward()
    mon.step(loss)
    scaler.step(opt)
    scaler.update()


def test_gradients_non_finite_at_any_scale_are_alerted():
    """A NaN that only the backward makes (the loss stays finite): the scaler
    skips and halves its scale from 8 each step; the overflows above scale 1
    are routine for the monitor, the first below 1 is a non-finite alert
    that says the scale is down (4 skipped steps before it).  Every step the
    scaler skipped is listed, the alerted one too (seen at the next step,
    whose scale is lower again) and the last (seen at ``close()``)."""
    def loss_of(k, model, x, y):
        out = model(x)
        return F.cross_entropy(NanBackward.apply(out) if k >= 2 else out, y)

    mon = _scaled(8, 8.0, loss_of, grad_every=1)
    bad = [a for a in mon.alerts if a.kind == "non-finite"]
    assert len(bad) == 1 and bad[0].step == 6
    assert "scale is down to 0.5" in bad[0].message
    assert mon.scaler_skipped == [2, 3, 4, 5, 6, 7]


def test_a_non_finite_loss_is_alerted_under_a_scaler():
    """Loss scaling cannot cure a forward that overflows: a NaN in the input
    gives a non-finite loss, alerted at once with a scaler at 65536 (the
    scaler skips that step too: listed)."""
    def loss_of(k, model, x, y):
        if k == 1:
            x[0, 0] = math.nan
        return F.cross_entropy(model(x), y)

    mon = _scaled(3, 2.0 ** 16, loss_of)
    assert [a.step for a in mon.alerts if a.kind == "non-finite"] == [1]
    assert mon.scaler_skipped == [1]


def test_gradient_headroom_is_left_to_the_scaler():
    """The float16 run's gradients, scaled up to the format's limit by the
    scaler on purpose, raise no overflow-risk alert with ``scaler=``; without
    it they do (the scaler probes 65504 every few steps)."""
    _, mon, _ = _amp_run(True, steps=30, every=1)
    assert not any(a.kind == "overflow-risk" for a in mon.alerts)
    _, plain, _ = _amp_run(False, steps=30, every=1)
    assert any(a.kind == "overflow-risk" and a.phase == "backward" for a in plain.alerts)


def test_the_records_and_the_checkpoint_keep_the_scale():
    _, mon, skipped = _amp_run(True, steps=20)
    h = mon.history[1]
    assert MonitorStep.from_dict(h.to_dict()).loss_scale == h.loss_scale
    assert mon.report().to_dict()["scaler_skipped"] == skipped
    fresh = sp.monitor(_mlp(), every=5)
    fresh.load_state_dict(mon.state_dict())
    assert fresh.scaler_skipped == skipped
    fresh.close()
    assert isinstance(mon.report(), MonitorReport)


def test_scaler_argument_is_checked():
    with pytest.raises(TypeError, match="GradScaler"):
        sp.monitor(_mlp(), scaler=object())


def test_the_headroom_rule_skips_gradients_of_a_scaled_sample():
    """The rule itself: a gradient 1/2 of float16's largest value is within
    the 16x headroom (an overflow-risk alert) in a sample without a loss
    scale; in a sample under a GradScaler (``loss_scale`` set) the scaler
    owns that range and only the output's headroom is judged."""
    from signalprop.monitor.alerts import overflow_alerts
    from signalprop.probe.rows import _BLANK
    from signalprop.records import evolve

    layer = evolve(_BLANK, name="fc", kind="Linear", stats={"grad_absmax": 32752.0, "forward_absmax": 1.0})
    plain = MonitorStep(0, 1.0, "healthy", (layer,), (), 1.0)
    assert [a.phase for a in overflow_alerts(plain, 65504.0)] == ["backward"]
    assert overflow_alerts(evolve(plain, loss_scale=1.0), 65504.0) == []
    loud = evolve(layer, stats={"grad_absmax": 32752.0, "forward_absmax": 32752.0})
    assert [a.phase for a in overflow_alerts(MonitorStep(0, 1.0, "healthy", (loud,), (), 1.0, loss_scale=1.0),
                                             65504.0)] == ["forward"]


def test_two_optimizers_on_one_scaler_only_one_unscaled():
    """The AMP recipe for several optimizers: one scaler; the loop unscales
    the first optimizer's gradients (to clip them) and not the second's
    before ``mon.step``.  Given ``optimizer=`` the first, the monitor divides
    only the others' by the scale: the gradient norm and the last layer's
    parameter-gradient RMS equal the true ones (computed from ``.grad`` and
    the scale by hand); the previous version was 1024x off (the scale)."""
    model = _mlp()
    opt1 = torch.optim.SGD(model[0].parameters(), lr=1e-2)
    opt2 = torch.optim.SGD([p for m in list(model)[1:] for p in m.parameters()], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    mon = sp.monitor(model, every=1, scaler=scaler, optimizer=opt1)
    for k in range(3):
        x, y = _batch(k)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        opt1.zero_grad()
        opt2.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt1)
        s = scaler.get_scale()
        true = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model[0].parameters())
                         + sum(float(p.grad.double().square().sum()) / s ** 2 for p in opt2.param_groups[0]["params"]))
        last = math.sqrt(float(torch.cat([p.grad.double().flatten() for p in model[4].parameters()])
                               .square().mean())) / s
        mon.step(loss)
        assert mon.grad_norms[-1] == pytest.approx(true, rel=1e-5)
        assert mon.history[-1].layers[-1].param_grad_rms == pytest.approx(last, rel=1e-5)
        scaler.step(opt1)
        scaler.step(opt2)
        scaler.update()
    mon.close()


def test_a_scaler_shared_by_two_models_lists_only_their_own_skips():
    """A GAN whose G and D share one scaler (as the AMP docs show): the scale
    falls when D's step is skipped, but G's step ran -- G's monitor lists
    none of D's skips (its weights moved), D's lists exactly the scaler's
    skips of D's optimizer (the oracle: its per-optimizer found_inf)."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 16))
    D = nn.Sequential(nn.Linear(16, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    oG, oD = torch.optim.Adam(G.parameters(), 2e-3), torch.optim.Adam(D.parameters(), 2e-3)
    sc = torch.amp.GradScaler("cpu", growth_interval=2, init_scale=2.0 ** 14)
    mD, mG = sp.monitor(D, every=4, scaler=sc), sp.monitor(G, every=4, scaler=sc)
    bce = nn.BCEWithLogitsLoss()
    skipped: dict[str, list[int]] = {"D": [], "G": []}

    def step(name, opt, mon, loss, k):
        sc.scale(loss).backward()
        mon.step(loss)
        sc.step(opt)
        if sum(float(v) for v in sc._per_optimizer_states[id(opt)]["found_inf_per_device"].values()):
            skipped[name].append(k)

    for k in range(30):
        g = torch.Generator().manual_seed(k)
        real, z = torch.randn(64, 16, generator=g) * 30 + 2, torch.randn(64, 8, generator=g)
        oD.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            fake = G(z)
            lD = bce(D(real), torch.ones(64, 1)) + bce(D(fake.detach()), torch.zeros(64, 1))
        step("D", oD, mD, lD, k)
        oG.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            lG = bce(D(fake), torch.ones(64, 1))
        step("G", oG, mG, lG, k)
        sc.update()
    mD.close()
    mG.close()
    assert len(skipped["D"]) >= 3 and skipped["G"] == []
    assert mG.scaler_skipped == []
    assert mD.scaler_skipped == skipped["D"]
    assert mD.alerts == [] and mG.alerts == []


def test_a_resumed_monitor_sees_a_skip_just_before_the_checkpoint():
    """The scale the last step read is kept with the monitor's state: a run
    resumed right after a step the scaler skipped (its gradients were not
    read there) lists that step, as the uninterrupted run does."""
    def run(stop=None, state=None, steps=16):
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", growth_interval=3, init_scale=2.0 ** 17)
        mon = sp.monitor(model, every=50, scaler=scaler, grad_every=50)
        for k in range(steps):
            if k == stop:  # resume: a new monitor (the model, optimizer and scaler carry on)
                state = mon.state_dict()
                mon.close()
                mon = sp.monitor(model, every=50, scaler=scaler, grad_every=50)
                mon.load_state_dict(state)
            x, y = _batch(k)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            _scaled_step(model, opt, scaler, mon, loss)
        mon.close()
        return mon

    whole = run()
    assert whole.scaler_skipped
    k = whole.scaler_skipped[0]
    assert run(stop=k + 1).scaler_skipped == whole.scaler_skipped


class _Writer:
    """What a SummaryWriter is asked to write: scalars by tag."""

    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def add_text(self, tag, text, step):
        pass


def test_tensorboard_and_html_show_the_scale_and_the_skips():
    """The scale each step read (``signalprop/loss_scale``) and a 1 at each
    step the scaler skipped (``signalprop/scaler_skipped``, at that step's
    number) go to the writer; the HTML report lists the skipped steps and
    says why a sample has no verdict (it showed neither)."""
    from signalprop.report.monitor_html import render_monitor_html

    w = _Writer()
    _, mon, skipped = _amp_run(True, steps=30, writer=w, histograms=False)
    assert [s for s, _ in w.scalars["signalprop/scaler_skipped"]] == skipped
    scales = dict(w.scalars["signalprop/loss_scale"])
    assert len(scales) == 30 and all(v >= 2.0 ** 16 for v in scales.values())
    assert all(scales[k + 1] == scales[k] / 2 for k in skipped if k + 1 in scales)
    page = render_monitor_html(mon.report())
    assert "Optimizer steps skipped" in page and ", ".join(map(str, skipped)) in page
    assert "GradScaler&#x27;s scaled gradients overflowed" in page or all(h.step not in skipped for h in mon.history)
