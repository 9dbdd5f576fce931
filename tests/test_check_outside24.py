"""What an outside stress test of ``check`` on ~30 architectures found
(session 24): a false "vanishing" on healthy residual blocks whose MLP is an
``nn.Sequential``, a crash on a ``PackedSequence`` input, a theory column
filled where a row reads part of the previous row's output.  Each test fails
on the code before its fix."""

import math

import pytest
import torch
from torch import nn

import signalprop as sp


class _PreLN(nn.Module):
    def __init__(self, d: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class _Stack(nn.Module):
    """Blocks whose MLP is a Sequential named inside each block; no residual, weights scaled by ``s``."""

    def __init__(self, n: int = 15, d: int = 64, s: float = 1.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Module() for _ in range(n))
        for b in self.blocks:
            b.mlp = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh())
            with torch.no_grad():
                for m in b.mlp:
                    if isinstance(m, nn.Linear):
                        m.weight.mul_(s)

    def forward(self, x):
        for b in self.blocks:
            x = b.mlp(x)
        return x


@pytest.mark.parametrize("blocks", [4, 8])
def test_a_sequential_mlp_inside_each_residual_block_is_not_a_trend(blocks):
    """``blocks.#.mlp = Sequential(Linear, GELU, Linear)`` in a pre-LN
    residual net at torch's default init: a block's two Linears differ by
    ~3x (their relative gradients 0.055 and 0.166 alternate), and taken as
    one series of repeats that sawtooth compounded to "vanishing, 971x" over
    4 blocks.  Each position in the block is its own series now."""
    torch.manual_seed(0)
    model = nn.Sequential(*[_PreLN() for _ in range(blocks)], nn.Linear(128, 10))
    rep = sp.check(model, torch.randn(64, 128))
    g = [r.relative_grad_rms for r in rep.layers if r.kind == "Linear" and ".mlp." in r.name]
    assert max(g) / min(g) < 5  # the measured spread: no trend across depth to report
    assert rep.verdict == "healthy", [p.message for p in rep.problems]


def test_a_true_trend_through_such_blocks_is_still_found():
    """The same layout without a residual and with weights at half their
    default scale: the gradient shrinks by orders of magnitude over 15
    blocks (measured: the first Linear's gradient 1e-10 of the last's), and
    each position's series says so."""
    torch.manual_seed(0)
    rep = sp.check(_Stack(s=0.5), torch.randn(64, 64))
    lin = [r for r in rep.layers if r.kind == "Linear"]
    assert lin[0].grad_rms / lin[-1].grad_rms < 1e-6
    assert rep.verdict == "vanishing"
    assert any("mlp" in p.message for p in rep.problems if p.kind == "vanishing")


class _GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, packed):
        _, h = self.gru(packed)
        return self.head(h[-1])


def test_a_packed_sequence_is_one_input():
    """``model(packed)`` works; check took the PackedSequence (a named tuple)
    for four positional arguments and raised ``forward() takes 2 positional
    arguments but 5 were given``.  It is one input, as ``(packed,)`` is, and
    its data gets the input gradient."""
    torch.manual_seed(0)
    x, lengths = torch.randn(5, 9, 8), torch.tensor([9, 3, 7, 2, 5])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    model = _GRUClassifier()
    bare, wrapped = sp.check(model, packed), sp.check(model, (packed,))
    assert bare.verdict == wrapped.verdict == "healthy"
    assert [(r.name, r.grad_rms) for r in bare.layers] == [(r.name, r.grad_rms) for r in wrapped.layers]
    assert bare.summary.input is not None and bare.summary.input.grad_rms == wrapped.summary.input.grad_rms > 0


class _TokenPick(nn.Module):
    def __init__(self, d: int = 256) -> None:
        super().__init__()
        self.l1, self.a, self.l2, self.a2, self.l3 = nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh(), \
            nn.Linear(d, 10)

    def forward(self, x):
        h = self.a(self.l1(x))
        return self.l3(self.a2(self.l2(h[:, 0])))  # the first token: a view that starts at h's address


class _Chunk(nn.Module):
    def __init__(self, d: int = 256) -> None:
        super().__init__()
        self.l1, self.a, self.l2 = nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(d, 10)

    def forward(self, x):
        a, _ = self.l1(x).chunk(2, -1)
        return self.l2(self.a(a))


@pytest.mark.parametrize("model, x, before", [(_TokenPick, (64, 16, 256), 2), (_Chunk, (256, 256), 2)])
def test_a_row_reading_part_of_the_previous_output_stops_the_gradients_theory(model, x, before):
    """A row that reads a view of part of the previous row's output (a token
    pick, a chunk) starting at its address: the chain went on as if it read
    all of it, and the predicted gradient before the pick was 3.9x the
    measured one (1.4x for the chunk).  No gradient is predicted before it
    now; the forward moments carry on through it (the picked entries are
    like the others), and after it both stay within 5% of the measurement."""
    torch.manual_seed(0)
    rep = sp.check(model(), torch.randn(*x))
    assert all(r.predicted_grad_rms is None for r in rep.layers[:before])
    assert all(r.predicted_second_moment == pytest.approx(r.forward_second_moment, rel=0.05) for r in rep.layers)
    assert all(r.predicted_grad_rms == pytest.approx(r.grad_rms, rel=0.05) for r in rep.layers[before:])


def test_a_reshape_of_the_whole_output_keeps_the_theory():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.a, self.l2 = nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 10)

        def forward(self, x):
            return self.l2(self.a(self.l1(x)).view(x.shape[0], -1))

    torch.manual_seed(0)
    rep = sp.check(Flat(), torch.randn(256, 32))
    assert all(r.predicted_grad_rms is not None for r in rep.layers)
    assert all(math.isfinite(r.predicted_grad_rms) for r in rep.layers)


class _Gated(nn.Module):
    """A Mamba-like block: products of branches written in the forward (u * B(u) * silu(z))."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.in_proj = nn.Linear(d, 2 * d)
        self.act = nn.SiLU()
        self.b_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        u, z = self.in_proj(self.norm(x)).chunk(2, -1)
        return x + self.out_proj(u * self.b_proj(u) * self.act(z))


def test_a_jump_no_weight_can_make_is_not_blamed_on_a_weight():
    """``in_proj`` x1000 in a gated block: the gradient jumps 1e5x between
    ``out_proj`` and the rows before it, at the product ``u * B(u) *
    silu(z)`` that no row records.  The problem blamed ``out_proj.weight``
    (RMS 0.106, normal), "multiplies the gradient by 1.07e+05 (about RMS x
    sqrt(fan-out) = 0.598)", and told the user to re-initialise it.  A
    weight's gain is at most its Frobenius norm (3.4 here): no weight is
    named for a jump beyond it."""
    torch.manual_seed(0)
    model = nn.Sequential(*[_Gated() for _ in range(4)], nn.Linear(32, 10))
    with torch.no_grad():
        model[2].in_proj.weight.mul_(1000)
    rep = sp.check(model, torch.randn(64, 16, 32))
    assert rep.verdict == "exploding"
    named = [n for p in rep.problems for n in p.parameters]
    assert "2.out_proj.weight" not in named
    assert float(model[2].out_proj.weight.detach().norm()) < 10  # the bound the test relies on: a normal weight


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao.quantization's eager-mode API
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_quantisation_aware_linear_is_one_row():
    """After ``prepare_qat`` a Linear holds a weight fake-quantiser and an
    output observer as children: it was no row at all (only the ReLUs
    were), and a Linear x1e6 was blamed on the ReLUs around it with no
    parameter named.  The quantisers are part of their layer."""
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    layers: list[nn.Module] = [tq.QuantStub()]
    for _ in range(4):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10), tq.DeQuantStub()).train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    tq.prepare_qat(model, inplace=True)
    with torch.no_grad():
        model[5].weight.mul_(1e6)
    rep = sp.check(model, torch.randn(128, 64))
    assert [r.name for r in rep.layers if r.kind == "Linear"] == ["1", "3", "5", "7", "9"]
    assert rep.verdict == "exploding"
    assert [p.parameters for p in rep.problems if p.kind == "exploding"] == [("5.weight",)]


class _PlainBlocks(nn.Module):
    """No residual: ``blocks[i].mlp = Sequential(L x (Linear(d, d), act))``, weights of std g / sqrt(d)."""

    def __init__(self, n: int, layers: int, g: float, act: type[nn.Module], d: int = 64) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(n):
            b = nn.Module()
            b.mlp = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(d, d), act())])
            self.blocks.append(b)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, g / math.sqrt(d))
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        for b in self.blocks:
            x = b.mlp(x)
        return x


@pytest.mark.parametrize("n, layers, g, act, verdict", [(2, 8, 0.5, nn.Tanh, "vanishing"), (3, 4, 0.6, nn.Tanh, "vanishing"),
                                                        (2, 8, 2.0, nn.ReLU, "exploding")])
def test_a_trend_through_few_blocks_of_long_chains_is_found(n, layers, g, act, verdict):
    """An outside review of the first fix (which made each position in a
    block's chain a series of its own): 2 plain blocks of 8 tanh layers whose
    gradient shrinks 38,000x were "healthy" -- 2 rows a position, too few
    for a trend -- and 3 blocks of 4 measured only 2 block-steps.  Read per
    layer, from each row to its place in the next block, the trend counts
    every layer again."""
    torch.manual_seed(0)
    rep = sp.check(_PlainBlocks(n, layers, g, act), torch.randn(64, 64))
    lin = [r for r in rep.layers if r.kind == "Linear"]
    ratio = lin[0].relative_grad_rms / lin[-1].relative_grad_rms
    assert ratio < 1e-2 if verdict == "vanishing" else ratio > 1e2  # the measured change the trend must see
    assert rep.verdict == verdict


class _EqualisedLinear(nn.Linear):
    """An equalised-learning-rate layer: its weight multiplied at run time."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight * 1e5, self.bias)


def test_a_layer_that_scales_its_weight_at_run_time_is_still_named():
    """The weight-norm bound on a layer's gain holds for torch's own
    layers; a layer that multiplies its weight in ``forward`` can make any
    jump, and is named for it (the outside review's case: it lost its name
    to a message about a "long product" of ReLU layers)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(3):
        layers += [_EqualisedLinear(32, 32) if i == 2 else nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 10))
    with torch.no_grad():
        nn.init.normal_(model[4].weight)
    rep = sp.check(model, torch.randn(64, 32))
    assert [p.parameters for p in rep.problems if p.kind == "exploding"] == [("4.weight",)]


class _RaggedPreLN(nn.Module):
    """Pre-LN residual blocks whose chains ``blocks.#.mlp = Sequential(L x (Linear, GELU))`` differ in length."""

    def __init__(self, lengths: list[int], gain: float = 1.0, d: int = 32) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in lengths)
        self.blocks = nn.ModuleList(nn.Module() for _ in lengths)
        for b, n in zip(self.blocks, lengths):
            b.mlp = nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(d, d), nn.GELU())])
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, gain / math.sqrt(d))
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        for norm, b in zip(self.norms, self.blocks):
            x = x + b.mlp(norm(x))
        return x


@pytest.mark.parametrize("lengths, gain", [([2, 3, 2, 4, 3, 2], 1.0), ([3] * 5 + [2], 1.0), ([2, 3, 2, 4, 3, 2], 3.0)])
def test_blocks_with_chains_of_different_lengths_are_read_place_by_place(lengths, gain):
    """Another outside review: where the blocks' chains differ in length, a
    version that needed equal blocks fell back to neighbours and called
    these healthy blocks (Linear gradients within 5.5x of each other,
    20x at weights x3) "vanishing 1,400x" / "exploding 24,000x".  Each row
    steps to the row at its place in the next block, where there is one."""
    torch.manual_seed(0)
    rep = sp.check(_RaggedPreLN(lengths, gain), torch.randn(64, 32))
    g = [r.relative_grad_rms for r in rep.layers if r.kind == "Linear"]
    assert max(g) / min(g) < 30  # the measured spread: within the 100x a trend must exceed
    assert rep.verdict == "healthy", [p.message for p in rep.problems]
