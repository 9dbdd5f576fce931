"""``signalprop.init`` draws the numbers ``torch.nn.init`` draws: every name
torch exports, under the same global seed and under the same generator, in
float32, float64, bfloat16 and float16 wherever torch supports the dtype,
compared with ``torch.equal`` -- and afterwards the generator is in the same
state (the same number of draws, so what the caller draws next is the same)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import signalprop.init as init

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(40, 24), (24, 40), (8, 6, 3, 3)]  # tall, wide (orthogonal draws then transposes), a conv weight

# How to call each of torch.nn.init's names: positional arguments after the tensor.  A name torch
# adds and this table lacks fails test_every_torch_name_has_a_recipe, so none can be left unchecked.
TRUNC = [(), (0.2, 0.5, -0.3, 1.1), (0.0, 1.0, 2.0, 3.0), (1.0, 0.1, -1.0, 0.5), (0.0, 1.0, 5.0, 6.0)]
RECIPES: dict[str, list[tuple]] = {
    "uniform_": [(), (-0.4, 0.9)], "normal_": [(), (0.3, 2.0)], "trunc_normal_": TRUNC,
    "constant_": [(0.7,)], "ones_": [()], "zeros_": [()], "eye_": [()], "dirac_": [(), (2,)],
    "xavier_uniform_": [(), (1.5,)], "xavier_normal_": [(), (1.5,)],
    "kaiming_uniform_": [(), (math.sqrt(5),), (0.0, "fan_out", "relu")],
    "kaiming_normal_": [(), (0.1, "fan_out", "leaky_relu")], "orthogonal_": [(), (0.8,)],
    "sparse_": [(0.3,), (0.1, 0.2), (0.0,), (1.0,)],
}
RECIPES.update({n[:-1]: RECIPES[n][:1] for n in list(RECIPES) if n[:-1] in torch.nn.init.__all__})
TAKES_GENERATOR = {"uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                   "kaiming_normal_", "orthogonal_", "sparse_"}


def test_every_torch_name_has_a_recipe():
    names = set(torch.nn.init.__all__) - {"calculate_gain"}
    assert names <= set(RECIPES), f"add a recipe for {sorted(names - set(RECIPES))}"
    assert all(hasattr(init, n) for n in torch.nn.init.__all__), \
        [n for n in torch.nn.init.__all__ if not hasattr(init, n)]


def test_calculate_gain_values_are_torchs():
    for name in ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                 "conv_transpose3d", "sigmoid", "tanh", "relu", "selu"):
        assert init.calculate_gain(name) == torch.nn.init.calculate_gain(name)
    for slope in (None, 0, 0.01, 0.2, 3):
        assert init.calculate_gain("leaky_relu", slope) == torch.nn.init.calculate_gain("leaky_relu", slope)


def _run(module, name, shape, dtype, args, generator_seed):
    """The tensor ``module.name`` fills and the next draw from the generator
    used (the global one, seeded 0, or a fresh one); or the exception torch raised."""
    t = torch.empty(shape, dtype=dtype)
    g = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    torch.manual_seed(0)
    kwargs = {} if g is None else {"generator": g}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated names, a mean outside [a, b]: both warn alike
        try:
            getattr(module, name)(t, *args, **kwargs)
        except (ValueError, RuntimeError, NotImplementedError) as e:
            return e, None
    return t, torch.rand(4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_values_as_torch_for_the_same_global_seed(name, dtype):
    for shape in SHAPES:
        for args in RECIPES[name]:
            theirs, after_theirs = _run(torch.nn.init, name, shape, dtype, args, None)
            ours, after_ours = _run(init, name, shape, dtype, args, None)
            if isinstance(theirs, NotImplementedError):  # torch's QR has no half precision: ours draws anyway
                assert isinstance(ours, torch.Tensor) and bool(torch.isfinite(ours).all())
                continue
            if isinstance(theirs, Exception):  # a shape torch refuses: refused here too
                assert isinstance(ours, ValueError), (name, shape, theirs, ours)
                continue
            assert isinstance(ours, torch.Tensor), (name, shape, args, ours)
            assert torch.equal(ours, theirs), (name, shape, dtype, args)
            assert torch.equal(after_ours, after_theirs), ("a different number of draws", name, shape, args)


@pytest.mark.parametrize("name", sorted(TAKES_GENERATOR - {"sparse_"}))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_values_as_torch_for_the_same_generator(name, dtype):
    for shape in SHAPES:
        for args in RECIPES[name]:
            theirs, after_theirs = _run(torch.nn.init, name, shape, dtype, args, 7)
            ours, after_ours = _run(init, name, shape, dtype, args, 7)
            if isinstance(theirs, Exception):
                continue  # refusals are compared above
            assert isinstance(ours, torch.Tensor) and torch.equal(ours, theirs), (name, shape, dtype, args)
            assert torch.equal(after_ours, after_theirs), ("a different number of draws", name, shape, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_with_a_generator_draws_torchs_values_and_its_zeros_from_the_generator(dtype):
    """torch 2.13 draws sparse_'s normal values from ``generator`` but each
    column's zero rows from the global generator; here both come from
    ``generator``.  So: the same nonzero values where both are nonzero, the
    same count of zeros per column, and a result the generator alone decides."""
    def ours(global_seed):
        torch.manual_seed(global_seed)
        return init.sparse_(torch.empty(40, 24, dtype=dtype), 0.3, generator=torch.Generator().manual_seed(7))

    torch.manual_seed(0)
    theirs = torch.nn.init.sparse_(torch.empty(40, 24, dtype=dtype), 0.3, generator=torch.Generator().manual_seed(7))
    a = ours(0)
    both = (a != 0) & (theirs != 0)
    assert torch.equal(a[both], theirs[both]) and int(both.sum()) > 0.4 * a.numel()
    assert torch.equal((a == 0).sum(0), (theirs == 0).sum(0))
    assert torch.equal(a, ours(1))  # the global seed plays no part
