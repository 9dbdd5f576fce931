"""Low-precision headroom (signalprop.formats, check(..., dtype=), Report.precision):
the counted shares against an independent oracle -- torch's own casts to
float16, bfloat16 and FP8, counting the zeros, subnormals and infinities
they produce -- on crafted tensors and on every row of a real pass."""

import math

import pytest
import torch
from torch import nn

import signalprop as sp
from _hooks import leaf_outputs_and_grads
from signalprop import formats as F
from signalprop.records import FORMATS

CAST = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
        "float8_e5m2": torch.float8_e5m2}


def _oracle(x: torch.Tensor, fmt: str) -> dict[str, float]:
    """Shares of the nonzero entries of ``x`` that a cast to ``fmt`` makes
    infinite (overflow), zero (flushed) or smaller than the smallest normal
    (underflow).  torch's E4M3 cast saturates at 448 rather than overflowing,
    so there the cast of x/4 (exact: a power of two) is compared with 448/4:
    a value that rounds past 448 rounds past 112 at a quarter of the scale."""
    x = x.double() if x.dtype == torch.float64 else x
    nz = int((x != 0).sum())
    y = x.to(CAST[fmt]).double()
    if fmt == "float8_e4m3fn":
        over = int(((x / 4).to(CAST[fmt]).double().abs() > 112).sum())
    else:
        over = int(torch.isinf(y).sum())
    flushed = int(((y == 0) & (x != 0)).sum())
    under = int(((y.abs() < FORMATS[fmt].smallest_normal) & (x != 0)).sum())
    return {"overflow": over / nz, "underflow": under / nz, "flushed": flushed / nz}


def _boundary_values() -> list[float]:
    """Each format's thresholds and their neighbours a relative 2^-20 away."""
    out = []
    for f in FORMATS.values():
        spacing = 2.0 ** (math.floor(math.log2(f.max)) - f.mantissa_bits)
        for v in (f.smallest_subnormal / 2, f.smallest_subnormal, f.smallest_normal - f.smallest_subnormal / 2,
                  f.smallest_normal, f.max, f.max + spacing / 2, f.max + spacing):
            out += [v, -v, v * (1 + 2 ** -20), v * (1 - 2 ** -20)]
    return out


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16, torch.float16])
def test_counts_equal_what_a_cast_does_in_every_format(src):
    """Magnitudes log-uniform over 2^-160..2^130, every format's thresholds
    and their neighbours, and zeros: the shares equal the cast oracle's
    exactly, for every format, from float32, bfloat16 and float16 tensors
    (from float64 torch's casts round twice, through float32, so the oracle
    itself is off by a value there)."""
    g = torch.Generator().manual_seed(0)
    mag = torch.exp2(torch.empty(100_000, dtype=torch.float64).uniform_(-160, 130, generator=g))
    sign = torch.randint(0, 2, (100_000,), generator=g, dtype=torch.float64) * 2 - 1
    x = torch.cat([mag * sign, torch.tensor(_boundary_values(), dtype=torch.float64),
                   torch.zeros(50, dtype=torch.float64)]).to(src)
    x = x[torch.isfinite(x)]
    got = F.shares("p")(dict(zip(F.keys("p"), F.counts(x).tolist())))
    for fmt in FORMATS:
        want = _oracle(x, fmt)
        assert got[fmt] == pytest.approx(want, abs=1e-12), fmt
    assert got["float8_e4m3fn"]["overflow"] > 0.01 and got["float8_e4m3fn"]["flushed"] > 0.01  # not all zero


def test_counts_per_row_equal_counts_of_each_row():
    """The batched kernel (dim=1, one row of counts per output) against the
    whole-tensor kernel on each row."""
    g = torch.Generator().manual_seed(1)
    B = torch.randn(5, 300, generator=g) * torch.logspace(-8, 5, 5).unsqueeze(1)
    per = F.counts(B, 1)
    assert per.shape == (5, F.N_COUNTS)
    for i in range(5):
        assert torch.equal(per[i], F.counts(B[i]))


@pytest.mark.parametrize("width,batch", [(16, 8), (512, 256)])  # rows measured in a batch / each in place
def test_check_counts_every_rows_output_gradient_and_weights(width, batch):
    """check(..., dtype=) on an MLP whose first layer is scaled x300 (outputs
    past E4M3's 448, gradients small enough to flush in FP8): each row's
    shares equal the cast oracle on the tensors the same pass made, and the
    weights' on the module's own parameters together."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4))
    with torch.no_grad():
        m[0].weight.mul_(300)
    x = torch.randn(batch, width)
    r = sp.check(m, x, dtype="float16")
    outs, grads = leaf_outputs_and_grads(m, x)
    for layer in r.layers:
        for fmt in FORMATS:
            assert layer.forward_formats[fmt] == pytest.approx(_oracle(outs[layer.name], fmt), abs=1e-12)
            assert layer.grad_formats[fmt] == pytest.approx(_oracle(grads[layer.name], fmt), abs=1e-12)
        mod = dict(m.named_modules())[layer.name]
        if list(mod.parameters()):
            w = torch.cat([p.detach().reshape(-1) for p in mod.parameters()])
            assert layer.weight_absmax == w.abs().max().item()
            for fmt in FORMATS:
                assert layer.weight_formats[fmt] == pytest.approx(_oracle(w, fmt), abs=1e-12)
        else:
            assert layer.weight_formats is None
    assert r.layers[0].forward_formats["float8_e4m3fn"]["overflow"] > 0
    assert max(layer.grad_formats["float8_e4m3fn"]["flushed"] for layer in r.layers) > 0.01


def test_shares_are_counted_only_when_a_dtype_is_asked_for():
    """The counts cost passes over every tensor: a plain check leaves them out
    (the op budget of test_check_cost.py) and reads overflow off max |value| alone."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    r = sp.check(m, torch.randn(4, 8))
    assert all(layer.forward_formats is None and layer.grad_formats is None for layer in r.layers)
    p = r.precision("float16")
    assert not p.counted and p.verdict == "fits" and "max |value| only" in p.summary
    assert all(x.overflow is None for x in p.layers)


def test_precision_names_the_modules_that_would_not_survive_a_format():
    """A Linear scaled to outputs ~1e5 overflows float16 (named, with its
    share) and not bfloat16; in E4M3 its output overflows and small
    gradients flush; the summary names them; the JSON round-trips."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        m[2].weight.mul_(2e5)
    r = sp.check(m, torch.randn(64, 16), dtype="fp16")
    assert r.summary.dtype == "float16"
    p = r.precision()
    assert p.verdict == "overflows" and p.overflowing[0] == "2" and "2 output" in p.summary
    row = next(x for x in p.layers if x.layer == "2" and x.quantity == "output")
    assert row.overflow > 0 and row.headroom < 0 and row.absmax > 65504
    assert r.precision("bf16").verdict == "fits"
    assert r.precision(torch.float8_e4m3fn).dtype == "float8_e4m3fn"
    assert "2" in r.precision("fp8_e4m3").overflowing
    assert sp.records.Report.precision  # the method is on the public record
    with pytest.raises(ValueError, match="low-precision format"):
        r.precision("int8")
    with pytest.raises(ValueError, match="flush_limit"):
        r.precision("float16", flush_limit=2.0)
    with pytest.raises(ValueError, match="name the format"):
        sp.check(m, torch.randn(4, 16)).precision()
    with pytest.raises(ValueError, match="low-precision format"):
        sp.check(m, torch.randn(4, 16), dtype="float32")
    again = sp.records.LayerStats.from_dict(r.layers[2].to_dict())
    assert again.forward_formats == r.layers[2].forward_formats


def test_a_small_gradient_is_called_underflow_in_float16():
    """Gradients scaled down to ~1e-9 (a loss multiplied by 1e-9, as a tiny
    loss without loss scaling gives): most flush to zero in float16 -- the
    underflow that loss scaling exists for (Micikevicius et al. 2018) --
    and none in bfloat16."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    r = sp.check(m, torch.randn(64, 16), loss_fn=lambda y: y.square().mean() * 1e-9, dtype="float16")
    p = r.precision()
    assert p.verdict == "underflows" and "gradient" in p.summary
    assert r.precision("bfloat16").verdict == "fits"


def test_cli_dtype_flag(capsys):
    from signalprop.cli import main

    rc = main(["check", "mlp:depth=3,width=16,act=relu", "--batch", "8", "--dtype", "bf16"])
    out = capsys.readouterr().out
    assert rc == 0 and "fits" in out and "bfloat16" in out
    rc = main(["check", "mlp:depth=3,width=16,act=relu", "--batch", "8", "--dtype", "fp8_e4m3"])
    assert rc == 1 and "float8_e4m3fn" in capsys.readouterr().out
    assert main(["check", "--dtype", "int8"]) == 2
    assert "low-precision format" in capsys.readouterr().err


def test_rounding_noise_around_exact_zeros_is_not_an_underflow():
    """A causal decoder's query projection at position 0 gets a gradient that
    is exactly zero in exact arithmetic (the first query sees one key: its
    softmax is constant); float32 leaves ~1e-9 of rounding noise there, which
    float16 would flush -- 5-6% of the row's nonzero entries, over the 1%
    limit, but carrying ~1e-13 of its squared norm.  The verdict weighs what
    the flushed entries carry: "fits" (the previous version said
    "underflows" on every stock causal decoder: Qwen2, Mistral, Phi-3)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    p = sp.check(m, torch.randint(0, 128, (2, 16)), dtype="float16").precision()
    q = [x for x in p.layers if x.layer.endswith("q_proj") and x.quantity == "gradient"]
    assert q and max(x.flushed for x in q) > 0.01  # the count alone is over the limit
    assert max(x.flushed_mass for x in q) < 1e-6
    assert p.verdict == "fits", p.summary
