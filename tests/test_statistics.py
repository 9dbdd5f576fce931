"""Statistics declared once (signalprop.statistics): the per-row maximum
|value| of outputs and gradients against hooks on the same pass (the
oracle), and a statistic added by its declaration and kernel alone reaching
LayerStats, JSON, the monitor, TensorBoard and the HTML report."""

import json
import math

import pytest
import torch
from torch import nn

import signalprop as sp
from _hooks import leaf_outputs_and_grads
from signalprop import statistics as ST
from signalprop.lab.models import DeepMLP


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width,batch", [(16, 8), (512, 256)])  # rows measured in a batch / each in place
def test_abs_max_equals_the_largest_entry_of_each_output_and_gradient(dtype, width, batch):
    """max |y| and max |dL/dy| per row equal torch's own max over the tensors
    the same pass produced, exactly: a maximum involves no rounding (the
    bf16 value is widened to float32 exactly).  Not measured on tanh's
    output, whose range bounds it."""
    torch.manual_seed(0)
    m = DeepMLP(4, width, "tanh", width, 10).to(dtype)
    x = torch.randn(batch, width).to(dtype)
    r = sp.check(m, x)
    outs, grads = leaf_outputs_and_grads(m, x)
    for layer in r.layers:
        if layer.kind == "Tanh":  # a bounded activation's range answers it (|y| <= 1): not measured
            assert layer.forward_absmax is None and outs[layer.name].abs().max() <= 1
        else:
            assert layer.forward_absmax == outs[layer.name].abs().max().float().item(), layer.name
        assert layer.grad_absmax == grads[layer.name].abs().max().float().item(), layer.name
        assert layer.to_dict()["forward_absmax"] == layer.forward_absmax


def test_abs_max_of_a_pass_with_nan_is_over_the_finite_entries():
    """After a NaN the pass is repeated on finite entries only: the maximum
    is the largest finite |y|, as the moments are over finite entries."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3))
    x = torch.randn(12, 6)
    x[3, 2] = math.nan
    r = sp.check(m, x)
    outs, _ = leaf_outputs_and_grads(m, x)
    for layer in r.layers:
        y = outs[layer.name]
        assert layer.nonfinite_fraction > 0
        assert layer.forward_absmax == pytest.approx(y[torch.isfinite(y)].abs().max().item(), rel=1e-6)


def _mean_abs_kernel(t, dim):
    return t.abs().sum(dim=dim, dtype=torch.float64)


@pytest.fixture
def mean_abs():
    """mean |y|, mup's coordinate-check quantity: a sum per row (its raw
    value, added across ranks) over the row's number of entries."""
    st = ST.register(ST.Statistic(
        "forward_mean_abs", "forward", "value", "mean |y| of the output's entries",
        (("forward_mean_abs", ST.SUM),), lambda d: d["forward_mean_abs"] / d["forward_n"], "forward_mean_abs",
        "mean |y|", tensorboard=True, kernel=_mean_abs_kernel))
    yield st
    ST.unregister(st.name)


class _Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[(tag, step)] = value

    def add_text(self, tag, text, step):
        pass


def test_a_statistic_is_one_declaration_and_its_kernel(mean_abs, tmp_path):
    """Declared with register() and nothing else: check measures it on rows
    measured in a batch and in place, in the exact pass after a NaN, the
    monitor's samples carry it, TensorBoard gets a tag per layer and the
    HTML table a column; removed again, it is gone."""
    torch.manual_seed(0)
    narrow = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))  # batched rows
    wide = nn.Sequential(nn.Linear(8, 600), nn.ReLU(), nn.Linear(600, 4))   # 64 x 600 rows: in place
    for m in (narrow, wide):
        x = torch.randn(64, 8)
        r = sp.check(m, x)
        outs, _ = leaf_outputs_and_grads(m, x)
        for layer in r.layers:
            want = outs[layer.name].abs().double().mean().item()
            assert layer.forward_mean_abs == pytest.approx(want, rel=1e-12)
            assert layer.stats["forward_mean_abs"] == layer.forward_mean_abs
            assert json.loads(r.to_json())["layers"][layer.index]["forward_mean_abs"] == pytest.approx(want, rel=1e-12)
    x = torch.randn(64, 8)
    x[0, 0] = math.inf
    exact = sp.check(narrow, x)
    assert exact.layers[0].forward_mean_abs is not None and math.isfinite(exact.layers[0].forward_mean_abs)

    w = _Writer()
    opt = torch.optim.SGD(narrow.parameters(), lr=0.01)
    with sp.monitor(narrow, every=1, writer=w) as mon:
        for _ in range(2):
            loss = narrow(torch.randn(32, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    assert all(layer.forward_mean_abs > 0 for h in mon.history for layer in h.layers)
    assert ("signalprop/forward_mean_abs/0", 1) in w.scalars
    page = tmp_path / "r.html"
    r.save_html(page)
    assert "mean |y|" in page.read_text()

    ST.unregister(mean_abs.name)
    try:
        assert "forward_mean_abs" not in sp.check(narrow, torch.randn(4, 8)).layers[0].to_dict()
    finally:
        ST.register(mean_abs)  # the fixture removes it


def test_register_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="already declared"):
        ST.register(ST.BY_NAME["forward_absmax"])
    with pytest.raises(ValueError, match="no kernel"):
        ST.register(ST.Statistic("x_stat", "forward", "v", "m", (("x_raw", ST.SUM),), lambda d: 0.0, "x_raw", "x"))
    with pytest.raises(ValueError, match="unknown reduction"):
        ST.Statistic("y_stat", "forward", "v", "m", (("y_raw", "median"),), lambda d: 0.0, "y_raw", "y")
    with pytest.raises(ValueError, match="built-in ones stay"):
        ST.unregister("grad_rms")


def test_every_raw_value_the_kernels_write_is_declared():
    """The distributed reduction reads the declarations: a raw value a kernel
    writes without one would be summed across ranks by default, silently
    wrong for a norm or a maximum."""
    torch.manual_seed(0)
    from signalprop.probe.recorder import Recorder

    for m, x in ((DeepMLP(3, 8, "relu", 8, 4), torch.randn(40, 8)),
                 (nn.Sequential(nn.Linear(8, 600), nn.Tanh()), torch.randn(64, 8))):
        rec = Recorder(m)
        rec.attach()
        y = m(x)
        rec.detach()
        y.backward(torch.ones_like(y))
        keys = {k for r in rec.rows for k in (*r.fwd, *r.bwd)}
        keys |= {k for _, vecs in rec.batched() for k in vecs}
        declared = {k for s in ST.STATISTICS for k, _ in s.parts}
        assert keys <= declared, keys - declared


def test_overflows_names_the_rows_that_would_not_fit_a_format():
    """A Linear whose outputs reach ~1e5 overflows float16 (65504) and
    float8 e4m3 (448) but fits bfloat16; its gradient, scaled by the loss,
    overflows where the loss is large.  Read off max |value|, so the listed
    rows are exactly those whose max exceeds the limit (the oracle: the
    hooked tensors' own max)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        m[0].weight.mul_(1e5)
    x = torch.randn(32, 8)
    r = sp.check(m, x, loss_fn=lambda out: out.square().sum())
    outs, grads = leaf_outputs_and_grads(m, x)
    for dtype, limit in (("float16", 65504.0), ("float8_e4m3fn", 448.0), ("bfloat16", 3.39e38)):
        want = {(n, "output") for n, y in outs.items() if y.abs().max() > limit}
        got = {(o.layer, o.quantity) for o in r.overflows(dtype) if o.quantity == "output"}
        assert got == want, dtype
    assert {o.layer for o in r.overflows("float16")} >= {"0", "1"} and not r.overflows("bfloat16")
    assert all(o.factor > 1 for o in r.overflows("float16"))
    assert len(r.overflows("float16", headroom=1e6)) >= len(r.overflows("float16"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        r.overflows("int8")
