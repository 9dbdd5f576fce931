"""signalprop.check: known pathologies, theory beside measurement, guarantees, module kinds."""

import collections
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.lab.models import DeepMLP


def mlp(depth, width, act, init, n_in=None, gen=0):
    torch.manual_seed(gen)
    m = DeepMLP(depth, width, act, n_in or width, 10)
    if init != "default":
        sp.init.apply_(m, init, generator=torch.Generator().manual_seed(gen))
    return m


def x_of(n, d, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---- known cases --------------------------------------------------------------

def test_sigmoid_naive_normal_explodes_and_saturates():
    r = sp.check(mlp(50, 256, "sigmoid", "normal"), x_of(64, 256))
    kinds = {p.kind for p in r.problems}
    assert r.verdict == "exploding" and {"exploding", "saturated"} <= kinds
    sat = next(p for p in r.problems if p.kind == "saturated")
    assert "Sigmoid" in sat.message and sat.suggestion


def test_relu_xavier_vanishes_like_two_to_the_minus_depth():
    """Xavier on square ReLU layers halves the gradient's mean square per layer:
    the first/last ratio of gradient RMS is ~ 2^(-(L-2)/2); within a factor 10."""
    r = sp.check(mlp(50, 256, "relu", "xavier_normal"), x_of(64, 256))
    assert r.verdict == "vanishing"
    ratio = r.summary.first_last_grad_ratio
    expected = 2 ** (-(49 - 1) / 2)  # 48 hidden-to-hidden steps between the first and last hidden layer
    assert expected / 10 < ratio < expected * 10
    assert "kaiming_normal_" in r.problems[0].suggestion


def test_tanh_xavier_is_healthy():
    r = sp.check(mlp(50, 256, "tanh", "xavier_normal"), x_of(64, 256))
    assert r.verdict == "healthy" and not r.problems
    assert all(layer.verdict == "healthy" for layer in r.layers)


def test_trend_catches_vanishing_within_bounds():
    # 20 ReLU layers with Xavier: ~2^-9 between first and last, inside [1e-6, 1e3] everywhere
    r = sp.check(mlp(20, 256, "relu", "xavier_normal"), x_of(64, 256))
    assert r.verdict == "vanishing"
    assert any("The gradient vanishes in layers" in p.message and "repeated Linear layers" in p.message
               and "shrinks" in p.message for p in r.problems)


class NaNAt(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_nan_origin_is_named():
    m = mlp(10, 32, "tanh", "xavier_normal")
    m[7] = nn.Sequential(m[7], NaNAt())  # layer "7.1" produces NaN
    r = sp.check(m, x_of(16, 32))
    assert r.verdict == "non-finite"
    assert r.problems[0].layer == "7.1" and "NaNAt #7.1" in r.problems[0].message


def test_nan_in_input_is_named():
    x = x_of(16, 32)
    x[3, 5] = float("inf")
    r = sp.check(mlp(4, 32, "tanh", "xavier_normal"), x)
    assert r.problems[0].layer == "input" and r.verdict == "non-finite"
    x = x_of(512, 32)
    x[3, 5] = float("inf")
    r = sp.check(mlp(4, 32, "tanh", "xavier_normal"), x)
    assert "0.0061% of its values are NaN/Inf" in r.problems[0].message  # 1 of 16,384, not rounded to 0.0%


def test_input_statistics_over_its_finite_entries():
    """The input's record: mean and second moment over its finite entries,
    the share of the others -- the fast pass reads the input as it is and
    leaves a non-finite one to the exact pass, which masks it."""
    m = mlp(3, 16, "tanh", "xavier_normal")
    x = x_of(64, 16) + 0.5
    for bad in ([], [(0, 0, float("nan")), (5, 3, float("inf")), (9, 9, -float("inf"))]):
        x = x.clone()
        for i, j, v in bad:
            x[i, j] = v
        inp = sp.check(m, x).summary.input
        ok = x[torch.isfinite(x)].double()
        assert inp.nonfinite_fraction == pytest.approx(len(bad) / x.numel(), abs=1e-12)
        assert inp.mean == pytest.approx(float(ok.mean()), rel=1e-5)
        assert inp.second_moment == pytest.approx(float(ok.square().mean()), rel=1e-5)
        assert inp.width == 16


class SqrtAtZero(nn.Module):
    def forward(self, x):
        return torch.sqrt(x.abs() * 0)  # finite forward, infinite derivative


def test_backward_nan_origin():
    m = nn.Sequential(nn.Linear(8, 8), SqrtAtZero(), nn.Linear(8, 8))
    r = sp.check(m, x_of(4, 8))
    assert r.verdict == "non-finite"
    assert "gradient first turns non-finite" in r.problems[0].message


def test_dead_relu_from_negative_bias():
    m = mlp(6, 64, "relu", "kaiming_normal")
    with torch.no_grad():
        m[4].bias.fill_(-100.0)
    r = sp.check(m, x_of(32, 64))
    dead = [p for p in r.problems if p.kind == "dead"]
    assert dead and dead[0].layer.startswith("5")
    assert r.layers[5].dead_fraction == 1.0


def test_measured_second_moments_match_theory():
    """Wide random tanh MLP (width 1024): each Linear row's measured E[h^2]
    within 15% of theory.propagate (finite-width noise ~ sqrt(2/n) per
    layer, carried along; one net)."""
    m = mlp(10, 1024, "tanh", "kaiming_normal")
    r = sp.check(m, x_of(128, 1024))
    assert r.summary.theory
    rows = [layer for layer in r.layers if layer.predicted_second_moment is not None]
    assert len(rows) == len(r.layers)
    for layer in rows:
        assert layer.forward_second_moment == pytest.approx(layer.predicted_second_moment, rel=0.15), layer.name
    for layer in rows[:-1]:
        assert layer.grad_rms == pytest.approx(layer.predicted_grad_rms, rel=0.25), layer.name


# ---- guarantees -----------------------------------------------------------------

class Messy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.3)
        self.frozen = nn.Linear(32, 32)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(32, 4)
        self.fail = False

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.fc(x))))
        h = self.frozen(h)
        if self.fail:
            h = h @ torch.ones(5, 5)  # shape mismatch, halfway through
        return self.out(h)


def _snapshot(m):
    return ({k: v.clone() for k, v in m.state_dict().items()},
            {n: (None if p.grad is None else p.grad.clone()) for n, p in m.named_parameters()},
            {n: p.requires_grad for n, p in m.named_parameters()},
            {n: mod.training for n, mod in m.named_modules()},
            torch.get_rng_state().clone())


def _same(a, b):
    sa, ga, ra, ma, rng_a = a
    sb, gb, rb, mb, rng_b = b
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all((ga[k] is None and gb[k] is None) or torch.equal(ga[k], gb[k]) for k in ga)
    assert ra == rb and ma == mb and torch.equal(rng_a, rng_b)


def _no_hooks(m):
    from torch.nn.modules import module as M

    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert not M._global_forward_hooks and not M._global_forward_pre_hooks  # check's own hooks are global


def _rows_of(r, name):
    return [layer for layer in r.layers if layer.name == name]


class _Functional(nn.Module):
    """Calls tanh as a function: the pass runs with functional capture."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("functional", [False, True])
def test_a_leaf_with_its_own_output_hook_is_measured_after_it(functional):
    """check's forward hooks are torch's global ones, which run before a
    module's own; a leaf whose own hook replaces its output (here x3) must be
    measured on the output that flows on, and its gradient taken there: the
    second moment 9x the unhooked one's, the gradient autograd's with respect to it
    (the original output's is 3x that)."""
    torch.manual_seed(0)
    m = _Functional() if functional else nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    first = m.a if functional else m[0]
    name = "a" if functional else "0"
    x = x_of(64, 8)
    loss = {"loss_fn": lambda y: y.pow(2).sum()}
    plain = _rows_of(sp.check(m, x, **loss), name)[0]
    h = first.register_forward_hook(lambda mod, args, out: out * 3)
    try:
        hooked = _rows_of(sp.check(m, x, **loss), name)[0]
    finally:
        h.remove()
    assert len(first._forward_hooks) == 0
    y1 = first(x) * 3  # the output that flows on, and the loss's gradient with respect to it (autograd)
    rest = m.b(torch.tanh(y1)) if functional else m[2](m[1](y1))
    (g,) = torch.autograd.grad(rest.pow(2).sum(), y1)
    assert hooked.forward_second_moment == pytest.approx(float(y1.detach().double().pow(2).mean()), rel=1e-5)
    assert hooked.forward_second_moment == pytest.approx(9 * plain.forward_second_moment, rel=1e-5)
    assert hooked.grad_rms == pytest.approx(float(g.double().pow(2).mean().sqrt()), rel=1e-5)


@pytest.mark.parametrize("functional", [False, True])
def test_modules_outside_the_model_are_not_recorded(functional):
    """A loss that is an nn.Module (and any other module run during the pass)
    calls the global hooks too; only the model's own calls are rows."""
    torch.manual_seed(0)
    m = _Functional() if functional else nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    x, t = x_of(16, 8), torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    r = sp.check(m, x, loss_fn=nn.MSELoss(), targets=t)
    assert [layer.name for layer in r.layers] == (["a", "tanh", "b"] if functional else ["0", "1", "2"])
    _no_hooks(m)


def test_model_comes_back_bit_for_bit():
    m = Messy()
    m.out.weight.grad = torch.full_like(m.out.weight, 7.0)  # an existing .grad must survive
    m.train()
    m.drop.eval()  # mixed modes
    before = _snapshot(m)
    sp.check(m, x_of(8, 16), spectrum=True)
    _same(before, _snapshot(m))
    _no_hooks(m)


def test_model_comes_back_on_exception():
    m = Messy()
    m.fail = True
    before = _snapshot(m)
    with pytest.raises(sp.probe.ModelError, match=r"forward failed in module '\(root\)' \(Messy\) on inputs of shape "
                                                  r"\(8, 16\): RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        sp.check(m, x_of(8, 16))
    _same(before, _snapshot(m))
    _no_hooks(m)


class _Stateful(nn.Module):
    """A forward that reassigns buffers (a counter, an EMA), registers a new
    one, and keeps Python state: what a dynamic-RoPE or EMA module does."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 2)
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(8))
        self.seen = 0
        self.log = []

    def forward(self, x):
        self.steps = self.steps + 1
        self.ema = 0.9 * self.ema + 0.1 * x.detach().mean(0)
        self.register_buffer("cached", x.detach().clone(), persistent=False)
        self.seen = x.shape[0]
        self.log.append(x.shape)
        self.extra = "added"
        return self.a(x)


def test_reassigned_and_registered_buffers_and_python_state_come_back():
    m = _Stateful()
    steps, ema, log = m.steps, m.ema, m.log
    before = _snapshot(m)
    sp.check(m, x_of(16, 8))
    _same(before, _snapshot(m))
    assert m.steps is steps and m.ema is ema and float(m.steps) == 0.0  # the objects held before, as they were
    assert "cached" not in m._buffers and not hasattr(m, "extra")
    assert m.seen == 0 and m.log is log and log == []


class _Histories(nn.Module):
    """Python state kept in the collections' own containers and in containers
    held by a container: a deque(maxlen=...) history, a defaultdict of counts,
    an OrderedDict, a dict of per-call lists."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 2)
        self.history = collections.deque([0], maxlen=4)
        self.counts = collections.defaultdict(int)
        self.seen = collections.OrderedDict(first=1)
        self.calls = {"shapes": [], "inner": {"n": [0]}}

    def forward(self, x):
        self.history.append(x.shape[0])
        self.counts["forward"] += 1
        self.seen["last"] = x.shape
        self.calls["shapes"].append(x.shape)
        self.calls["inner"]["n"].append(1)
        return self.a(x)


def test_state_in_deques_defaultdicts_and_nested_containers_comes_back():
    m = _Histories()
    history, counts, shapes = m.history, m.counts, m.calls["shapes"]
    sp.check(m, x_of(16, 8))
    assert m.history is history and list(history) == [0] and history.maxlen == 4
    assert m.counts is counts and dict(counts) == {} and counts.default_factory is int
    assert list(m.seen.items()) == [("first", 1)]
    assert m.calls["shapes"] is shapes and shapes == [] and m.calls["inner"] == {"n": [0]}


def test_a_forward_that_writes_its_parameters_is_said_in_the_report():
    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            with torch.no_grad():
                self.a.weight.clamp_(-0.01, 0.01)  # WGAN-style, inside forward
            return self.b(self.a(x))

    r = sp.check(Clamped(), x_of(8, 8))
    assert any("forward wrote 1 of its parameters in place (a.weight)" in n for n in r.summary.notes)
    assert not any("in place" in n for n in sp.check(Messy(), x_of(8, 16)).summary.notes)  # none written


class _ReassignsChildren(nn.Module):
    """A forward that reassigns a buffer or a parameter of one of torch's own
    layers among its children, or moves a parameter's entries (``.data =``)."""

    def __init__(self, what):
        super().__init__()
        self.what, self.fc, self.bn, self.out = what, nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        if self.what == "buffer":
            self.bn.running_mean = torch.full((8,), 7.0)
        elif self.what == "parameter":
            self.out.weight = nn.Parameter(torch.zeros(2, 8))
        elif self.what == "new buffer":
            self.fc.register_buffer("seen", torch.ones(1))
        else:
            self.out.weight.data = torch.zeros(2, 8)
        return self.out(self.bn(self.fc(x)))


@pytest.mark.parametrize("what", ["buffer", "parameter", "new buffer", "data"])
def test_a_torch_layer_s_tensors_reassigned_by_its_parent_come_back_or_are_said(what):
    """(Outside review) The tensors a parent's forward reassigns on torch's
    own layers (BatchNorm's running mean, a Linear's weight as a new
    Parameter, which an optimizer would no longer hold) were left as the
    forward set them, and nothing was said: only modules of the user's own
    classes had their mappings put back.  Now they are; a parameter whose
    entries were moved (``p.data = ...``: no version bump) cannot be put
    back and is named in the report, as an in-place write is."""
    torch.manual_seed(0)
    m = _ReassignsChildren(what)
    rm, w, w_obj = m.bn.running_mean.clone(), m.out.weight.detach().clone(), m.out.weight
    r = sp.check(m, x_of(16, 8))
    assert torch.equal(m.bn.running_mean, rm) and m.out.weight is w_obj and "seen" not in m.fc._buffers
    said = any("forward wrote 1 of its parameters" in n and "out.weight" in n for n in r.summary.notes)
    if what == "data":
        assert said
    else:
        assert torch.equal(m.out.weight, w) and not said


@pytest.mark.parametrize("rnn", [nn.LSTM, "subclass"])
def test_an_rnn_s_weight_reassigned_by_its_parent_comes_back_where_the_rnn_computes_with_it(rnn):
    """(Outside review of the fix above) A parent re-registering its LSTM's
    recurrent weight (a DropConnect mask): the mapping was put back by
    writing ``_parameters`` directly, and the LSTM -- which keeps its own
    list of weights, updated by its ``__setattr__`` -- went on computing with
    the tensor the forward had set, while its state_dict and the optimizer
    held the original.  Put back through ``__setattr__`` now: both agree."""
    class MyLSTM(nn.LSTM):  # a user's subclass: put back by the path of user classes, the same way
        pass

    class M(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn, self.head = rnn(8, 16, batch_first=True), nn.Linear(16, 2)

        def forward(self, x):
            self.rnn.weight_hh_l0 = nn.Parameter(self.rnn.weight_hh_l0.detach() * 0.0)
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    m = M(MyLSTM if rnn == "subclass" else rnn)
    x = torch.randn(4, 5, 8)
    orig = m.rnn.weight_hh_l0
    with torch.no_grad():
        before = m.rnn(x)[0]
    sp.check(m, x)
    assert m.rnn.weight_hh_l0 is orig and any(w is orig for w in m.rnn._flat_weights)
    with torch.no_grad():
        assert torch.equal(m.rnn(x)[0], before)


def test_a_lazy_module_not_yet_initialised_is_named():
    m = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.LazyLinear(4)))
    with pytest.raises(ValueError, match=r"1\.0 \(LazyLinear\) is lazy and not initialised yet: run one forward"):
        sp.check(m, x_of(4, 8))
    m(x_of(4, 8))
    assert sp.check(m, x_of(4, 8)).verdict == "healthy"


def test_shape_mismatch_names_module_and_shapes():
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(30, 4))
    with pytest.raises(sp.probe.ModelError, match=r"module '2' \(Linear\) on inputs of shape \(8, 16\).*32.*30"):
        sp.check(m, x_of(8, 16))
    _no_hooks(m)


def test_bad_inputs():
    with pytest.raises(ValueError, match="has no parameters"):
        sp.check(nn.ReLU(), x_of(2, 3))
    with pytest.raises(ValueError, match="empty batch"):
        sp.check(nn.Linear(3, 3), torch.empty(0, 3))

    class NoTensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            return "nothing"

    with pytest.raises(ValueError, match="no floating-point tensor"):
        sp.check(NoTensor(), x_of(2, 3))
    with pytest.raises(ValueError, match="bounds must satisfy"):
        sp.check(nn.Linear(3, 3), x_of(2, 3), bounds=(1.0, 0.1))


# ---- what users have -------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))  # functional activation inside forward


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: int = 0


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.ln = nn.LayerNorm(16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        enc = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(enc, 2, enable_nested_tensor=False)
        self.block = Block(16)
        self.shared = nn.Linear(16, 16)
        self.act = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.ln(h)
        h, _ = self.lstm(h)
        h, _ = self.gru(h)
        h, _ = self.attn(h, h, h)
        h = self.enc(h)
        h = self.block(h)
        h = self.act(self.shared(self.shared(h)))  # shared module: two rows
        h = self.bn(h.mean(1))
        return {"out": Out(self.head(F.gelu(h)))}


def test_every_module_kind_runs():
    m = Zoo()
    m.emb.requires_grad_(False)  # frozen parameters
    ids = torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(0))
    r = sp.check(m, ids)
    names = [layer.name for layer in r.layers]
    assert names.count("shared") == 2
    assert "block.tanh" in names and "gelu" in names
    kinds = {layer.kind for layer in r.layers}
    assert {"Embedding", "Conv1d", "LayerNorm", "LSTM", "GRU", "MultiheadAttention", "BatchNorm1d",
            "F.tanh", "F.gelu", "ReLU"} <= kinds
    emb = r.layers[names.index("emb")]
    assert emb.param_grad_rms is None  # frozen
    assert all(layer.grad_rms is not None for layer in r.layers if layer.name not in ("emb",))
    json.dumps(r.to_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models(dtype):
    m = mlp(6, 32, "tanh", "xavier_normal").to(dtype)
    r = sp.check(m, x_of(8, 32).to(dtype))
    assert r.verdict == "healthy" and len(r.layers) == 13


def test_loss_fn_and_targets():
    m = mlp(4, 32, "tanh", "xavier_normal")
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    r = sp.check(m, x_of(16, 32), loss_fn=F.cross_entropy, targets=y)
    assert r.summary.backprop.startswith("loss cross_entropy")


def test_ten_thousand_layers_keep_only_per_layer_scalars():
    """Memory is O(rows): the report holds numbers, not one tensor per layer."""
    import dataclasses

    m = mlp(5000, 8, "tanh", "orthogonal")
    r = sp.check(m, x_of(2, 8))
    assert len(r.layers) == 10001

    def tensors(obj, depth=0):
        if isinstance(obj, torch.Tensor):
            return 1
        if depth > 4:
            return 0
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return sum(tensors(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj))
        if isinstance(obj, (list, tuple)):
            return sum(tensors(v, depth + 1) for v in obj)
        if isinstance(obj, dict):
            return sum(tensors(v, depth + 1) for v in obj.values())
        return 0

    assert tensors(r) == 0
    assert all(isinstance(getattr(layer, f), (float, int, str, tuple, type(None)))
               for layer in r.layers[:50] for f in ("forward_second_moment", "grad_rms", "shape"))


def test_report_outputs(tmp_path):
    r = sp.check(mlp(20, 64, "relu", "xavier_normal"), x_of(16, 64))
    text = str(r)
    assert text.index("vanishing") < text.index("layers (execution order)")  # problems first
    p = r.save_html(tmp_path / "r.html")
    html = p.read_text()
    assert "class='sp-figure'" in html and "<table" in html
    assert r._repr_html_().startswith("<div")
    d = json.loads(r.to_json(tmp_path / "r.json"))
    assert d["verdict"] == "vanishing" and len(d["layers"]) == 41


def test_spectrum_exact_and_lanczos_agree(monkeypatch):
    m = mlp(8, 48, "tanh", "orthogonal")
    x = x_of(4, 48) * 0.1
    exact = sp.check(m, x, spectrum=True).spectrum
    from signalprop.probe import spectrum as S

    monkeypatch.setattr(S, "EXACT_MAX_ENTRIES", 10)
    lan = sp.check(m, x, spectrum=True).spectrum
    assert exact.method == "exact" and lan.method.startswith("lanczos")
    # Lanczos with 48 steps on a 48-dim input is exact up to rounding
    assert lan.max_singular_value == pytest.approx(exact.max_singular_value, rel=1e-4)
    assert lan.min_singular_value == pytest.approx(exact.min_singular_value, rel=1e-3)


def test_spectrum_of_orthogonal_linear_net_is_isometric():
    m = nn.Sequential(*[nn.Linear(32, 32, bias=False) for _ in range(10)]).double()
    sp.init.apply_(m, "orthogonal", generator=torch.Generator().manual_seed(0))
    s = sp.check(m, x_of(4, 32).double(), spectrum=True).spectrum
    assert s.min_singular_value == pytest.approx(1.0, abs=1e-9)
    assert s.max_singular_value == pytest.approx(1.0, abs=1e-9)
    assert "dynamical isometry" in s.reading
    _ = math


class _Attention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (the fused CPU
    kernel has neither forward-mode nor double-backward formulas) followed by
    Hardsigmoid (no double backward either); keyword argument ``scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Sequential(nn.Linear(16, 16), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, -1)
        return self.out(F.scaled_dot_product_attention(q, k, v).squeeze(1) * scale)


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_spectrum_without_double_backward_and_with_any_input_form(monkeypatch, form):
    """Lanczos forms J v in forward mode: the model above raised in the old
    double-vjp path.  Every input form check() takes is accepted, and Lanczos
    (all 16*8 = 128 input directions in 48 steps: exact for the largest
    singular value up to rounding, 1e-4) agrees with the exact Jacobian."""
    from signalprop.probe import spectrum as S

    torch.manual_seed(0)
    m = _Attention().double()
    x = torch.randn(2, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inputs = {"tensor": x, "tuple": (x, 2.0), "dict": {"x": x, "scale": 2.0}}[form]
    exact = sp.check(m, inputs, spectrum=True).spectrum
    monkeypatch.setattr(S, "EXACT_MAX_ENTRIES", 10)
    lan = sp.check(m, inputs, spectrum=True).spectrum
    assert exact.method == "exact" and "forward mode" in lan.method
    assert lan.max_singular_value == pytest.approx(exact.max_singular_value, rel=1e-4)


def test_spectrum_falls_back_in_order_and_explains_when_nothing_works(monkeypatch):
    from signalprop.probe import spectrum as S

    def no_linearize(*a, **k):
        raise NotImplementedError("linearize unavailable")

    monkeypatch.setattr(torch.func, "linearize", no_linearize)
    m = mlp(4, 16, "tanh", "orthogonal")
    jv, _, _, how = S._products(lambda v: m(v.unsqueeze(0))[0], x_of(1, 16)[0])
    assert how == "forward mode, torch.func.jvp"
    monkeypatch.setattr(torch.func, "jvp", no_linearize)
    assert S._products(lambda v: m(v.unsqueeze(0))[0], x_of(1, 16)[0])[3] == "double backward"

    class NoGrad(torch.autograd.Function):  # neither forward mode nor double backward
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            return g * 2

    with pytest.raises(ValueError, match="no way to form Jacobian-vector products"):
        S._products(lambda v: NoGrad.apply(v), x_of(1, 16)[0])


def test_spectrum_of_token_model_is_taken_from_its_embeddings():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    s = sp.check(m, {"input_ids": ids}, spectrum=True).spectrum
    assert (s.n_in, s.n_out) == (8 * 32, 8 * 64) and math.isfinite(s.max_singular_value)
    assert sp.check(m, ids, spectrum=True).spectrum.max_singular_value == pytest.approx(s.max_singular_value)
    with pytest.raises(ValueError, match="floating-point input"):
        sp.check(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4)), torch.tensor([[1, 2]]), spectrum=True)


class _Mean(nn.Module):
    """The second output of a two-output autograd node (std_mean's mean)."""

    def forward(self, x):
        return torch.std_mean(x, dim=-1, keepdim=True)[1]


class _Tricky(nn.Module):
    def __init__(self):
        super().__init__()
        self.id = nn.Identity()  # returns the input, a leaf: no autograd node to hook
        self.a, self.relu = nn.Linear(8, 8), nn.ReLU(inplace=True)  # a's output modified in place after its row
        self.b, self.mean = nn.Linear(8, 8), _Mean()
        self.lstm = nn.LSTM(8, 8)  # output 0 of a many-output node (unbatched: a sequence of 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.relu(self.a(self.id(x)))
        h = self.b(h) + self.mean(h)
        h, _ = self.lstm(h)
        return self.head(self.b(h))  # b called twice


@pytest.mark.parametrize("shape", [(24, 8), (24, 3, 8)])
def test_row_gradients_equal_tensor_hooks_on_each_output(shape):
    """Each row's gradient is read by a pre-hook of the autograd node that
    made its output (the output's index among the node's outputs), or by a
    tensor hook where there is no node: the same gradient a tensor hook on
    that output sees (torch's documented semantics, also when the output is
    modified in place afterwards), here taken as the oracle on a second,
    hooked pass over the same model and batch.  On a 3-D input a Linear's
    output is a view of its matmul's result, which the ReLU(inplace=True)
    after it rewrites: measured on a copy that flows on in its place."""
    torch.manual_seed(0)
    m = _Tricky()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    loss = lambda y: y.pow(2).sum()  # noqa: E731 - a deterministic objective
    r = sp.check(m, x, loss_fn=loss)
    grads: dict[int, torch.Tensor] = {}
    names: list[str] = []

    def keep(mod, args, out):
        t = out if isinstance(out, torch.Tensor) else out[0]
        i = len(names)
        names.append({v: k for k, v in m.named_modules()}[mod])
        # a hook on a view that is rewritten in place never fires: the oracle hooks a copy that flows on
        view = isinstance(out, torch.Tensor) and t._is_view()
        t = t.clone() if view else t
        t.register_hook(lambda g: grads.__setitem__(i, g))
        return t if view else None

    leaves = [mod for mod in m.modules() if not list(mod.children())]
    handles = [mod.register_forward_hook(keep) for mod in leaves]
    try:
        xl = x.clone().requires_grad_()
        loss(m(xl)).backward()
    finally:
        for h in handles:
            h.remove()
    m.zero_grad(set_to_none=True)
    assert [layer.name for layer in r.layers] == names == ["id", "a", "relu", "b", "mean", "lstm", "b", "head"]
    for i, layer in enumerate(r.layers):
        want = float(grads[i].double().pow(2).mean().sqrt())
        assert layer.grad_rms == pytest.approx(want, rel=1e-5), layer.name


def test_a_compiled_submodule_gets_per_module_hooks_and_no_warning():
    """torch warns when a torch.compile'd module runs under global module
    hooks; a model holding one is hooked module by module instead.  The
    compiled module is one row, named by its own class, its inside not
    hooked: hooks there are traced into its compiled code (with functional
    capture dynamo raised on them: tests/test_monitor_review18.py)."""
    import warnings

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    m[1] = torch.compile(nn.Sequential(nn.Linear(8, 8), nn.Tanh()), backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = sp.check(m, x_of(16, 8))
    assert not [w for w in caught if "hooks" in str(w.message)], [str(w.message) for w in caught]
    assert [layer.name for layer in r.layers] == ["0", "1", "2"] and r.layers[1].kind == "Sequential"
    assert all(layer.grad_rms is not None for layer in r.layers)
    _no_hooks(m)


def test_a_model_without_child_modules_shows_its_activation_calls():
    """Raw parameters with F.linear and torch.tanh in one module: it was one
    opaque row, healthy with its tanh 90% saturated; its activation calls
    are the rows now, as they are inside any block.  A childless torch layer
    stays one row."""

    class NoChildren(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w1 = nn.Parameter(torch.randn(64, 64, generator=g) * 3)
            self.w2 = nn.Parameter(torch.randn(4, 64, generator=g) / 8)

        def forward(self, x):
            return F.linear(torch.tanh(F.linear(x, self.w1)), self.w2)

    r = sp.check(NoChildren(), x_of(128, 64))
    assert r.verdict == "saturated" and [p.layer for p in r.problems] == ["tanh"]
    assert [layer.kind for layer in sp.check(nn.Linear(8, 4), x_of(16, 8)).layers] == ["Linear"]


def test_rows_the_loss_does_not_reach_are_said():
    """A two-head model whose loss reads one head: the other head's rows get
    no gradient and cannot be judged on it -- said in the notes, with the
    rows, rather than left as blanks in a "healthy" table; a loss over both
    heads leaves no such note."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
            self.a, self.b = nn.Linear(16, 3), nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x):
            h = self.trunk(x)
            return self.a(h), self.b(h)

    torch.manual_seed(0)
    m, x, y = TwoHeads(), x_of(16, 8), torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    r = sp.check(m, x, loss_fn=lambda o, t: F.cross_entropy(o[0], t), targets=y)
    said = [n for n in r.summary.notes if "got no gradient" in n]
    assert len(said) == 1 and "3 rows got no gradient (b.0, b.1, b.2): the loss does not depend" in said[0]
    assert [layer.name for layer in r.layers if layer.grad_rms is None] == ["b.0", "b.1", "b.2"]
    both = sp.check(m, x, loss_fn=lambda o, t: F.cross_entropy(o[0], t) + F.cross_entropy(o[1], t), targets=y)
    assert not [n for n in both.summary.notes if "got no gradient" in n]


def _index_weighted(t, dim):
    """sum_i i * g_i over a gradient's entries in its own order (per row of a batch with ``dim``)."""
    if dim is None:
        f = t.reshape(-1).double()
        return (f * torch.arange(f.numel(), dtype=torch.float64)).sum()
    b = t.reshape(t.shape[0], -1).double()
    return (b * torch.arange(b.shape[1], dtype=torch.float64)).sum(dim=1)


def test_a_view_rewritten_in_place_is_read_in_its_own_order():
    """A Linear's 3-D output, transposed and rewritten in place by the next
    module (ReLU(inplace=True) on h.transpose(1, 2)): a statistic that
    weighs each gradient entry by its position (declared here) equals a
    tensor hook's on a copy of each output -- the gradient is read in the
    output's own order, not the matmul result's it is a view of (a version
    that read views at their base's node got this one wrong)."""
    from signalprop import statistics as ST

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.fc2 = nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(3, 4)

        def forward(self, x):
            return self.fc2(self.act(self.fc(x).transpose(1, 2)))

    st = ST.register(ST.Statistic("grad_index_weighted", "backward", "gradient", "sum of i * g_i",
                                  (("grad_index_weighted", ST.SUM),), lambda d: float(d["grad_index_weighted"]),
                                  "grad_index_weighted", "i g", kernel=_index_weighted))
    try:
        torch.manual_seed(0)
        m = M()
        x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
        r = sp.check(m, x, loss_fn=lambda y: y.pow(2).sum())
        grads = {}

        names = {v: k for k, v in m.named_modules()}

        def keep(mod, args, out):
            c = out.clone()
            c.register_hook(lambda g, name=names[mod]: grads.__setitem__(name, g))
            return c

        handles = [mod.register_forward_hook(keep) for mod in (m.fc, m.act, m.fc2)]
        try:
            m(x).pow(2).sum().backward()
        finally:
            for h in handles:
                h.remove()
        for layer in r.layers:
            assert layer.stats["grad_index_weighted"] == pytest.approx(
                float(_index_weighted(grads[layer.name], None)), rel=1e-5), layer.name
    finally:
        ST.unregister(st.name)


def test_buffers_with_the_conjugate_bit_are_put_back():
    """A complex buffer registered as a conjugate view (its conjugate bit
    set), beside a BatchNorm in train mode: torch's list copy refuses such
    views, so the buffers come back one by one -- all of them, bit for bit."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
            self.register_buffer("k", torch.randn(3, dtype=torch.complex64).conj())

        def forward(self, x):
            return self.bn(self.fc(x)) * self.k.real.sum()

    m = M()
    before = {n: b.clone() for n, b in m.named_buffers()}
    sp.check(m, x_of(16, 4))
    assert all(torch.equal(b, before[n]) for n, b in m.named_buffers())
    assert m.k.is_conj()


def test_a_buffer_resized_by_the_forward_comes_back():
    """torch.ao's observers resize their empty min/max buffers on the first
    forward (a QAT Linear's): the buffers were copied back without their
    shape, which raised, and nothing after them was put back; now check
    reports, and every buffer has its shape and values again."""
    import torch.ao.nn.qat as qat
    from torch.ao.quantization import get_default_qat_qconfig

    class Obs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 8)
            self.register_buffer("seen", torch.tensor([]))

        def forward(self, x):
            y = self.lin(x)
            with torch.no_grad():
                self.seen.resize_(y.shape[1]).copy_(y.amax(0))
            return y

    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    lin.qconfig = get_default_qat_qconfig("x86")
    for m in (Obs(), nn.Sequential(qat.Linear.from_float(lin), nn.ReLU())):
        m.train()
        before = {n: (b.shape, b.clone()) for n, b in m.named_buffers()}
        first = next(iter(m.parameters()))
        first.grad = torch.ones_like(first)
        assert sp.check(m, x_of(32, 16)).verdict in ("healthy", "dead")
        after = dict(m.named_buffers())
        assert set(after) == set(before)
        assert all(after[n].shape == s and torch.equal(after[n], v) for n, (s, v) in before.items())
        assert torch.equal(first.grad, torch.ones_like(first))


def test_a_child_module_added_or_swapped_by_the_forward_is_taken_back():
    """A head built on the first forward (``self.head = nn.Linear(...)`` inside
    forward), a child swapped for another: the model comes back with the
    children it had."""
    class Lazy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a = nn.Linear(8, 8), nn.Tanh()

        def forward(self, x):
            if not hasattr(self, "head"):
                self.head = nn.Linear(8, 2)
            self.a = nn.ReLU()
            return self.head(self.a(self.body(x)))

    m = Lazy()
    a = m.a
    sp.check(m, x_of(16, 8))  # (the children made during the pass are not hooked: not rows)
    assert [n for n, _ in m.named_modules()] == ["", "body", "a"] and m.a is a
    assert len(list(m.parameters())) == 2


def test_spectrum_refuses_what_has_no_first_example():
    """spectrum=True reads the first example's Jacobian, dim 0 the batch: an
    unbatched 1-D input (the output's first dimension is not the input's)
    and a 0-d output (a loss returned by forward) are refused with the
    reason, where the first gave a 1 x 1 'Jacobian' and the second an
    IndexError; the plain check of the same models works.  A batch of
    scalars (B,) is a batch, and an HF model called with labels= is read at
    its logits, as check reads it (it met the loss)."""
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x).pow(2).mean()

    class Timesteps(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(1, 8)

        def forward(self, t):
            return self.a(t[:, None])

    with pytest.raises(ValueError, match=r"has shape \(4,\): an unbatched input"):
        sp.check(nn.Sequential(nn.Linear(16, 4)), torch.randn(16), spectrum=True)
    with pytest.raises(ValueError, match=r"has shape \(\): an unbatched input, or an output that is not batch"):
        sp.check(Scalar(), x_of(16, 8), spectrum=True)
    assert sp.check(Scalar(), x_of(16, 8)).layers
    j = sp.check(Timesteps(), torch.rand(6), spectrum=True).spectrum
    assert (j.n_in, j.n_out) == (1, 8)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    a = sp.check(gpt, {"input_ids": ids, "labels": ids}, spectrum=True).spectrum
    b = sp.check(gpt, {"input_ids": ids}, spectrum=True).spectrum
    assert a.singular_values == b.singular_values and a.n_out == 6 * 64


def test_an_output_that_no_row_reaches_is_said():
    """The output depends only on a parameter used outside any module call:
    no row gets a gradient, and the notes say so (the report was "healthy"
    with nothing said)."""
    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 4)
            self.p = nn.Parameter(torch.ones(4))

        def forward(self, x):
            self.a(x)
            return self.p * torch.ones(x.shape[0], 4)

    r = sp.check(Outside(), x_of(16, 8))
    assert any(n.startswith("1 row got no gradient (a)") for n in r.summary.notes)


def test_sparse_and_nested_inputs_are_refused_with_the_reason():
    """A sparse or nested first input, whose batch size and statistics the
    pass reads, is refused with the reason; a sparse side argument (a GCN's
    adjacency beside dense features) is the model's business and runs."""
    class GCN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 4)

        def forward(self, x, adj):
            return torch.sparse.mm(adj, self.a(x))

    x = x_of(16, 8)
    with pytest.raises(ValueError, match="a sparse_coo tensor here: pass x.to_dense"):
        sp.check(nn.Linear(8, 4), x.to_sparse())
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged)
    with pytest.raises(ValueError, match="a nested tensor"):
        sp.check(nn.Linear(8, 4), nested)
    adj = (torch.rand(16, 16, generator=torch.Generator().manual_seed(3)) < 0.2).float().to_sparse()
    assert sp.check(GCN(), (x, adj)).layers[0].grad_rms


def test_buffers_moved_resized_or_expanded_come_back_in_place():
    """A buffer that is a strided view of another, resized by the forward,
    comes back as that view (set back with its copy's strides it wrote into
    its base's first entries); an expanded (stride-0) buffer is left alone
    where untouched and put back where written (copying into it raised);
    a buffer moved onto a smaller storage (b.data = ...) is set back onto
    its own; children appended to a ModuleList or swapped in a Sequential
    by the forward are taken back."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("base", torch.arange(12.0))
            self.register_buffer("v", self.base[::2])
            self.register_buffer("e", torch.arange(3.0)[:, None].expand(3, 4))
            self.register_buffer("d", torch.arange(6.0))
            self.heads, self.seq = nn.ModuleList(), nn.Sequential(nn.Tanh())

        def forward(self, x):
            with torch.no_grad():
                self.v.resize_(3)
                self.e.as_strided((3,), (1,)).mul_(2)
                self.d.data = torch.zeros(2)
            self.heads.append(nn.Linear(4, 4))
            self.seq[0] = nn.ReLU()
            return self.seq(self.lin(x))

    m = M()
    before = {n: (b.clone(), b.stride(), b.untyped_storage().data_ptr()) for n, b in m.named_buffers()}
    tanh = m.seq[0]
    sp.check(m, x_of(8, 4))
    for n, b in m.named_buffers():
        v, stride, ptr = before[n]
        assert torch.equal(b, v) and b.stride() == stride and b.untyped_storage().data_ptr() == ptr, n
    assert m.v._base is m.base or m.v.untyped_storage().data_ptr() == m.base.untyped_storage().data_ptr()
    assert len(m.heads) == 0 and m.seq[0] is tanh


def test_children_stay_with_the_attributes_that_name_them():
    """A forward that builds its head on the first call, records that it did
    and writes a parameter in place: the parameters cannot be put back, so
    the attributes stay as the forward set them -- and so do the children
    they refer to (taking the head back alone broke the next forward)."""
    class Built(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.built = False

        def forward(self, x):
            if not self.built:
                self.head = nn.Linear(8, 2)
                self.built = True
                with torch.no_grad():
                    self.a.weight.mul_(0.5)
            return self.head(self.a(x))

    m = Built()
    r = sp.check(m, x_of(8, 8))
    assert any("wrote 1 of its parameters" in n for n in r.summary.notes)
    assert m.built and isinstance(m.head, nn.Linear)
    m(x_of(8, 8))  # the next forward runs


class _CentresInPlace(nn.Module):
    """A forward that edits its input in place, as plain PyTorch allows."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))

    def forward(self, x):
        x.sub_(x.mean(1, keepdim=True))
        return self.net(x)


def test_inputs_as_the_model_would_take_them():
    """Inputs plain PyTorch takes, check takes too (found by an outside
    stress test): a forward that edits its input in place (check's input
    leaf, which requires grad, was refused by autograd and the error blamed
    the model); an input made under inference_mode; a channels_last batch
    under dtype= (a torch warning, an error under warnings-as-errors). The
    user's tensor is never written. Raw Python lists of numbers get a clear
    error (it was a 112,000-character message listing each float)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    keep = x.clone()
    r = sp.check(_CentresInPlace(), x)
    assert r.verdict == "healthy" and torch.equal(x, keep)
    first = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(16, 4))
    assert sp.check(first, x).layers[0].forward_second_moment == pytest.approx(x.clamp(min=0).square().mean().item(),
                                                                              rel=1e-5)
    assert torch.equal(x, keep)
    # the theory column still sees the chain start at the input the model was fed
    mlp = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    assert sp.check(mlp, x).layers[1].predicted_second_moment is not None
    with torch.inference_mode():
        xi = torch.randn(8, 16)
    assert sp.check(mlp, xi).verdict == "healthy"
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    xc = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    assert sp.check(cnn.to(memory_format=torch.channels_last), xc, dtype="fp16").verdict == "healthy"
    with pytest.raises(TypeError, match=r"torch.tensor") as e:
        sp.check(mlp, [[0.0] * 16] * 1000)
    assert len(str(e.value)) < 300

    class Sums(nn.Module):  # takes a list of tensors: a list of arguments holding a list is not raw data
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, xs):
            return self.lin(sum(xs))

    assert sp.check(Sums(), [[x, x]]).verdict == "healthy"


class _SqrtAfterHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        return torch.sqrt(self.net(x).abs() * 0)  # finite forward; the derivative of sqrt at 0 is inf


class _ClsReg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.cls, self.reg = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.cls(h), self.reg(h)


def test_a_nan_gradient_from_past_the_last_layer_is_not_blamed_on_it():
    """The gradient arriving at the last layer non-finite while the forward is
    finite: nothing after the last layer was recorded, and the last layer was
    named as the one whose backward made it. Now a NaN among the targets is
    laid on the loss (oracle: the output is finite and the loss's gradient at
    it is not), and an operation in the model's own forward after its last
    layer on that code, with or without a loss."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    y_bad = y.clone()
    y_bad[3, 1] = float("nan")
    out = m(x)
    out.retain_grad()
    F.mse_loss(out, y_bad).backward()
    assert torch.isfinite(out).all() and not torch.isfinite(out.grad).all()
    m.zero_grad(set_to_none=True)
    r = sp.check(m, x, loss_fn=F.mse_loss, targets=y_bad)
    assert r.verdict == "non-finite" and len(r.problems) == 1
    assert "from the loss is already non-finite" in r.problems[0].message and "targets" in r.problems[0].suggestion
    for loss_fn, targets in ((None, None), (F.mse_loss, y)):
        r = sp.check(_SqrtAfterHead(), x, loss_fn=loss_fn, targets=targets)
        assert [p.layer for p in r.problems] == ["(root)"]
        assert "own forward code, after net.2" in r.problems[0].message
    # a second head's NaN target: the gradient at the first output is finite, yet no code follows the
    # second head -- the loss's (the second head does not feed the first output)
    torch.manual_seed(0)
    two = _ClsReg()
    vals = torch.randn(32, 1)
    vals[3] = float("nan")
    r = sp.check(two, x, loss_fn=lambda out, t: F.mse_loss(out[0], t[0]) + F.mse_loss(out[1], t[1]), targets=(y, vals))
    assert "from the loss is already non-finite" in r.problems[0].message, r.problems[0].message


def test_a_gradient_whose_rms_underflows_is_not_called_exactly_zero():
    """A 30-layer sigmoid MLP (PyTorch's default init): the first layer's
    gradient entries are ~1e-26, all non-zero, so their float32 sum of squares
    underflows and the RMS reads 0. The verdict (vanishing) stands; the
    message no longer says the gradient "is exactly 0" but that its RMS
    underflows, with its largest entry (oracle: autograd in float64).  No
    exact pass is run for it: its largest entry is below the bound times the
    output's RMS, so it vanishes whatever its RMS (a float64 pass would cost
    a second pass on every deep vanishing net)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(30):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    m = nn.Sequential(*layers)
    x = torch.randn(16, 32)
    r = sp.check(m, x)
    first = r.layers[0]
    assert r.verdict == "vanishing" and first.grad_rms == 0.0 and first.grad_absmax > 0
    xd = x.double().requires_grad_()
    h = m.double()[0](xd)
    h.retain_grad()
    m[1:](h).backward(torch.randn(16, 32, dtype=torch.float64))
    assert (h.grad != 0).all()  # the oracle: not one entry is 0
    m.float()
    msg = next(p.message for p in r.problems if p.kind == "vanishing")
    assert "RMS underflows to 0" in msg and "largest entry is" in msg and "exactly 0" not in msg


class _ReZero(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.alpha * self.f(x)


def test_rezero_branches_gated_by_a_zero_parameter_are_not_vanishing():
    """ReZero (Bachlechner et al. 2020): each block's branch is scaled by its
    own alpha, 0 at initialisation, so the branch's rows get an exact-0
    gradient by design -- the stream carries the gradient to the input (0.33
    of the output's, measured by autograd here) and alpha gets one. It was
    called vanishing; like a zero-initialised module (LoRA's B), a zero
    parameter the block's own code multiplies by excuses it, in check and in
    the monitor."""
    torch.manual_seed(0)
    model = nn.Sequential(*[_ReZero(32) for _ in range(6)], nn.Linear(32, 10))
    x = torch.randn(64, 32)
    r = sp.check(model, x)
    assert r.verdict == "healthy", [p.message for p in r.problems]
    assert all(layer.grad_rms == 0 for layer in r.layers if ".f." in f".{layer.name}")
    xi = x.clone().requires_grad_()
    out = model(xi)
    g = torch.randn(out.shape)
    out.backward(g)
    assert xi.grad.norm() / g.norm() > 0.2 and model[0].alpha.grad != 0  # the oracle
    model.zero_grad()
    with sp.monitor(model, every=1) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = model(x).square().mean()
        loss.backward()
        mon.step(loss)
        opt.step()
    assert mon.history[0].verdict == "healthy"


class _TokenThenRound(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(16))  # a zero token added (an MAE mask token): gates nothing
        self.block = nn.Sequential(nn.Linear(16, 16))
        self.block.shift = nn.Parameter(torch.zeros(16))  # a zero bias of a block's own: gates nothing either
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(torch.round(self.block(x + self.token) + self.block.shift))


def test_a_zero_token_or_bias_does_not_excuse_a_real_vanishing_gradient():
    """Only a zero gate excuses exact-0 gradients (a single number, or a
    parameter named as a gate); an all-zero token added at the model's root
    or a zero bias of a block's own does not -- round() cuts the gradient at
    the block here, a real vanishing gradient (an outside review found the
    first version calling it healthy)."""
    torch.manual_seed(0)
    r = sp.check(_TokenThenRound(), torch.randn(32, 16))
    assert r.verdict == "vanishing" and r.layers[0].grad_rms == 0


class _BNBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)


def test_uncalibrated_batchnorm_in_eval_mode_is_the_first_fix():
    """A fresh BatchNorm ResNet checked in eval mode: its never-updated running
    statistics pass the signal unnormalised, and the stream grows through the
    16 blocks -- true of that computation, and the note said why, but the fix
    offered was Fixup's residual scaling. The first fix is now to calibrate
    those layers (or check in train mode, where it is healthy)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      *[_BNBlock(16) for _ in range(16)])
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    x = torch.randn(8, 3, 16, 16)
    assert sp.check(m.train(), x).verdict == "healthy"
    r = sp.check(m.eval(), x)
    assert r.verdict == "exploding"
    for p in r.problems:
        if p.kind in ("exploding", "vanishing"):
            assert p.suggestion.startswith("first calibrate the 33 BatchNorm layers in eval mode"), p.suggestion


def test_a_huge_finite_weight_is_not_said_to_have_rms_inf():
    """A weight scaled by 1e21 is finite (RMS 7.4e19, float64 oracle), but the
    squares of its float32 entries overflow: the problem said "RMS inf"."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    with torch.no_grad():
        m[4].weight.mul_(1e21)
    r = sp.check(m, torch.randn(16, 32))
    rms = m[4].weight.double().pow(2).mean().sqrt().item()
    msg = r.problems[0].message
    assert "RMS inf" not in msg and f"RMS {rms:.3g}" in msg, msg


@pytest.mark.parametrize("scale", [1e25, 1e-20, 1e-25])
def test_a_loss_scaled_far_out_of_float32s_squares_gets_the_same_report(scale):
    """check judges every gradient relative to the RMS at the output, so a
    loss multiplied by a constant leaves the report as it was.  Its float32
    sums of squares did not: by 1e25 the output gradient's overflowed (the
    relative gradients all 0, "vanishing"), by 1e-20 the rows' underflowed
    to 0 with entries of 1e-24 ("vanishing", quoting a largest entry half the
    output's RMS).  Both now go to the exact pass (float64).  Compared with
    scale 1 to 1e-5 (float32 rounding of the scaled gradients)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(64, 16)
    base = sp.check(m, x, loss_fn=lambda out: out.pow(2).mean())
    r = sp.check(m, x, loss_fn=lambda out: out.pow(2).mean() * scale)
    assert (r.verdict, r.problems) == (base.verdict, base.problems) == ("healthy", ())
    assert r.summary.output_grad_rms == pytest.approx(base.summary.output_grad_rms * scale, rel=1e-5)
    for a, b in zip(r.layers, base.layers):
        assert a.grad_rms == pytest.approx(b.grad_rms * scale, rel=1e-5), a.name
        assert a.grad_rms / r.summary.output_grad_rms == pytest.approx(b.grad_rms / base.summary.output_grad_rms,
                                                                      rel=1e-5)
