"""Per-layer histograms and the custom-scalars layout, read back with
TensorBoard's own reader (issue 28)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.monitor.histograms import BINS, SAMPLE, histograms, stride_for, strided_sample

EVERY = 2
LEAVES = ("0", "1", "2", "3", "4")
PARAMS = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def _train(model, writer, steps=6, batch=32, loss_of=None, **kw):
    """SGD steps under the monitor (``loss_of(model, x, y)``, cross-entropy by
    default); the weights before each step, as the test's own record."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = []
    with sp.monitor(model, every=EVERY, writer=writer, **kw) as mon:
        for _ in range(steps):
            x, y = torch.randn(batch, 8, generator=g), torch.randint(0, 2, (batch,), generator=g)
            loss = F.cross_entropy(model(x), y) if loss_of is None else loss_of(model, x, y)
            opt.zero_grad()
            loss.backward()
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
            mon.step(loss)
            opt.step()
    weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return mon, weights


def _read(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"histograms": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_histograms_read_back_with_tensorboards_reader(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    _, weights = _train(_mlp(), writer)
    writer.close()
    acc = _read(tmp_path)
    tags = set(acc.Tags()["histograms"])
    want = {f"signalprop/{q}/{n}" for q in ("activation", "activation_grad") for n in LEAVES} | \
        {f"signalprop/{q}/{n}" for q in ("weight", "grad", "update") for n in PARAMS}
    assert want <= tags, sorted(want - tags)
    for tag in want:  # sampled steps only; the last sample's update is written at close
        events = acc.Histograms(tag)
        assert [e.step for e in events] == [0, 2, 4], tag
        for e in events:
            h = e.histogram_value
            assert sum(h.bucket) == h.num > 0 and len(h.bucket) == len(h.bucket_limit) == BINS + 1
            assert h.min <= h.max and list(h.bucket_limit) == sorted(h.bucket_limit)
            assert h.bucket_limit[-1] == pytest.approx(h.max, rel=1e-5, abs=1e-6)
    # plausible values: tanh's outputs in (-1, 1), ReLU's >= 0, 32 x 32 outputs kept whole
    for e in acc.Histograms("signalprop/activation/1"):
        h = e.histogram_value
        assert -1 < h.min < 0 < h.max < 1 and h.num == 32 * 32
    assert all(e.histogram_value.min == 0 for e in acc.Histograms("signalprop/activation/3"))
    # the weights and their updates against the test's own copies (256 entries: sampled whole)
    for e in acc.Histograms("signalprop/weight/0.weight"):
        w = weights[e.step]["0.weight"]
        h = e.histogram_value
        assert (h.min, h.max, h.num) == pytest.approx((w.min().item(), w.max().item(), 256), rel=1e-6)
        assert h.sum_squares == pytest.approx(w.square().sum().item(), rel=1e-5)
    for e in acc.Histograms("signalprop/update/2.weight"):
        d = weights[e.step + 1]["2.weight"] - weights[e.step]["2.weight"]  # the sampled step's optimizer step
        h = e.histogram_value
        assert h.sum == pytest.approx(d.sum().item(), rel=1e-4, abs=1e-7)
        assert h.sum_squares == pytest.approx(d.square().sum().item(), rel=1e-4)
        assert h.sum_squares > 0



def test_records_carry_c_checksums_equal_to_tensorboards_own(tmp_path):
    """The writer given to the monitor frames its records with google-crc32c
    (TensorBoard's pure-Python checksum cost ~0.2 of a step at each sample
    of a 100-layer MLP): byte for byte what TensorBoard's own RecordWriter
    writes (the oracle), read back by TensorBoard's reader, which checks
    every record's checksum; a writer not given to signalprop is untouched."""
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter
    from torch.utils.tensorboard import SummaryWriter

    from signalprop.integrations import tensorboard as sptb

    g = torch.Generator().manual_seed(0)
    for n in (0, 3, 8, 100, 70_001):
        payload = bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
        ours, theirs = io.BytesIO(), io.BytesIO()
        RecordWriter(theirs).write(payload)
        sptb._write_record(ours, payload)
        assert ours.getvalue() == theirs.getvalue(), n

    writer, other = SummaryWriter(str(tmp_path / "a")), SummaryWriter(str(tmp_path / "b"))
    _train(_mlp(), writer)
    records = [w._get_file_writer().event_writer._async_writer._writer for w in (writer, other)]
    assert "write" in vars(records[0]) and "write" not in vars(records[1])
    other.add_scalar("x", 1.0, 0)
    writer.close()
    other.close()
    acc = _read(tmp_path / "a")
    assert [e.step for e in acc.Histograms("signalprop/weight/0.weight")] == [0, 2, 4]
    assert [e.step for e in acc.Scalars("signalprop/loss")] == list(range(6))
    assert [e.value for e in _read(tmp_path / "b").Scalars("x")] == [1.0]

def test_custom_scalars_layout_has_one_chart_per_statistic_with_every_layer(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    _train(_mlp(), writer, steps=3)
    writer.close()
    acc = _read(tmp_path)
    configs = acc.Tensors("custom_scalars__config__")
    assert len(configs) == 1  # written once per writer
    lay = layout_pb2.Layout()
    lay.ParseFromString(configs[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in lay.category for c in cat.chart}
    scalars = acc.Tags()["scalars"]
    for q in ("grad_rms", "relative_grad_rms", "forward_second_moment", "dead_fraction", "loss"):
        assert q in charts, sorted(charts)
        hits = [t for t in scalars if any(re.search(rx, t) for rx in charts[q])]
        if q == "loss":
            assert hits == ["signalprop/loss"]
            continue
        # the chart's series: exactly the statistic's tags, one per layer
        assert sorted(hits) == sorted(t for t in scalars if t.startswith(f"signalprop/{q}/")) and hits
    assert {t.rsplit("/", 1)[1] for t in scalars if t.startswith("signalprop/grad_rms/")} == set(LEAVES)
    assert not [t for t in scalars if re.search(charts["grad_rms"][0], t) and "relative" in t]


def test_the_monitor_with_histograms_leaves_training_as_it_was(tmp_path):
    """Same weights and the same global RNG state with and without the
    monitor and its histograms; the model uses dropout, which draws from it."""
    from torch.utils.tensorboard import SummaryWriter

    def run(writer):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 2))
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = sp.monitor(model, every=EVERY, writer=writer) if writer is not None else None
        for _ in range(5):
            loss = F.cross_entropy(model(torch.randn(16, 8, generator=g)), torch.randint(0, 2, (16,), generator=g))
            opt.zero_grad()
            loss.backward()
            if mon is not None:
                mon.step(loss)
            opt.step()
        if mon is not None:
            assert mon._histograms is not None
            mon.close()
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()

    writer = SummaryWriter(str(tmp_path))
    (w1, r1), (w0, r0) = run(writer), run(None)
    writer.close()
    assert torch.equal(r1, r0)
    assert all(torch.equal(a, b) for a, b in zip(w1, w0))


def test_unsampled_steps_carry_no_histogram_hook(tmp_path):
    """Between samples no global module hook is installed; during a sampled
    forward one is, and it is gone after it."""
    from torch.nn.modules import module as M
    from torch.utils.tensorboard import SummaryWriter

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(len(M._global_forward_hooks))
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Probe(), nn.Linear(8, 1))
    base = len(M._global_forward_hooks)
    writer = SummaryWriter(str(tmp_path))
    with sp.monitor(model, every=3, writer=writer, update_ratio=False) as mon:
        for _ in range(4):
            loss = model(torch.randn(8, 4)).square().mean()
            loss.backward()
            mon.step(loss)
        assert len(M._global_forward_hooks) == base
    writer.close()
    # step 0 and 3: the recorder's hook and the histograms'; steps 1, 2: none of either
    assert seen[1] == seen[2] == base and seen[0] == seen[3] > base + 1


def test_histograms_off_and_writers_without_histograms(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    _train(_mlp(), writer, steps=3, histograms=False)
    writer.close()
    assert not _read(tmp_path).Tags()["histograms"]

    class ScalarsOnly:  # a writer with add_scalar and add_text only: scalars, no histograms, no error
        def __init__(self):
            self.tags = set()

        def add_scalar(self, tag, v, step):
            self.tags.add(tag)

        def add_text(self, tag, text, step):
            pass

    w = ScalarsOnly()
    mon, _ = _train(_mlp(), w, steps=3)
    assert mon._histograms is None and "signalprop/grad_rms/0" in w.tags
    with pytest.raises(TypeError, match="histograms must be True or False"):
        sp.monitor(_mlp(), histograms="yes")


def test_strided_sample_is_bounded_and_reaches_every_column():
    t = torch.arange(1024 * 64, dtype=torch.float32).reshape(1024, 64)
    s = strided_sample(t)
    k = stride_for(t.numel(), 64)
    # 65536 / 1024 = 64 would read column 0 only: bumped to 65, coprime to 64; ceil(65536 / 65) = 1009 entries
    assert k == 65 and s.numel() == 1009 <= SAMPLE and math.gcd(k, 64) == 1
    assert set((s.long() % 64).tolist()) == set(range(64))  # every unit appears
    assert torch.equal(s, t.reshape(-1)[::k][:SAMPLE])
    small = torch.randn(10, 3)
    assert torch.equal(strided_sample(small), small.reshape(-1))
    nc = torch.randn(64, 80).t()  # non-contiguous
    assert torch.equal(strided_sample(nc), nc.reshape(-1)[::stride_for(nc.numel(), 64)][:SAMPLE])


def test_histograms_match_numpy_and_drop_non_finite_values():
    """The batched computation against numpy's histogram of each sample
    (equal-width buckets over [min, max]), with NaN/Inf left out."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g)
    b = torch.rand(37, generator=g) * 5 + 2
    c = torch.tensor([3.0, float("nan"), float("inf"), 3.0])  # one finite value, twice
    d = torch.tensor([float("nan")])
    ha, hb, hc, hd = histograms([a, b, c, d])
    for h, v in ((ha, a.numpy()), (hb, b.numpy())):
        counts, edges = np.histogram(v, bins=BINS)
        assert list(h.bucket_counts[1:]) == counts.tolist()
        assert np.allclose(h.bucket_limits, edges, rtol=1e-6, atol=1e-6)
        assert (h.min, h.max, h.num) == pytest.approx((v.min(), v.max(), v.size))
        assert h.sum == pytest.approx(float(v.sum()), rel=1e-5, abs=1e-4)
    assert hc.num == 2 and hc.min == hc.max == 3.0 and sum(hc.bucket_counts) == 2
    assert hd is None


class _Gen(nn.Sequential):
    pass


def test_monitors_sharing_a_writer_keep_their_own_series(tmp_path):
    """Two open monitors on one SummaryWriter (a GAN's G and D): each writes
    its own section -- the second, without tag=, under signalprop.<model
    class>/ with a warning that says so -- so their losses and same-named
    layers ("0", "2", ...) do not share series; tag= names a section, a tag
    another open monitor uses is refused, and a closed monitor frees its
    section. Oracle: each model's own losses, kept by the loop."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    torch.manual_seed(0)
    g_model, d_model = _Gen(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2)), _mlp()
    g = torch.Generator().manual_seed(1)
    losses: dict[str, list[float]] = {"G": [], "D": []}
    mon_g = sp.monitor(g_model, every=2, writer=writer)
    with pytest.warns(UserWarning, match=r"this one's tags start signalprop\.Sequential/"):
        mon_d = sp.monitor(d_model, every=2, writer=writer)
    with pytest.raises(ValueError, match="own tag="):
        sp.monitor(nn.Linear(2, 2), writer=writer, tag="Sequential")
    with pytest.raises(ValueError, match="tag takes a name"):
        sp.monitor(nn.Linear(2, 2), writer=writer, tag="a/b")
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in (("G", g_model), ("D", d_model))}
    for _ in range(4):
        for k, m, mon in (("G", g_model, mon_g), ("D", d_model, mon_d)):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 2, (16,), generator=g)
            loss = F.cross_entropy(m(x), y)
            opts[k].zero_grad()
            loss.backward()
            mon.step(loss)
            opts[k].step()
            losses[k].append(loss.item())
    mon_g.close()
    mon_d.close()
    with sp.monitor(nn.Linear(2, 2), writer=writer, tag="probe") as mon_t:  # a tag names the section
        assert mon_t.writer.root == "signalprop.probe/"
    mon_again = sp.monitor(d_model, writer=writer)  # both closed: signalprop/ is free again, no warning
    mon_again.close()
    writer.close()
    acc = _read(tmp_path)
    for tag, want in (("signalprop/loss", losses["G"]), ("signalprop.Sequential/loss", losses["D"])):
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx(want, rel=1e-6), tag
    assert [e.step for e in acc.Histograms("signalprop.Sequential/weight/0.weight")] == [0, 2]
    assert [e.step for e in acc.Histograms("signalprop/weight/0.weight")] == [0, 2]
    assert {t.split("/")[0] for t in acc.Tags()["scalars"]} == {"signalprop", "signalprop.Sequential"}


class _HistogramWriter:
    """A writer that draws histograms: each ``add_histogram_raw`` call kept as (tag, step, max)."""

    def __init__(self):
        self.hist = []

    def add_scalar(self, tag, v, step):
        pass

    def add_text(self, tag, text, step):
        pass

    def add_histogram_raw(self, tag, min, max, num, sum, sum_squares, bucket_limits, bucket_counts, global_step):
        self.hist.append((tag, global_step, max))


def test_a_samples_histograms_are_written_at_the_next_step_as_they_were_at_its_mon_step():
    """The sampled step only takes its samples; their histograms are written
    at the next ``mon.step`` (or at ``close``), so the sampled step does not
    also pay for them.  The gradients are sampled as ``mon.step`` saw them:
    clipped in place after it, the histogram still shows the unclipped
    values (a view read one step later would show the clipped ones)."""
    model = _mlp()
    w = _HistogramWriter()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}
    with sp.monitor(model, every=EVERY, writer=w, update_ratio=False) as mon:
        for step in range(3):
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 2, (32,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            seen[step] = float(model[4].weight.grad.max())
            mon.step(loss)
            written = {k for _, k, _ in w.hist}
            if step == 0:  # the sampled step: nothing written yet
                assert not written
            if step == 1:
                assert written == {0}
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
        assert {k for _, k, _ in w.hist} == {0}  # step 2 is sampled: written at close
    assert {k for _, k, _ in w.hist} == {0, 2}
    for k in (0, 2):
        grad_max = [m for tag, s, m in w.hist if tag == "signalprop/grad/4.weight" and s == k]
        # 4.weight has 64 entries: sampled whole, so its histogram's max is the gradient's max
        assert grad_max == [pytest.approx(seen[k], rel=1e-6)]


class _VmapInside(nn.Module):
    """A forward that maps its first layer over the batch with ``torch.vmap``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.vmap(lambda r: torch.tanh(self.fc(r)))(x))


def _jacobian_penalty(model, x, y):
    """A Jacobian penalty through the model inside ``torch.func`` before the training forward."""
    params = dict(model.named_parameters())
    jac = torch.func.vmap(torch.func.jacrev(lambda xi: torch.func.functional_call(model, params, (xi,))))(x[:4])
    return F.cross_entropy(model(x), y) + 1e-3 * jac.square().sum()


@pytest.mark.parametrize("case", ["vmap inside forward", "jacobian penalty"])
def test_calls_inside_torch_func_leave_the_samples_histograms_written(tmp_path, case):
    """A module called inside a ``torch.func`` transform puts out the
    transform's wrapper tensor: sampled, it failed when the histograms were
    computed, and every histogram of the sample was lost with a warning.
    Those calls are not sampled (as the monitor's rows leave them out); the
    training forward's are."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = _VmapInside() if case == "vmap inside forward" else _mlp()
    writer = SummaryWriter(str(tmp_path))
    _train(model, writer, steps=4, batch=16, loss_of=None if case == "vmap inside forward" else _jacobian_penalty)
    writer.close()
    tags = set(_read(tmp_path).Tags()["histograms"])
    leaves, params = (("out",), ("fc.weight", "out.weight")) if case == "vmap inside forward" else (LEAVES, PARAMS)
    want = {f"signalprop/{q}/{n}" for q in ("activation", "activation_grad") for n in leaves} | \
        {f"signalprop/{q}/{n}" for q in ("weight", "grad", "update") for n in params}
    assert want <= tags, sorted(want - tags)
    if case == "vmap inside forward":  # the mapped layer's per-example views: not sampled
        assert "signalprop/activation/fc" not in tags


def test_complex_parameters_are_left_out_of_the_histograms(tmp_path):
    """A complex-valued layer's weights, gradients and updates get no
    histogram (as its complex outputs get none): casting them to real lost
    their imaginary part, with torch's warning (an error under this suite's
    filter: the sample's histograms were lost)."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=torch.cfloat), nn.Linear(16, 2, dtype=torch.cfloat))
    writer = SummaryWriter(str(tmp_path))
    mon, _ = _train(model, writer, steps=4, batch=16,
                    loss_of=lambda m, x, y: F.cross_entropy(m(x.to(torch.cfloat)).abs(), y))
    writer.close()
    assert not _read(tmp_path).Tags()["histograms"]
    assert [h.step for h in mon.history] == [0, 2]


def test_a_module_replaced_mid_run_is_drawn_with_its_own_values(tmp_path):
    """A head replaced between two samples (fine-tuning onto new classes):
    the histograms after it are of the new head's weights and activations.
    The tap's module and parameter lists were read once, when the monitor
    started: the old head's weights kept being drawn under the name, and the
    new head's outputs never."""
    from torch.utils.tensorboard import SummaryWriter

    model = _mlp()
    writer = SummaryWriter(str(tmp_path))
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sp.monitor(model, every=EVERY, writer=writer) as mon:
        for k in range(6):
            if k == 3:
                model[4] = nn.Linear(32, 2)
                nn.init.constant_(model[4].weight, 5.0)  # far from anything the old head held
                opt.add_param_group({"params": model[4].parameters()})
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 2, (32,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    writer.close()
    acc = _read(tmp_path)
    weight = {e.step: e.histogram_value for e in acc.Histograms("signalprop/weight/4.weight")}
    assert weight[2].max < 1 and weight[4].min > 4  # the old head at step 2, the new one at step 4
    assert [e.step for e in acc.Histograms("signalprop/activation/4")] == [0, 2, 4]
    assert [e.step for e in acc.Histograms("signalprop/update/4.weight")] == [0, 2, 4]


@pytest.mark.parametrize("extra", [1, 2])
def test_forwards_after_the_training_one_that_get_no_gradient_are_not_drawn(extra):
    """The training forward, then ``extra`` passes of the model with
    gradients on whose outputs get none (a target on inputs 100x larger, a
    metric's pass): the activation histograms are the training pass's, as the
    monitor's sample is -- the previous version drew the last pass's
    activations beside the training pass's gradients (its gradient hooks
    wrote into the same dict)."""
    def run(passes):
        model = _mlp()
        w = _HistogramWriter()
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with sp.monitor(model, every=EVERY, writer=w) as mon:
            for _ in range(3):
                x, y = torch.randn(32, 8, generator=g), torch.randint(0, 2, (32,), generator=g)
                out = model(x)
                for k in range(passes):
                    model(x * 100.0 * (k + 1)).detach()
                loss = F.cross_entropy(out, y)
                opt.zero_grad()
                loss.backward()
                mon.step(loss)
                opt.step()
        assert all(not h.incomplete for h in mon.history)
        return sorted(w.hist)

    assert run(extra) == run(0)
