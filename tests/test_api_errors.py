"""Bad input to the Python API: a clear exception type and message, and the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import signalprop as sp


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))

CASES = [
    ("trend nan", lambda m: sp.check(m, X, trend=float("nan")), "trend must be > 1"),
    ("bounds inf", lambda m: sp.check(m, X, bounds=(1e-6, float("inf"))), "0 < low < high"),
    ("monitor agc True", lambda m: sp.monitor(m, agc=True), "agc must be a positive clipping factor"),
    ("isometry", lambda m: sp.init.critical_(m, isometry=-1), "isometry must be a positive number"),
    ("q_star", lambda m: sp.init.critical_(m, q_star=0.0), "q_star must be a positive number"),
    ("normal(1e400)", lambda m: sp.init.apply_(m, "normal(1e400)"), "positive finite number, got inf"),
    ("normal(-1)", lambda m: sp.init.apply_(m, "normal(-1)"), "positive finite number, got -1"),
    ("loss not scalar", lambda m: sp.check(m, X, loss_fn=lambda o: o), "shape (6, 2)"),
    ("loss a float", lambda m: sp.check(m, X, loss_fn=lambda o: 1.0), "got float 1.0"),
    ("traced", lambda m: sp.check(torch.jit.trace(m, X), X), "TorchScript"),
    ("compiled", lambda m: sp.check(torch.compile(m), X), "model._orig_mod"),
    ("monitor traced", lambda m: sp.monitor(torch.jit.trace(m, X)), "TorchScript"),
]


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")  # users still trace
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_bad_arguments_raise_clear_errors_and_change_nothing(name):
    _, call, message = next(c for c in CASES if c[0] == name)
    m = _mlp()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(m)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_tensor_level_errors():
    with pytest.raises(ValueError, match="too narrow"):
        sp.init.scaled_trunc_normal_(torch.empty(3, 3), bound=1e-9)
    with pytest.raises(ValueError, match="two positive numbers"):
        sp.init.variance_scaling_(torch.empty(3, 3), fans=(0, 0))


def test_inference_mode_and_constant_output_say_what_is_wrong():
    m = _mlp()
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        sp.check(m, X)

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).detach() * 0 + 1

    with pytest.raises(ValueError, match="does not depend on any parameter"):
        sp.check(Constant(), torch.ones(3, 4, dtype=torch.long).float().requires_grad_(False).detach())
    frozen = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).requires_grad_(False)
    with pytest.raises(ValueError, match="all parameters frozen"):
        sp.check(frozen, torch.ones(3, 4, dtype=torch.long))  # token ids: no floating input either


def test_generator_on_another_device_is_refused():
    m = _mlp().to("meta")  # parameters on a device no CPU generator can fill
    with pytest.raises(ValueError, match="cpu generator but the model's parameters are on meta"):
        sp.init.apply_(m, "xavier_normal", generator=torch.Generator())


def test_limits_that_are_not_numbers_are_refused_by_name():
    """A string for trend or a bound was compared with a number inside
    ("'<' not supported between instances of 'int' and 'str'"): the error
    now names the arguments, for check and monitor alike."""
    for call in (lambda m: sp.check(m, X, trend="x"), lambda m: sp.monitor(m, bounds=(1e-6, "1e3"))):
        with pytest.raises(TypeError, match="bounds and trend are numbers"):
            call(_mlp())
