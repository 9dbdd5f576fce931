"""What a user reads (issue 26): modules by name (an unnamed Sequential child
as ``Linear #18``), ranges as ``layers 0–99``, no internal notation, and each
problem as what, why (the number judged and what it is relative to), fix."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.words import module_label, sci, span_label, times

# words a practitioner does not use for what they read
JARGON = re.compile(r"row\(s\)|\brows?\b|cotangent|(?<![\w.])#(?!\d)| \.\. ")


def test_labels():
    assert module_label("18", "Linear") == "Linear #18"
    assert module_label("3.1", "Conv2d") == "Conv2d #3.1"
    assert module_label("encoder.layer.0.attn", "Attn") == "encoder.layer.0.attn"
    assert module_label("", "Net") == "the model (Net)"
    assert span_label("0", "Linear", "99", "Sigmoid") == "layers 0–99"
    assert span_label("7", "ReLU", "7", "ReLU") == "ReLU #7"
    assert span_label("a.fc", "Linear", "b.fc", "Linear") == "from a.fc to b.fc"
    assert times(38214.0) == "38,000x" and times(1.224) == "1.22x"
    assert sci(1e-6) == "1e-6" and sci(1000.0) == "1e3" and sci(0.5) == "0.5"


def _sigmoid_net():
    torch.manual_seed(0)
    layers = []
    for _ in range(50):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def _broken_models():
    """Each mechanism the engine names: vanishing, exploding with depth, saturated, dead, non-finite."""
    torch.manual_seed(0)
    relu_xavier = nn.Sequential(*[m for _ in range(30) for m in (nn.Linear(64, 64), nn.ReLU())])
    for layer in relu_xavier:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
    big = nn.Sequential(*[m for _ in range(30) for m in (nn.Linear(64, 64), nn.ReLU())])
    for layer in big:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.4)
    sat = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(64, 64), nn.Tanh())])
    for layer in sat:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=1.0)
    dead = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 64), nn.ReLU())])
    with torch.no_grad():
        dead[2].bias.fill_(-100.0)
    return {"vanishing": _sigmoid_net(), "vanishing (trend)": relu_xavier, "exploding": big, "saturated": sat,
            "dead": dead}


@pytest.mark.parametrize("case", ["vanishing", "vanishing (trend)", "exploding", "saturated", "dead"])
def test_each_problem_reads_as_what_why_fix_without_jargon(case):
    r = sp.check(_broken_models()[case], torch.randn(128, 64, generator=torch.Generator().manual_seed(1)))
    assert r.problems, case
    for p in r.problems:
        assert not JARGON.search(p.message), p.message
        assert not JARGON.search(p.suggestion) and not JARGON.search(p.fix("cli")), p.suggestion
        # what, then why: two sentences, the second with a number
        sentences = [s for s in re.split(r"(?<=\.) (?=[A-Z0-9])", p.message) if s]
        assert len(sentences) == 2 and all(s.endswith(".") for s in sentences), p.message
        assert re.search(r"\d", sentences[1]), p.message
        # a module by its class and index, never a bare number
        assert re.search(r"\b(Linear|Sigmoid|Tanh|ReLU) #\d+|layers \d+–\d+", p.message), p.message
        assert p.suggestion
    assert not JARGON.search(r.summary.backprop)


def test_the_vanishing_sigmoid_net_names_the_layer_and_the_bound():
    """Before: "vanishing in 0 .. 99 (100 row(s)): gradient RMS relative to the
    output's falls to 0 (underflow) (below 1e-06) and no row closer to the
    input recovers"."""
    r = sp.check(_sigmoid_net(), torch.randn(128, 64, generator=torch.Generator().manual_seed(1)))
    p = r.problems[0]
    assert p.kind == "vanishing" and p.layer == "0 .. 99"  # the record keeps the module names
    # its entries are denormal (~1e-42), not 0: the RMS underflows (test_check: not called "exactly 0")
    assert p.message.startswith("The gradient vanishes in layers 0–99. At Linear #0 the gradient's RMS underflows to 0")
    assert "below the lower bound 1e-6 times the RMS at the model's output" in p.message


def test_a_norm_adjusted_figure_is_called_one():
    """A row feeding a norm is judged by gradient x its RMS / the norm's
    output RMS: the message says so and gives the plain figure beside it.
    Here a constant zero vector (a padding position, not a parameter) meets
    a LayerNorm with eps 1e-12, so the scale-free figure is still huge."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 32)
            self.drop = nn.Dropout(0.0)
            self.norm = nn.LayerNorm(32, eps=1e-12)
            self.out = nn.Linear(32, 10)

        def forward(self, x):
            h = self.proj(x)
            h = torch.cat([torch.zeros_like(h[:, :1]), h], dim=1)
            return self.out(self.norm(self.drop(h)))

    torch.manual_seed(0)
    r = sp.check(Net(), torch.randn(8, 16, 12))
    p = next(p for p in r.problems if p.layer == "drop")
    assert p.kind == "exploding" and not p.parameters
    assert p.message.startswith("The gradient explodes toward the input at drop. Because drop feeds the norm norm")
    assert "judged scale-free" in p.message, p.message
    raw = r.layers[[layer.name for layer in r.layers].index("drop")].relative_grad_rms
    assert f"({raw:.3g} times the RMS at the model's output)" in p.message


def test_monitor_alerts_name_an_unnamed_sequential_child_by_class_and_index():
    """Before: "the optimizer step changed 2's weights by ..."."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x, t = torch.randn(32, 8), torch.randn(32, 8)
    opt = torch.optim.SGD([{"params": m[2].parameters(), "lr": 5.0}, {"params": m[0].parameters(), "lr": 0.01}])
    with sp.monitor(m, every=2) as mon:  # the update of step 2 (the first step's is not judged too large)
        for _ in range(5):
            loss = F.mse_loss(m(x), t)
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    a = next(a for a in mon.alerts if a.kind == "update-too-large")
    assert a.layer == "2" and a.message.startswith("The optimizer step changed Linear #2's weights by"), a.message


def test_cli_check_prints_flags_not_python(capsys, monkeypatch):
    """From the command line the fix is a flag of the command (--init
    critical), not a Python call the user has no model object for."""
    from signalprop.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["check", "mlp:depth=30,width=64,act=sigmoid,init=default", "--batch", "16"]) == 1
    out = capsys.readouterr().out
    assert "--init critical" in out and "critical_(model" not in out and "apply_(" not in out
    r = sp.check(_sigmoid_net(), torch.randn(16, 64))
    assert "critical_(model, inputs)" in r.problems[0].suggestion and "--init critical" in r.problems[0].fix("cli")
    with pytest.raises(ValueError, match="surface"):
        r.problems[0].fix("gui")  # type: ignore[arg-type]
