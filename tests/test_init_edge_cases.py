"""Init edge cases that used to do the wrong thing silently."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import signalprop as sp


@pytest.mark.parametrize("module, message", [
    (nn.Softmax(dim=-1), "not elementwise"),
    (nn.RReLU(), "different outputs"),
    (nn.PReLU(num_parameters=4), "4 slopes"),
    (nn.GLU(), "elementwise"),
])
def test_gain_refuses_what_is_not_an_elementwise_function(module, message):
    with pytest.raises(ValueError, match=message):
        sp.init.gain(module)


def test_gain_of_prelu_uses_its_current_slope():
    m = nn.PReLU(init=0.3)
    slope = float(m.weight.detach())  # 0.3 in float32
    assert sp.init.gain(m) == pytest.approx(math.sqrt(2 / (1 + slope**2)), rel=1e-12)
    with torch.no_grad():
        m.weight.fill_(0.1)
    slope = float(m.weight.detach())
    assert sp.init.gain(m) == pytest.approx(math.sqrt(2 / (1 + slope**2)), rel=1e-12)
    assert sp.init.gain(nn.RReLU().eval()) > 1  # deterministic in eval mode: a leaky ReLU


@pytest.mark.parametrize("act", [nn.Hardswish, nn.ReLU6])
def test_critical_resolves_activations_the_table_does_not_name(act):
    """A 60-layer MLP of Hardswish/ReLU6 used to be initialised as if linear
    (it then vanished); resolved from the module's own function, it is
    critical: the gradient ratio first/last layer stays within 10x."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(60):
        layers += [nn.Linear(128, 128), act()]
    model = nn.Sequential(*layers)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    s = sp.init.critical_(model, x, generator=torch.Generator().manual_seed(0))
    assert not any("unknown activation" in n for n in s.notes)
    r = sp.check(model, x)
    assert r.verdict == "healthy"
    assert 0.1 < r.summary.first_last_grad_ratio < 10


def test_critical_says_when_an_activation_is_unknown():
    model = nn.Sequential(nn.Linear(16, 16), nn.Softmax(dim=-1), nn.Linear(16, 4))
    s = sp.init.critical_(model, torch.randn(32, 16))
    assert any("unknown activation(s) Softmax" in n for n in s.notes)


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def _same(model: nn.Module, snap: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip([*model.parameters(), *model.buffers()], snap))


def test_grouped_conv_transpose_gets_a_critical_init():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Sigmoid(), nn.ConvTranspose2d(8, 8, 3, groups=2, padding=1),
                      nn.Sigmoid(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sp.init.critical_(m, x, generator=torch.Generator().manual_seed(0))  # used to crash halfway
    assert sp.check(m, x).verdict == "healthy"


def test_whole_model_initializers_are_all_or_nothing(monkeypatch):
    import signalprop.init.critical as crit

    m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    snap = _snapshot(m)
    real, calls = crit._draw, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the second layer")
        return real(*a, **k)

    monkeypatch.setattr(crit, "_draw", failing)
    with pytest.raises(RuntimeError, match="injected"):
        sp.init.critical_(m, torch.randn(4, 8))
    assert len(calls) == 2 and _same(m, snap)  # the first layer's draw was undone


def test_lsuv_interrupted_restores_everything():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).train()
    snap = _snapshot(m)

    def interrupt(*a):
        raise KeyboardInterrupt

    h = m[2].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        sp.init.lsuv_(m, torch.randn(32, 8))
    h.remove()
    assert _same(m, snap) and m.training


def test_lsuv_refuses_non_finite_inputs_and_writes_nothing():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    snap = _snapshot(m)
    x = torch.randn(32, 8)
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        sp.init.lsuv_(m, x)
    assert _same(m, snap) and all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm"])
def test_parametrised_weights_are_initialised_through_their_parametrisation(how, bias):
    """Also without a bias: a parametrised Linear then has no parameter of its
    own, and its weight was skipped without a word."""
    from torch.nn.utils import parametrizations as P

    wrap = getattr(P, how)
    torch.manual_seed(0)
    m = nn.Sequential(*[wrap(nn.Linear(32, 32, bias=bias)) if i % 2 == 0 else nn.Tanh() for i in range(8)])
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    s = sp.init.apply_(m, "orthogonal", generator=torch.Generator().manual_seed(0))
    w = m[0].weight.detach()
    if how == "weight_norm":  # the computed weight is exactly the orthogonal draw
        torch.testing.assert_close(w @ w.T, torch.eye(32), atol=1e-5, rtol=0)
    assert "set through its parametrisation" in s.params[0].note and not s.skipped
    before = m[0].weight.detach().clone()
    sp.init.critical_(m, x, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(before, m[0].weight.detach())  # it changed the weight the layer computes with
    assert sp.check(m, x).verdict == "healthy" and len(sp.check(m, x).layers) == 8


def test_tied_weights_are_initialised_once_and_said():
    transformers = pytest.importorskip("transformers")
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100,
                                                             bos_token_id=0, eos_token_id=0))
    s = sp.init.apply_(g, "xavier_normal", generator=torch.Generator().manual_seed(0))
    names = [r.name for r in s.params]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert any("lm_head.weight is the same tensor as transformer.wte.weight" in n for n in s.notes)


def test_strided_conv_fan_out_counts_the_outputs_each_input_feeds():
    """fan_out = out/groups * prod(k) / prod(stride), checked by counting: the
    mean number of output elements each interior input element reaches."""
    conv = nn.Conv2d(4, 6, 4, stride=2, groups=2, bias=False)
    fi, fo = sp.init.fans(conv)
    assert (fi, fo) == (2 * 16, 3 * 16 // 4)
    # count by autograd: d(sum of outputs of one group's channel)/d(input) = how many outputs each input feeds
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.zeros(1, 4, 20, 20, requires_grad=True)
    conv(x)[:, :3].sum().backward()  # the 3 output channels of group 0
    feeds = x.grad[0, 0, 4:16, 4:16]  # interior of an input channel of group 0
    assert float(feeds.mean()) == pytest.approx(fo, rel=1e-6)


def test_tensor_initializers_take_the_modules_fans():
    conv = nn.ConvTranspose2d(16, 8, 4, stride=2, groups=4)
    f = sp.init.fans(conv)
    g = torch.Generator().manual_seed(0)
    w = sp.init.kaiming_normal_(torch.empty(16, 2, 4, 4), mode="fan_in", nonlinearity="linear", generator=g, fans=f)
    # 16*2*16 = 512 draws: the sample std within 15% of 1/sqrt(fan_in) (6.6 standard errors)
    assert float(w.std()) == pytest.approx(1 / math.sqrt(f[0]), rel=0.15)
    assert f[0] != torch.nn.init._calculate_fan_in_and_fan_out(conv.weight)[0]  # torch's rule differs here
    sp.init.xavier_uniform_(torch.empty(16, 2, 4, 4), fans=f)


@pytest.mark.parametrize("how", ["prune", "hook_weight_norm", "hook_spectral_norm"])
def test_weights_a_forward_hook_computes_are_skipped_and_said(how):
    """Pruning and the hook-based weight_norm/spectral_norm compute a layer's
    weight from other parameters at each forward: a write into the weight
    never reached them (the next forward made it anew) while the summary
    listed it as initialised.  The parameters it is made from are listed as
    skipped, by every initializer, and left as they were."""
    import warnings

    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based forms
        if how == "prune":
            prune.l1_unstructured(m[2], "weight", amount=0.5)
        elif how == "hook_weight_norm":
            nn.utils.weight_norm(m[2])
        else:
            nn.utils.spectral_norm(m[2])
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    m(x)
    hidden = {n: p.detach().clone() for n, p in m[2].named_parameters() if n != "bias"}
    for run in (lambda: sp.init.apply_(m, "orthogonal", generator=torch.Generator().manual_seed(0)),
                lambda: sp.init.critical_(m, x, generator=torch.Generator().manual_seed(0)),
                lambda: sp.init.lsuv_(m, x, generator=torch.Generator().manual_seed(0))):
        s = run()
        assert all(torch.equal(p, hidden[n]) for n, p in m[2].named_parameters() if n != "bias")
        assert any(k.startswith("2") for k in s.skipped), s.skipped
        assert "2.weight" not in [r.name for r in s.params]


def test_lsuv_without_a_generator_draws_from_the_global_rng():
    """Without generator=, LSUV's orthogonal start comes from the global RNG,
    which it advances as torch.nn.init does: two models initialised one
    after the other differ (the RNG was put back after the draw, so every
    call drew the same weights: an ensemble of copies)."""
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    a, b = (nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)) for _ in range(2))
    state = torch.get_rng_state()
    sp.init.lsuv_(a, x)
    assert not torch.equal(state, torch.get_rng_state())
    sp.init.lsuv_(b, x)
    assert not torch.equal(a[0].weight, b[0].weight)


def test_init_arguments_of_the_wrong_kind_are_refused_with_the_reason():
    m = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    x = torch.randn(16, 8)
    with pytest.raises(TypeError, match="generator= takes a torch.Generator"):
        sp.init.apply_(m, "orthogonal", generator=0)
    with pytest.raises(TypeError, match="max_iter a whole number"):
        sp.init.lsuv_(m, x, max_iter=2.5)
    with pytest.raises(TypeError, match="target and tol are numbers"):
        sp.init.lsuv_(m, x, target="1")
    with pytest.raises(ValueError, match="0 < target < inf"):
        sp.init.lsuv_(m, x, target=math.inf)


def test_an_embeddings_padding_row_stays_zero():
    """torch's own init leaves an Embedding's padding_idx row at zero (the
    padding token reads it); apply_ keeps it so, and says so."""
    for cls in (nn.Embedding, nn.EmbeddingBag):
        m = nn.Sequential(cls(10, 8, padding_idx=3))
        s = sp.init.apply_(m, "xavier_normal", generator=torch.Generator().manual_seed(0))
        assert torch.equal(m[0].weight[3], torch.zeros(8)) and m[0].weight[4].abs().sum() > 0
        assert any("padding_idx" in n for n in s.notes)


def test_critical_says_which_biases_beside_a_tied_weight_it_left():
    """Three layers share one weight but each has its own bias: the weight is
    drawn once, by the first; the others' biases are not drawn, and are now
    listed as skipped (they were counted as done)."""
    torch.manual_seed(0)
    a, b, c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = c.weight = a.weight
    m = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), c)
    s = sp.init.critical_(m, torch.randn(64, 16), generator=torch.Generator().manual_seed(0))
    assert {"2.bias", "4.bias"} <= set(s.skipped)


def test_lsuv_leaves_layers_it_does_not_calibrate_as_they_were_and_lists_them():
    """nn.MultiheadAttention reads its out_proj's weight directly (the
    Linear's forward never runs): LSUV cannot calibrate it, and leaves it as
    it was -- it redrew it orthogonal and zeroed its bias while the summary
    said "left untouched".  Every parameter left as it was is listed (the
    embedding, the attention's in_proj, the norm: unlisted before), the
    calibrated layer's are not; on a chain of Linear layers the draws are
    those of before (execution order is module order)."""
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.ln = nn.LayerNorm(16)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            h = self.emb(x)
            return self.fc(self.ln(self.mha(h, h, h)[0]))

    torch.manual_seed(0)
    m = Attn()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    s = sp.init.lsuv_(m, torch.randint(0, 50, (8, 10)), generator=torch.Generator().manual_seed(0))
    assert set(s.skipped) == set(before) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters() if not n.startswith("fc."))
    assert not torch.equal(m.fc.weight, before["fc.weight"])
    chain = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    sp.init.lsuv_(chain, torch.randn(32, 8), max_iter=1, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    for lin in (chain[0], chain[2]):  # orthogonal directions as drawn in module order, each layer rescaled
        q = torch.empty_like(lin.weight)
        sp.init.orthogonal_(q, generator=g)
        w = lin.weight.detach()
        cos = (w * q).sum() / (w.norm() * q.norm())
        assert float(cos) == pytest.approx(1.0, abs=1e-6)


def test_a_generator_keeps_the_global_rng_with_an_orthogonal_parametrisation():
    """torch's orthogonal parametrisation completes a non-square weight to a
    square one with Gaussian columns drawn from the global RNG when a weight
    is assigned: with generator=, every initializer leaves the global RNG as
    it was (it moved), and the weights it writes do not depend on it."""
    from torch.nn.utils.parametrizations import orthogonal

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for run in (lambda m: sp.init.apply_(m, "orthogonal", generator=torch.Generator().manual_seed(0)),
                lambda m: sp.init.critical_(m, x, generator=torch.Generator().manual_seed(0)),
                lambda m: sp.init.lsuv_(m, x, generator=torch.Generator().manual_seed(0))):
        weights = []
        for seed in (0, 123):
            m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
            orthogonal(m[0])
            orthogonal(m[2])
            torch.manual_seed(seed)
            state = torch.get_rng_state()
            run(m)
            assert torch.equal(state, torch.get_rng_state())
            weights.append(m[0].weight.detach().clone())
        assert torch.equal(*weights)


def test_a_parametrised_bias_is_initialised_through_its_parametrisation():
    """A bias under torch.nn.utils.parametrize: apply_ left it as it was and
    listed it nowhere, critical_ and lsuv_ wrote its computed value (a copy
    the next forward recomputes) and called it drawn.  All three now write
    it through the parametrisation's right_inverse: apply_ zeroes it as
    torch's schemes' biases (listed in its params), critical_ draws it
    N(0, sigma_b^2) minus the sigmoid's mean through the weights, lsuv_
    zeroes it and, with mean_correction, moves it to centre the output."""
    import torch.nn.utils.parametrize as P

    class Shift(nn.Module):  # invertible, so what is written is what the forward computes
        def forward(self, b):
            return b + 1.0

        def right_inverse(self, b):
            return b - 1.0

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    for name in ("apply", "critical", "lsuv"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 4))
        P.register_parametrization(m[2], "bias", Shift())
        ref = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 4))
        ref.load_state_dict({k.replace("parametrizations.bias.original", "bias"): v + (1.0 if "bias.original" in k
                                                                                      else 0.0)
                             for k, v in m.state_dict().items()})
        runs = {"apply": lambda mod, g: sp.init.apply_(mod, "xavier_uniform", generator=g),
                "critical": lambda mod, g: sp.init.critical_(mod, x, generator=g),
                "lsuv": lambda mod, g: sp.init.lsuv_(mod, x, mean_correction=True, generator=g)}
        s = runs[name](m, torch.Generator().manual_seed(0))
        runs[name](ref, torch.Generator().manual_seed(0))  # the same model with a plain bias: the values to reach
        assert torch.allclose(m[2].bias, ref[2].bias, atol=1e-6), name
        assert "2.bias" not in s.skipped
        if name == "apply":
            assert "2.bias" in [r.name for r in s.params]


def test_parametrised_tensors_that_cannot_be_written_are_left_and_listed():
    """A parametrisation without right_inverse (a positivity constraint's
    softplus) cannot be assigned through: each initializer leaves that tensor
    as it was and lists it in skipped (apply_ raised torch's RuntimeError;
    since the parametrised bias was written, critical_ and lsuv_ refused the
    model); a LayerNorm weight under a parametrisation is listed too (it was
    neither set nor listed); and with a parametrised weight and bias apply_
    writes both (it took the bias for the weight's tied twin and left it)."""
    import torch.nn.utils.parametrize as P

    class Positive(nn.Module):
        def forward(self, t):
            return nn.functional.softplus(t)

    class Shift(nn.Module):
        def forward(self, b):
            return b + 1.0

        def right_inverse(self, b):
            return b - 1.0

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    runs = (lambda m: sp.init.apply_(m, "xavier_uniform", generator=torch.Generator().manual_seed(0)),
            lambda m: sp.init.critical_(m, x, generator=torch.Generator().manual_seed(0)),
            lambda m: sp.init.lsuv_(m, x, mean_correction=True, generator=torch.Generator().manual_seed(0)))
    for where in ("weight", "bias"):
        for run in runs:
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 4))
            P.register_parametrization(m[2], where, Positive())
            kept = getattr(m[2], where).detach().clone()
            s = run(m)
            assert f"2.{where}" in s.skipped
            assert torch.equal(getattr(m[2], where), kept)
            assert not torch.equal(m[0].weight, torch.zeros_like(m[0].weight))
    m = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    P.register_parametrization(m[1], "weight", Shift())
    assert "1.weight" in sp.init.apply_(m, "xavier_uniform", generator=torch.Generator().manual_seed(0)).skipped
    m = nn.Sequential(nn.Linear(8, 4))
    nn.utils.parametrizations.weight_norm(m[0])
    P.register_parametrization(m[0], "bias", Shift())
    s = sp.init.apply_(m, "xavier_uniform", generator=torch.Generator().manual_seed(0))
    assert not s.notes and torch.allclose(m[0].bias, torch.zeros(4), atol=1e-6)


def test_lsuv_per_channel_on_a_grouped_transposed_convolution():
    """per_channel=True scales each output channel; a grouped ConvTranspose
    keeps output channel g * (out / groups) + j in column j of group g's
    rows (it raised a shape error). Every output channel's variance ends
    within the tolerance of the target (measured on the calibration batch)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.ConvTranspose2d(8, 12, 4, stride=2, groups=2), nn.ReLU(), nn.Conv2d(12, 4, 1))
    x = torch.randn(16, 8, 12, 12, generator=torch.Generator().manual_seed(1))
    sp.init.lsuv_(m, x, per_channel=True, tol=0.05, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        var = m[0](x).var(dim=(0, 2, 3), unbiased=False)
    assert torch.all((var - 1.0).abs() <= 0.05 + 1e-4), var


def test_lsuv_reports_a_layer_it_drew_but_could_not_calibrate():
    """A Linear returning a tuple (a router's logits and auxiliary loss) is
    given its orthogonal start but cannot be calibrated: the summary says
    so in its row (it listed the changed weight as left as it was)."""
    class Routed(nn.Linear):
        def forward(self, x):
            y = super().forward(x)
            return y, y.abs().mean()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Routed(8, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)[0]))

    torch.manual_seed(0)
    m = Net()
    s = sp.init.lsuv_(m, torch.randn(32, 8), generator=torch.Generator().manual_seed(0))
    assert "a.weight" not in s.skipped
    row = next(r for r in s.layers if r.name == "a")
    assert "not calibrated" in row.note


def test_a_failed_initializer_puts_back_a_tensor_a_parametrisation_replaced():
    """torch's orthogonal parametrisation keeps the weight in a buffer that
    each assignment replaces with a new tensor: an initializer that fails
    afterwards put the old values back into the old tensor, which the
    module no longer held, and the weight stayed changed."""
    from torch.nn.utils.parametrizations import orthogonal

    class FailsSecond(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls >= 2:
                raise RuntimeError("fails on the second pass")
            return self.lin(x)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), FailsSecond())
    orthogonal(m[0])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="second pass"):
        sp.init.lsuv_(m, torch.randn(64, 16), generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_lsuv_keeps_what_it_writes_into_a_parametrisations_buffer():
    """A parametrisation may keep part of the weight in a buffer that its
    right_inverse writes (weight = scale * direction): the calibration
    passes put the model's buffers back afterwards (BatchNorm's running
    statistics), which undid those writes while the summary said "rescaled,
    verified". The layer's output variance ends at the target, within the
    tolerance (it was 8.8 with this input's scale)."""
    import torch.nn.utils.parametrize as P

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(()))

        def forward(self, v):
            return self.scale * v

        def right_inverse(self, w):
            self.scale.copy_(w.norm() / w.numel() ** 0.5)
            return w / self.scale

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.BatchNorm1d(16))
    P.register_parametrization(m[0], "weight", Scaled())
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(2)) * 3
    stats = m[3].running_var.clone()
    sp.init.lsuv_(m, x, tol=0.05, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert abs(float(m[0](x).var(unbiased=False)) - 1.0) <= 0.05 + 1e-4
    assert torch.equal(m[3].running_var, stats)  # the forward's own buffers still come back
