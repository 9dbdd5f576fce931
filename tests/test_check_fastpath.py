"""The CPU fast paths of check's statistics against their plain definitions.

Each fast path (dot products for sums and squares, hardshrink into a reused
buffer for saturation, per-unit maxima for dead units, batched weight terms,
the scalar quadrature in propagate) must give the numbers the definition
gives: counts exactly, sums to float32 rounding (relative 1e-5: a float32
dot over 10^4-10^5 entries accumulates ~sqrt(n) * 6e-8), moments of theory
to 1e-12 (the same nodes, only the summation order differs)."""

import functools
import gc
import importlib
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop import activations as A
from signalprop.lab.models import DeepMLP
from signalprop.probe import stats as S
from signalprop.probe.predict import _weight_terms
from signalprop.theory import propagate
from signalprop.theory.maps import gaussian_moments


def _rows(dtype):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 48, generator=g, dtype=torch.float64) * 2
    return [y.to(dtype), y.to(dtype).t(), y.to(dtype)[:, ::2]]  # contiguous, transposed, strided


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["tanh", "sigmoid", "hardtanh"])
def test_saturation_count_is_exact(dtype, name):
    band = A.saturation_band(A.get(name))
    scratch = S.Scratch()
    big = torch.randn(96, 80, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype) * 2
    # rows of several sizes through one scratch (its buffer grows on the last), each also read through
    # the 1-D view the moments return, as the recorder passes it
    for y in [*_rows(dtype), big, _rows(dtype)[0]]:
        y = A.get(name).torch_fn()(y)
        c, t = band
        want = int(((y.double() - c).abs() > t).sum()) if dtype != torch.bfloat16 else \
            int(((y - c).abs() > t).sum())
        flat = S.forward_moments_into({}, y, scratch)
        assert (flat is not None) == S.dottable(y)
        for f in (None, flat):
            d: dict = {}
            S.saturation_into(d, y, band, scratch, f)
            assert float(d["saturated_count"]) == want and d["saturated_n"] == y.numel()
        if flat is not None:  # the cached 1-D views are of the buffer now in use: none keeps one it outgrew
            ptr = scratch._bufs[(y.dtype, y.device)].untyped_storage().data_ptr()
            assert scratch._flat and all(f.untyped_storage().data_ptr() == ptr for f in scratch._flat.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_saturation_counts_come_back_as_integers(dtype):
    """Counts of thousands of saturated entries pass through a norm's sqrt and
    a square (batched rows; non-contiguous or half-precision single rows),
    which round in float32 (2,002 comes back as 2001.9999): both paths must
    still give the exact integer."""
    band = A.saturation_band(A.get("tanh"))
    g = torch.Generator().manual_seed(0)
    ys = [torch.tanh(torch.randn(256, 64, generator=g) * s).to(dtype) for s in (3.0, 10.0, 30.0, 100.0)]
    batches = S.Batches()
    ds: list[dict] = [{} for _ in ys]
    for d, y in zip(ds, ys):
        batches.add(d, y, band, False, False, -1)
    batches.flush()
    [(dicts, vecs)] = batches.done
    assert all(a is b for a, b in zip(dicts, ds))
    for j, y in enumerate(ys):
        want = int((y.double().abs() > band[1]).sum()) if dtype != torch.bfloat16 else int((y.abs() > band[1]).sum())
        assert want > 2000
        assert float(vecs["saturated_count"][j]) == want
        single: dict = {}
        S.saturation_into(single, y.t(), band, S.Scratch())  # not contiguous: the norm's path, not the dot
        assert float(single["saturated_count"]) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_forward_and_grad_moments_match_the_definition(dtype):
    scratch = S.Scratch()
    for y in _rows(dtype):
        d: dict = {}
        S.forward_moments_into(d, y, scratch)
        sq = d["forward_sq"] if "forward_sq" in d else d["forward_norm"] ** 2
        ref = y.double()
        tol = 1e-5 if dtype != torch.bfloat16 else 1e-4
        assert float(d["forward_sum"]) == pytest.approx(float(ref.sum()), rel=tol, abs=tol * float(ref.abs().sum()))
        assert float(sq) == pytest.approx(float(ref.square().sum()), rel=tol)
        g: dict = {}
        S.grad_moments_into(g, y)
        gsq = g["grad_sq"] if "grad_sq" in g else g["grad_norm"] ** 2
        assert float(gsq) == pytest.approx(float(ref.square().sum()), rel=tol)


def test_large_rows_are_summed_without_a_vector_of_ones():
    """From _SUM_DOT_MAX entries on, a row's sum is ``sum`` rather than a dot
    with a vector of ones as long as the row (GPT-2's logits: 823 MB more
    memory per call): the same sum to float32 rounding, and no such vector is
    made; below it the dot path keeps its vector.  Tolerance: a float32
    accumulation of 2^20 terms on one thread (OMP_NUM_THREADS=1, the BLAS
    dot's few running sums) drifts by a random walk of ~sqrt(2^20) * 2^-24
    ~ 6e-5 relative at most in practice; 1.04e-5 was measured on one CPU, so
    1e-4 (a wrong sum -- a dropped block, a vector of the wrong length -- is
    off by far more)."""
    g = torch.Generator().manual_seed(0)
    scratch = S.Scratch()
    for n in (S._SUM_DOT_MAX - 1, S._SUM_DOT_MAX):
        y = torch.randn(n, generator=g) + 0.5
        d: dict = {}
        S.forward_moments_into(d, y, scratch)
        ref = y.double()
        assert float(d["forward_sum"]) == pytest.approx(float(ref.sum()), rel=1e-4)
        assert float(d["forward_sq"]) == pytest.approx(float(ref.square().sum()), rel=1e-4)
    assert [k[2] for k in scratch._ones] == [S._SUM_DOT_MAX - 1]


def test_dead_units_by_maxima_equal_any_nonzero():
    """Units zero on every example and position, along the feature dim (last
    for Linear, 1 for convolutions), with and without the non-negative
    shortcut; a NaN unit counts as alive (as ``y != 0`` says)."""
    g = torch.Generator().manual_seed(1)
    for shape, fd in [((32, 40), -1), ((8, 6, 5, 5), 1)]:
        y = torch.randn(shape, generator=g).relu()
        idx = [slice(None)] * len(shape)
        idx[fd] = slice(0, 3)
        y[tuple(idx)] = 0  # three dead units
        idx[fd] = 3
        y[tuple(idx)] = float("nan")
        others = tuple(d for d in range(y.dim()) if d != fd % y.dim())
        want = float(torch.any(y != 0, dim=others).sum())
        for nonneg in (True, False):
            got = S.dead_units(y, fd, nonnegative=nonneg)
            assert got is not None and float(got["alive_count"]) == want == shape[fd] - 3


def test_weight_terms_batched_equal_the_per_layer_formula():
    torch.manual_seed(0)
    ms = [nn.Linear(16, 16) for _ in range(5)] + [nn.Linear(16, 16, bias=False), nn.Conv2d(3, 4, 3),
                                                  nn.Linear(300, 200)]
    # large weights (read in place, grouped by shape): with and without bias, a transposed (non-contiguous)
    # weight and a convolution among them
    ms += [nn.Linear(200, 300) for _ in range(3)] + [nn.Linear(200, 300, bias=False), nn.Conv2d(64, 200, 3)]
    ms[-3].weight = nn.Parameter(torch.randn(200, 300).t())
    for m, got in zip(ms, _weight_terms(ms)):
        W = m.weight.detach().double().reshape(m.weight.shape[0], -1)
        n, s = W.shape[0], W.sum(1)
        b = m.bias.detach().double() if m.bias is not None else torch.zeros(n, dtype=torch.float64)
        want = [float(W.square().sum() / n), float(b.square().mean()), float(b @ s / n), float(s.square().mean())]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # with the weights' norms or sums of squares handed over (check's parameter norms), the same terms
    for squared in (False, True):
        norms = {id(m.weight): (torch.linalg.vector_norm(m.weight.detach()) ** (2 if squared else 1), squared)
                 for m in ms}
        np.testing.assert_allclose(_weight_terms(ms, norms), _weight_terms(ms), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "relu", "erf", "gelu", "silu"])
def test_propagate_moments_equal_gaussian_moments(name):
    a = A.get(name)
    L = 40
    p = propagate([32] * (L + 1), [a] * L, 1.3, 0.05, q0=0.8, mean_coupling=[(0.01, 1.2)] * L, m0=0.1)
    np.testing.assert_allclose(p.post, gaussian_moments(a, p.q, ("m2",))["m2"], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(p.grad_pre / p.grad_post, gaussian_moments(a, p.q, ("d2",))["d2"], rtol=1e-12)


def test_collector_comes_back_as_it_was():
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(8, 4)
    assert gc.isenabled()
    sp.check(m, x)
    assert gc.isenabled()
    with pytest.raises(sp.probe.ModelError):
        sp.check(m, torch.randn(8, 5))
    assert gc.isenabled()
    gc.disable()
    try:
        sp.check(m, x)
        assert not gc.isenabled()
    finally:
        gc.enable()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).view(-1, 7)  # fails in the block's own code, not in a leaf


def test_failure_inside_a_non_leaf_forward_names_that_module():
    """Without functional capture only leaves are hooked: the failing module
    is read off the traceback, innermost module frame first."""
    m = nn.Sequential(nn.Linear(8, 8), nn.Sequential(_Block(), nn.Tanh()))
    rec = importlib.import_module("signalprop.probe.recorder")
    assert not rec.calls_functional_activations(m)
    with pytest.raises(sp.probe.ModelError, match=r"forward failed in module '1\.0' \(_Block\)"):
        sp.check(m, torch.randn(3, 8))


class _Twice(nn.Module):
    """A module called twice, an in-place residual on a leaf's output, a
    transposed (non-contiguous) output, a rectifier with dead units and a
    sigmoid (saturation band centred at 0.5)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)
        self.dead = nn.Linear(12, 12)
        with torch.no_grad():
            self.dead.bias[:5] = -50.0  # five units never fire
        self.relu = nn.ReLU()
        self.sig = nn.Sigmoid()
        self.tanh = nn.Tanh()

    def forward(self, x):
        h = self.fc(x)
        h += 1.0  # written after the hook read it
        h = self.tanh(self.fc(h)).t().contiguous().t()
        return self.sig(self.relu(self.dead(h)))


def _batched_models():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(6 * 8 * 8, 10))
    return [(DeepMLP(40, 16, "tanh", 16, 16), torch.randn(32, 16)),  # 41 rows of one shape
            (DeepMLP(9, 16, "relu", 16, 4).to(torch.bfloat16), torch.randn(48, 16).to(torch.bfloat16)),
            (conv, torch.randn(40, 3, 8, 8)), (_Twice(), torch.randn(64, 12)),
            (DeepMLP(6, 16, "sigmoid", 16, 4).double(), torch.randn(32, 16, dtype=torch.float64))]


@pytest.mark.parametrize("case", range(5))
def test_batched_rows_equal_rows_measured_one_by_one(case, monkeypatch):
    """Small outputs are copied into shared buffers and reduced together
    (stats.Batches); every statistic equals the one-row-at-a-time path's:
    counts (saturated entries, dead units) exactly, moments to float32
    rounding of a different summation order (relative 1e-5; bf16 rows are
    summed in float32 both ways).  Partly filled buffers, several
    buckets, a repeated module and an output changed in place afterwards
    are all covered."""
    model, x = _batched_models()[case]
    fields = ("forward_mean", "forward_second_moment", "grad_rms", "saturation", "dead_fraction", "dead_samples")
    batched = sp.check(model, x)
    monkeypatch.setattr(S.Batches, "fits", staticmethod(lambda y: False))
    single = sp.check(model, x)
    assert [lay.name for lay in batched.layers] == [lay.name for lay in single.layers]
    for a, b in zip(batched.layers, single.layers):
        for f in fields:
            va, vb = getattr(a, f), getattr(b, f)
            assert (va is None) == (vb is None), (a.name, f)
            if f in ("saturation", "dead_fraction", "dead_samples"):
                assert va == vb, (a.name, f, va, vb)
            elif va is not None:
                assert va == pytest.approx(vb, rel=1e-5, abs=1e-5 * abs(a.forward_second_moment) ** 0.5), (a.name, f)
    assert batched.verdict == single.verdict
    if case == 3:
        dead = next(lay for lay in batched.layers if lay.name == "relu")
        assert dead.dead_fraction >= 5 / 12  # the five silenced units, and any that never fire by chance
        assert batched.layers[0].forward_mean == pytest.approx(float(model.fc(x).detach().mean()), rel=1e-5)  # before += 1


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("budget", [0, 3000])
def test_captured_gradients_equal_hooked_ones(case, budget, monkeypatch):
    """Check's own backward returns the small rows' gradients with the
    parameters' (pipeline.CAPTURE_BYTES; no Python per row in the backward)
    instead of a hook per row: every gradient statistic equals the hooked
    path's (budget 0), also when the budget runs out part-way (3,000 bytes:
    the first rows captured, the rest hooked), for a module called twice and
    an output changed in place after its row was read.  Relative 1e-6: the
    same values reduced row by row in buffers of other lengths."""
    from signalprop.probe import pipeline

    model, x = _batched_models()[case]
    fields = ("grad_rms", "grad_absmax", "relative_grad_rms")
    captured = sp.check(model, x)
    monkeypatch.setattr(pipeline, "CAPTURE_BYTES", budget)
    hooked = sp.check(model, x)
    assert [lay.name for lay in captured.layers] == [lay.name for lay in hooked.layers]
    for a, b in zip(captured.layers, hooked.layers):
        for f in fields:
            va, vb = getattr(a, f), getattr(b, f)
            assert (va is None) == (vb is None), (a.name, f)
            if va is not None:
                assert va == pytest.approx(vb, rel=1e-6, abs=1e-30), (a.name, f, va, vb)
    assert captured.verdict == hooked.verdict
    assert captured.summary.output_grad_rms == pytest.approx(hooked.summary.output_grad_rms, rel=1e-6)


class _Gated(nn.Module):
    """An activation called as a function from a helper method, not forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def gate(self, h):
        return torch.sigmoid(h) * h

    def forward(self, x):
        return self.gate(self.fc(x))


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) * 2.0 + 1.0  # torch ops, no activation


class _Outer(nn.Module):
    def __init__(self, fail=False):
        super().__init__()
        self.plain = nn.Sequential(_Plain(), _Plain())
        self.gated = _Gated()
        self.fail = fail

    def forward(self, x):
        h = self.gated(self.plain(x))
        if self.fail:
            raise RuntimeError("boom")
        return h


def test_functional_capture_runs_only_inside_modules_that_call_activations(monkeypatch):
    """The recording mode costs a Python call per torch op, so it is entered
    only while a module whose code (forward or a method it calls) may call an
    activation as a function runs: the sigmoid in _Gated.gate is recorded,
    the ops of _Plain and of the outer forward never reach the mode, and a
    forward that raises leaves no mode behind."""
    from signalprop.probe import recorder as R

    seen = []
    orig = R._FunctionalCapture.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append((tuple(self.r.stack), getattr(func, "__name__", str(func))))
        return orig(self, func, types, args, kwargs)

    monkeypatch.setattr(R._FunctionalCapture, "__torch_function__", spy)
    torch.manual_seed(0)
    model = _Outer()
    r = sp.check(model, torch.randn(4, 8))
    assert [lay.name for lay in r.layers if lay.kind == "F.sigmoid"] == ["gated.sigmoid"]
    assert seen and all(stack[:2] == ("", "gated") for stack, _ in seen), seen[:5]
    seen.clear()
    with pytest.raises(Exception, match="boom"):
        sp.check(_Outer(fail=True), torch.randn(4, 8))
    assert not torch._C._is_torch_function_mode_enabled()
    torch.randn(2).tanh()  # no recorder's mode left on the stack to see it
    assert not seen or all(stack[:2] == ("", "gated") for stack, _ in seen)


def test_the_recorders_own_ops_do_not_pass_through_its_mode(monkeypatch):
    """While a module that may call an activation as a function runs, torch
    ops go through the recording mode (a Python call each); the recorder's
    own ops in a leaf's hook (the row's statistics, ~10 a row) are not the
    model's and skip it: the mode sees no op while a hook runs, and the
    model's own ops still reach it (the sigmoid is recorded)."""
    from signalprop.probe import recorder as R

    inside = [False]
    during = []
    orig_tf = R._FunctionalCapture.__torch_function__
    orig_leaf = R.Recorder._leaf_post

    def spy(self, func, types, args=(), kwargs=None):
        if inside[0]:
            during.append(getattr(func, "__name__", str(func)))
        return orig_tf(self, func, types, args, kwargs)

    def leaf(self, *a, **k):
        inside[0] = True
        try:
            return orig_leaf(self, *a, **k)
        finally:
            inside[0] = False

    monkeypatch.setattr(R._FunctionalCapture, "__torch_function__", spy)
    monkeypatch.setattr(R.Recorder, "_leaf_post", leaf)
    torch.manual_seed(0)
    r = sp.check(_Outer(), torch.randn(4, 8))
    assert [lay.name for lay in r.layers if lay.kind == "F.sigmoid"] == ["gated.sigmoid"]
    assert "gated.fc" in [lay.name for lay in r.layers]
    assert during == [], during[:10]


class _Stored(nn.Module):
    """An activation kept as an attribute and called through it: the forward's
    code names no activation, the attribute does."""

    def __init__(self, act):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


@pytest.mark.parametrize("act, kind", [(torch.tanh, "F.tanh"), (F.relu, "F.relu"),
                                       (functools.partial(F.gelu, approximate="tanh"), "F.gelu"),
                                       (torch.Tensor.sigmoid, "F.sigmoid")])
def test_an_activation_stored_on_a_module_is_recorded(act, kind):
    """Builtins (torch.tanh), Python functions (F.relu), partials and
    tensor methods stored on a module make it a module whose calls are
    recorded; its other attributes (dicts of parameters and hooks, not even
    hashable) are passed over."""
    from signalprop.probe import recorder as R

    torch.manual_seed(0)
    m = nn.Sequential(_Stored(act), nn.Linear(8, 2))
    assert R.functional_callers(m) == {m[0]}
    r = sp.check(m, torch.randn(4, 8))
    assert [lay.kind for lay in r.layers if lay.name.startswith("0.")] == ["Linear", kind]


class _PartialForward(nn.Module):
    """A forward that is a new object at each access (functools.partialmethod)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def _fwd(self, x, scale):
        return torch.tanh(self.fc(x)) * scale

    forward = functools.partialmethod(_fwd, scale=1.0)


class _UnhashableForward:
    __hash__ = None  # a callable dataclass instance, say

    def __eq__(self, other):
        return self is other

    def __get__(self, obj, cls):
        return self if obj is None else (lambda x: torch.tanh(obj.fc(x)))


class _OddForward(nn.Module):
    forward = _UnhashableForward()

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)


def test_the_per_class_answer_is_kept_once_per_class():
    """Whether a class's forward may call an activation is asked once per
    class and kept while the class lives: a forward made anew at each access
    (partialmethod) replaces its entry rather than adding one per check, an
    unhashable forward attribute is asked without failing, and a class let
    go (torch.fx makes one per traced module) takes its entry with it."""
    from signalprop.probe import recorder as R

    x = torch.randn(4, 8)
    for cls in (_PartialForward, _OddForward):
        for _ in range(5):
            r = sp.check(nn.Sequential(cls(), nn.Linear(8, 2)), x)
        assert [lay.kind for lay in r.layers][:2] == ["Linear", "F.tanh"], cls
        assert sum(1 for c in list(R._CLASS_CALLS.keys()) if c is cls) == 1
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8), nn.Tanh()))
    sp.check(nn.Sequential(traced, nn.Linear(8, 2)), x)
    gm_class = type(traced)
    assert gm_class in R._CLASS_CALLS
    gone = weakref.ref(gm_class)
    n = len(R._CLASS_CALLS)
    del traced, gm_class
    gc.collect()
    # the entry does not keep the class alive, and goes with it (a count alone also moved with the other
    # classes earlier tests let go, which this collection frees too)
    assert gone() is None and len(R._CLASS_CALLS) <= n - 1
