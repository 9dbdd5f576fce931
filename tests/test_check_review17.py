"""Review 17: a row's input that no module wrote is judged against a format's
range (``input_absmax``); complex-valued layers are measured (their largest
|value| the largest modulus); without a loss the gradients' arbitrary scale
is not judged against a format's limits.  Oracles: the model actually cast
to float16, and the hooked tensors' own statistics."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.statistics import BY_NAME


class _ScaledSum(nn.Module):
    """A residual stream grown in the parent's own forward (no module writes
    it) before a LayerNorm: ``h + scale * h``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.fc1, self.norm, self.fc2 = nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.norm(h + self.scale * h))


def _half_norm_input(m: _ScaledSum, x: torch.Tensor) -> torch.Tensor:
    """The norm's input when the model really runs in float16."""
    m16 = _ScaledSum(m.scale).half()
    m16.load_state_dict({k: v.half() for k, v in m.state_dict().items()})
    got = []
    h = m16.norm.register_forward_pre_hook(lambda mod, args: got.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            m16(x.half())
    finally:
        h.remove()
    return got[0]


@pytest.mark.parametrize("scale,overflows", [(1e6, True), (1e2, False)])
def test_an_input_no_module_wrote_is_judged_against_the_format(scale, overflows):
    """The sum before the norm reaches ~2e6 at scale 1e6: cast to float16 it is
    inf (the oracle), and precision() names the norm's input; at scale 1e2
    the cast stays finite and the verdict fits (no false alarm)."""
    torch.manual_seed(0)
    m, x = _ScaledSum(scale), torch.randn(32, 64)
    inf16 = bool(torch.isinf(_half_norm_input(m, x)).any())
    assert inf16 == overflows
    r = sp.check(m, x, dtype="float16", loss_fn=lambda y: y.square().mean())
    p = r.precision()
    row = next(q for q in p.layers if q.layer == "norm" and q.quantity == "input")
    with torch.no_grad():
        h = m.fc1(x)
        assert row.absmax == pytest.approx(float((h + scale * h).abs().max()), rel=1e-6)
    assert [(o.layer, o.quantity) for o in r.overflows("float16")] == ([("norm", "input")] if overflows else [])
    if overflows:
        assert p.verdict == "overflows" and p.overflowing == ("norm",), p.summary
        assert "norm input: max |value|" in p.summary and row.headroom < 0
        assert r.precision("bfloat16").verdict == "fits"  # 2e6 is far inside bfloat16's range
    else:
        assert p.verdict == "fits" and not p.overflowing, p.summary


class _Complex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8, dtype=torch.cfloat), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.a(x.to(torch.cfloat)).abs())


@pytest.mark.parametrize("nan", [False, True])  # the fast pass, and the exact pass after a NaN
def test_a_complex_layer_is_measured(nan):
    """A complex Linear's row: largest |value| the largest modulus of its
    output and of its gradient, mean |E[y]|, second moment E[|y|^2] and
    variance E[|y - E[y]|^2], each against the hooked tensors (a float32 loss
    makes the gradient the oracle's own)."""
    torch.manual_seed(0)
    m, x = _Complex(), torch.randn(16, 8)
    if nan:
        x[0, 0] = float("nan")
    loss = lambda y: y.nan_to_num().square().sum()  # noqa: E731
    outs, grads = [], []

    def keep(mod, args, y):
        outs.append(y.detach().clone())
        y.register_hook(lambda g: grads.append(g.detach().clone()))

    h = m.a.register_forward_hook(keep)
    try:
        loss(m(x)).backward()
    finally:
        h.remove()
    m.zero_grad(set_to_none=True)
    r = sp.check(m, x, loss_fn=loss, dtype="float16")
    row = r.layers[0]
    assert row.name == "a"
    y, g = outs[0], grads[0]
    fin = torch.isfinite(y)
    yf = y[fin].to(torch.complex128)
    assert row.stats["forward_absmax"] == pytest.approx(float(yf.abs().max()), rel=1e-6)
    assert row.stats["grad_absmax"] == pytest.approx(float(g[torch.isfinite(g)].abs().max()), rel=1e-6)
    assert row.forward_mean == pytest.approx(float(yf.mean().abs()), rel=1e-5)
    assert row.forward_second_moment == pytest.approx(float(yf.abs().square().mean()), rel=1e-5)
    assert row.forward_var == pytest.approx(float((yf - yf.mean()).abs().square().mean()), rel=1e-5)
    assert r.verdict == ("non-finite" if nan else "healthy")
    assert r.precision().verdict == "fits"


def test_the_extremes_of_a_complex_tensor_combine_to_its_largest_modulus():
    """Raw max / min of a complex tensor are its largest modulus and its
    negative, so max(max, -min) -- and the MAX / MIN reductions across ranks --
    give the largest |value| over every entry and per row of a batch."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 6, dtype=torch.cfloat, generator=g)
    st = BY_NAME["forward_absmax"]
    d: dict = {}
    st.measure_into(d, t, None)
    assert st.finish({k: float(v) for k, v in d.items()}) == pytest.approx(float(t.abs().max()))
    st.measure_into(d, t, 1)
    assert torch.equal(torch.maximum(d["forward_max"], -d["forward_min"]), t.abs().amax(dim=1))


def _big_gradients() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A read-out scaled x1e5 behind tiny hidden units: outputs ~100, but a
    unit-variance cotangent on every logit sends ~1e5 back to the hidden rows,
    where a mean cross-entropy sends ~400."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        m[0].weight.mul_(1e-3)
        m[0].bias.mul_(1e-3)
        m[2].weight.mul_(1e5)
    return m, torch.randn(64, 16), torch.randint(0, 10, (64,))


def _half_grads_finite(m: nn.Module, x: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether the gradient at every leaf's output stays finite when the model
    really trains in float16 on the mean cross-entropy."""
    m16 = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10)).half()
    m16.load_state_dict({k: v.half() for k, v in m.state_dict().items()})
    grads: list[torch.Tensor] = []

    def keep(mod, args, y):
        y.register_hook(grads.append)

    hs = [mod.register_forward_hook(keep) for mod in m16]
    try:
        F.cross_entropy(m16(x.half()), t).backward()
    finally:
        for h in hs:
            h.remove()
    return len(grads) == 3 and all(bool(torch.isfinite(g).all()) for g in grads)


def test_without_a_loss_gradients_are_not_judged_against_the_formats_limits():
    """The same model and inputs: float16 training on a mean cross-entropy
    keeps every gradient finite (the oracle), and with that loss precision()
    fits; without a loss the random cotangent's gradients pass 65504, and
    they are not judged (the summary says so) -- before, "overflows"."""
    m, x, t = _big_gradients()
    assert _half_grads_finite(m, x, t)
    with_loss = sp.check(m, x, loss_fn=F.cross_entropy, targets=t, dtype="float16").precision()
    assert with_loss.verdict == "fits" and "gradients not judged" not in with_loss.summary
    r = sp.check(m, x, dtype="float16")
    assert max(layer.stats["grad_absmax"] for layer in r.layers) > 65504  # the cotangent's scale
    p = r.precision()
    assert p.verdict == "fits" and not p.overflowing, p.summary
    assert p.at_risk == ("2",) and "gradient:" not in p.summary, p.summary  # the read-out's weights, ~1e4
    assert "gradients not judged: no loss_fn, so their scale is arbitrary; pass loss_fn to judge them" in p.summary
    assert any(q.quantity == "gradient" for q in p.layers)  # still listed, with their headroom
    assert r.overflows("float16") == ()  # nor by overflows()


def test_without_a_loss_outputs_are_still_judged_and_with_a_loss_gradients_are():
    """No loss: an output past 65504 still overflows.  A loss whose gradients
    pass 65504 (a sum of squares times 1e4) is judged as before."""
    m, x, t = _big_gradients()
    with torch.no_grad():
        m[2].weight.mul_(1e3)  # outputs ~1e5
    p = sp.check(m, x, dtype="float16").precision()
    assert p.verdict == "overflows" and p.overflowing == ("2",) and "2 output" in p.summary, p.summary
    m, x, t = _big_gradients()
    p = sp.check(m, x, loss_fn=lambda y: y.square().sum() * 1e4, dtype="float16").precision()
    assert p.verdict == "overflows" and "gradient" in p.summary and "not judged" not in p.summary, p.summary


def test_rwkv_gradients_without_a_loss_are_not_judged():
    """The reported case: a small RWKV fits float16 with a mean or sum
    cross-entropy; without a loss its embeddings' gradient passes 65504 (the
    cotangent's scale), which no longer makes it "overflows"."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.RwkvForCausalLM(transformers.RwkvConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, attention_hidden_size=32, intermediate_size=64,
        context_length=64)).eval()
    ids = torch.randint(0, 100, (4, 16))

    def ce(out, y):
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="sum")

    assert sp.check(m, ids, loss_fn=ce, targets=ids, dtype="float16").precision().verdict == "fits"
    r = sp.check(m, ids, dtype="float16")
    assert r.layers[0].stats["grad_absmax"] > 65504
    p = r.precision()
    assert p.verdict == "fits" and "gradients not judged" in p.summary, p.summary


def test_a_sparse_embedding_gradient_is_measured_as_its_dense_twin():
    """``nn.Embedding(sparse=True)`` gives a sparse gradient, which no norm
    kernel takes (check raised NotImplementedError); its norm is its
    coalesced values', equal to the dense embedding's (the oracle)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Embedding(100, 16), nn.Flatten(), nn.Linear(64, 4))
    sparse = nn.Sequential(nn.Embedding(100, 16, sparse=True), nn.Flatten(), nn.Linear(64, 4))
    sparse.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 100, (8, 4), generator=torch.Generator().manual_seed(0))
    ids[1] = ids[0]  # repeated indices: an uncoalesced sparse gradient
    loss = lambda y: y.square().mean()  # noqa: E731
    a, b = sp.check(dense, ids, loss_fn=loss), sp.check(sparse, ids, loss_fn=loss)
    assert b.layers[0].param_grad_rms == pytest.approx(a.layers[0].param_grad_rms, rel=1e-6)
    assert b.layers[0].param_grad_rms > 0 and b.verdict == a.verdict


def test_rwkv_rescaling_its_weights_in_eval_mode_stays_consistent():
    """HF RWKV's first forward in eval mode divides two weights per block and
    sets ``layers_are_rescaled``.  check cannot put the weights back (it does
    not copy parameters), so it leaves the flag as the forward set it and
    says so in the report; putting the flag back alone would make the next
    forward divide the weights again (the oracle: the model's own output
    before and after, and after a round trip through train mode)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.RwkvModel(transformers.RwkvConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=4, attention_hidden_size=32, intermediate_size=64,
        context_length=64, rescale_every=1)).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = copy.deepcopy(m)(ids).last_hidden_state  # a twin's first forward: m's own is check's
    r = sp.check(m, ids)
    assert any("forward wrote 8 of its parameters in place" in n for n in r.summary.notes)
    with torch.no_grad():
        assert torch.allclose(m(ids).last_hidden_state, before, rtol=1e-4, atol=1e-5)
        m.train()
        m(ids)
        m.eval()
        assert torch.allclose(m(ids).last_hidden_state, before, rtol=1e-4, atol=1e-5)
