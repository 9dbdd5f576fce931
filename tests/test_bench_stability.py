"""The early-warning benchmark's stability limit (benchmarks/bench_stability.py):
its curvature estimate against the exact Hessian, and its promise that the
estimate leaves the run it measures untouched."""

import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_stability as B
from signalprop.lab.training_runs import RunSpec, run


def _tiny(seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)


def _exact_top_eigenvalue(model, x, y):
    """The batch loss's Hessian over the flattened parameters by double
    backward in float64 (torch.autograd.functional.hessian), its largest
    eigenvalue by eigvalsh."""
    m64 = copy.deepcopy(model).double()
    named = [(n, p.shape) for n, p in m64.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])

    def loss(w):
        parts, i = {}, 0
        for n, shape in named:
            k = int(np.prod(shape))
            parts[n] = w[i:i + k].reshape(shape)
            i += k
        return F.cross_entropy(torch.func.functional_call(m64, parts, (x.double(),)), y)

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])


def test_largest_eigenvalue_matches_the_exact_hessian():
    """Oracle: the exact Hessian's largest eigenvalue.  The estimate (Lanczos
    over central differences of float32 gradients) is asked for 5% (TOL); the
    bound here is 10%, room for the differences' rounding; a missing 1/2 in
    the difference, or weights not put back, miss it by far more."""
    for seed in range(4):
        model, x, y = _tiny(seed)
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        n = sum(p.numel() for p in params)
        lam, vec = B._sharpness(model, params, x, y, np.random.default_rng(seed).standard_normal(n))
        assert all(torch.equal(a, b) for a, b in zip(before, params)), "the weights must come back bit for bit"
        exact = _exact_top_eigenvalue(model, x, y)
        assert exact > 0.05
        assert abs(lam - exact) <= 0.1 * exact, (seed, lam, exact)
        assert vec is not None and vec.shape == (n,)


def test_onset_is_where_the_run_leaves_the_edge_for_good():
    """A run that hovers at the bound and comes back (edge of stability) has
    its first crossing early and its onset at the last entry past the bound;
    failed reads at the end (non-finite curvature) count as past it."""
    b = B.BOUND
    hover = [1.0, b + 1, b - 1, b + 0.5, b - 0.1, 2.0, b + 2, b + 5, None]
    assert B.crossings(hover) == (1, 6)
    assert B.crossings([1.0, 2.0, b]) == (None, None)  # at the bound is not past it
    assert B.crossings([b + 1, b + 2]) == (0, 0)
    # read every 3rd step: the steps between are not readings, past the bound or otherwise
    assert B.crossings([1.0, None, None, 2.0, None, None, b + 1, None], every=3) == (6, 6)
    assert B.crossings([1.0, None, None, 2.0, None], every=3) == (None, None)


def test_the_measured_run_is_the_plain_run():
    """The curvature is read on the weights put back bit for bit and without
    drawing from the run's generators, so the losses equal those of the same
    spec trained by lab.training_runs.run, unmonitored, step for step."""
    spec = RunSpec("mlp", 0.05, seed=3, steps=6)
    ours = B.run(spec)
    plain = run(spec, monitored=False)
    assert ours["losses"] == plain["losses"]
    assert ours["first_nonfinite"] is None
    assert all(r is not None and r > 0 for r in ours["lr_lambda"])


def test_summary_counts_leads_against_the_bound():
    """Leads of 10 or more count; signalprop is set beside the runs it shares."""
    def row(nf, lead, onset_lead, sp=None, intent="high", top=9.0):
        return {"family": "f", "intent": intent, "first_nonfinite": nf, "lead": lead, "onset_lead": onset_lead,
                "max_lr_lambda": top, **({"signalprop": {"lead": sp}} if sp is not False else {})}
    rows = [row(30, 18, 12, sp=15), row(30, 18, 9, sp=11), row(20, 5, 5, sp=None), row(20, None, None, sp=False),
            row(None, None, None, sp=False, intent="low", top=2.5)]
    s = B.summarise(rows)["f"]
    assert (s["diverged"], s["crossed_10_ahead"], s["onset_10_ahead"], s["healthy"], s["healthy_max_lr_lambda"]) \
        == (4, 2, 1, 1, 2.5)
    assert (s["signalprop_runs_matched"], s["signalprop_warned_10_ahead"],
            s["signalprop_warned_10_ahead_where_onset_10_ahead"]) == (3, 2, 1)
    assert B.summarise(rows)["all"]["diverged"] == 4
    assert B.BOUND == 3.8
