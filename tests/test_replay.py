"""From NaN to answer (issue 28): ``monitor(dump_on_nonfinite=DIR)`` saves the
failing step; ``sp.replay`` and ``signalprop replay`` rerun it and name the
module, the phase, the operation and the line of the user's code."""

from __future__ import annotations

import json
import random
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.cli import main


class HandSoftmax(nn.Module):
    """A softmax written by hand: exp overflows to inf for large inputs, inf / inf is NaN."""

    def __init__(self):
        super().__init__()
        self.lin, self.relu = nn.Linear(16, 16), nn.ReLU()

    def forward(self, x):
        h = self.relu(self.lin(x))
        e = torch.exp(h)  # FORWARD-NAN-LINE
        return e / e.sum(-1, keepdim=True)


class NormFeature(nn.Module):
    """The length of each (masked) vector: finite forward; at a padded, all-zero
    row the square root's derivative is infinite and the backward turns NaN."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(8, 16), nn.Linear(1, 4)

    def forward(self, x, mask):
        v = self.lin(x) * mask[:, None]  # padded rows are all zero
        return self.out(torch.sqrt((v * v).sum(-1, keepdim=True)))  # BACKWARD-NAN-LINE


class Net(nn.Module):
    def __init__(self, block=HandSoftmax):
        super().__init__()
        self.inp, self.blk, self.out = nn.Linear(8, 16), block(), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.blk(torch.relu(self.inp(x))))


def _line(marker: str) -> int:
    with open(__file__) as f:
        return next(i for i, text in enumerate(f, 1) if marker in text and "_line(" not in text)


def _train(model, folder, *, blowup_at=3, steps=5, loss_fn=F.cross_entropy, give_loss=True, **kw):
    """SGD with momentum; at ``blowup_at`` the inputs are scaled by 1e3. Returns the
    monitor and the RNG states seen just before each step's forward."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = []
    mon = sp.monitor(model, every=10, dump_on_nonfinite=folder, optimizer=opt,
                     loss_fn=loss_fn if give_loss else None, grad_every=1, **kw)
    for k in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        if k == blowup_at:
            x = x * 1e3
        before.append((torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()))
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        mon.step(loss, targets=y)
        opt.step()
    mon.close()
    return mon, opt, before


def test_a_forward_nan_is_dumped_and_replayed_to_the_operation_and_line(tmp_path):
    d = tmp_path / "dump"
    model = Net()
    mon, opt, before = _train(model, d)
    [alert] = [a for a in mon.alerts if a.kind == "non-finite"]
    assert alert.step == 3 and str(d) in alert.message and "signalprop replay" in alert.message
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["loss"] == "nan" and manifest["model_class"].endswith(".Net")
    assert manifest["torch"] == torch.__version__ and manifest["loss_fn"] == "saved" and manifest["targets"]
    # what the step's forward started from, and the optimizer's state as it was at that step
    rng = torch.load(d / "rng.pt", weights_only=True)
    assert torch.equal(rng["torch"], before[3][0])
    assert tuple(rng["python"][1]) == before[3][1][1] and np.array_equal(rng["numpy"][1], before[3][2])
    saved_opt = torch.load(d / "optimizer.pt", weights_only=True)
    assert set(saved_opt["state"]) == set(range(6)) and "momentum_buffer" in saved_opt["state"][0]

    fresh = Net()
    state = torch.get_rng_state()
    r = sp.replay(d, model=fresh)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    assert r.nonfinite and r.step == 3 and r.module == "blk" and r.kind == "HandSoftmax" and r.phase == "forward"
    assert r.origin.operation == "torch.exp" and r.origin.phase == "forward" and r.origin.module == "blk"
    assert r.origin.line.file == __file__ and r.origin.line.line == _line("FORWARD-NAN-LINE")
    assert "torch.exp(h)" in r.origin.line.code
    assert r.origin.frames[-2].function == "forward" and "self.blk(" in r.origin.frames[-2].code  # the caller
    text = str(r)
    assert "torch.exp" in text and f"{__file__}:{_line('FORWARD-NAN-LINE')}" in text and "blk (HandSoftmax)" in text
    assert r.to_dict()["origin"]["frames"][-1]["line"] == _line("FORWARD-NAN-LINE")
    # the replay loaded the dumped weights: those of the failing step, not the fresh ones
    saved = torch.load(d / "model.pt", weights_only=True)
    assert all(torch.equal(p, saved[n]) for n, p in fresh.named_parameters())


def test_a_backward_nan_names_the_forward_operation_whose_backward_made_it(tmp_path):
    """Two forward arguments (inputs and a padding mask) saved and replayed."""
    d = tmp_path / "dump"
    torch.manual_seed(0)
    model = NormFeature()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with sp.monitor(model, every=10, dump_on_nonfinite=d, grad_every=1, loss_fn=F.cross_entropy) as mon:
        for k in range(3):
            x, y, mask = torch.randn(16, 8), torch.randint(0, 4, (16,)), torch.ones(16)
            if k == 1:
                mask[5:] = 0  # padding from this step on
            loss = F.cross_entropy(model(x, mask=mask), y)
            opt.zero_grad()
            loss.backward()
            mon.step(loss, targets=y)
            opt.step()
    [a] = [a for a in mon.alerts if a.kind == "non-finite"]
    assert a.step == 1 and a.phase == "backward"
    r = sp.replay(d, model=NormFeature())
    assert r.nonfinite and r.phase == "backward"
    assert r.origin.phase == "backward" and r.origin.operation == "torch.sqrt" and r.origin.module == ""
    assert r.origin.line.file == __file__ and r.origin.line.line == _line("BACKWARD-NAN-LINE")


def _log_softmax_by_hand(out, y):  # a loss that takes log of a probability that underflows to 0
    p = out.softmax(-1).gather(1, y[:, None])
    return -torch.log(p).mean()  # LOSS-NAN-LINE


def test_a_nan_made_by_the_loss_function(tmp_path):
    """A loss given as a closure does not pickle: the dump says so, the replay
    without it cannot see the loss's NaN and says why, with it names the loss."""
    d = tmp_path / "dump"

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x):
            return self.lin(x)

    loss_fn = lambda out, y: _log_softmax_by_hand(out, y)  # noqa: E731
    with torch.no_grad():
        m = Plain()
    mon, _, _ = _train(m, d, loss_fn=loss_fn, blowup_at=2, steps=3)
    assert [a.layer for a in mon.alerts if a.kind == "non-finite"] == ["(loss)"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["loss_fn"].startswith("not saved")
    r = sp.replay(d, model=Plain())
    assert not r.nonfinite and any("no loss function" in n for n in r.notes)
    r = sp.replay(d, model=Plain(), loss_fn=loss_fn)
    assert r.nonfinite and r.module == "(loss)" and r.origin.operation == "torch.log"
    assert r.origin.line.line == _line("LOSS-NAN-LINE") and r.origin.module == "(loss)"


def test_no_dump_while_finite_and_training_is_unchanged_by_dumping(tmp_path):
    d = tmp_path / "dump"

    def run(folder):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        mon = sp.monitor(model, every=2, dump_on_nonfinite=folder)
        for _ in range(4):
            loss = F.cross_entropy(model(torch.randn(16, 8, generator=g)), torch.randint(0, 4, (16,), generator=g))
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
        mon.close()
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state(), random.getstate()

    a, b = run(d), run(None)
    assert not d.exists()
    assert torch.equal(a[1], b[1]) and a[2] == b[2] and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def test_a_dump_that_cannot_be_written_is_a_warning_and_training_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="could not be dumped"):
        mon, _, _ = _train(Net(), blocker / "dump", steps=5)
    assert [a.step for a in mon.alerts if a.kind == "non-finite"] == [3] and mon.steps == [0, 1, 2, 3, 4]


def test_replay_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sp.replay(tmp_path / "nothing", model=Net())
    with pytest.raises(ValueError, match="holds no dump"):
        sp.replay(tmp_path, model=Net())
    d = tmp_path / "dump"
    _train(Net(), d)
    with pytest.raises(ValueError, match="is of a .*Net, the model given is a .*Linear"):
        sp.replay(d, model=nn.Linear(8, 4))
    other = Net()
    other.out = nn.Linear(16, 5)
    with pytest.raises(ValueError, match="does not fit the dump"):
        sp.replay(d, model=other)
    with pytest.raises(TypeError, match="nn.Module"):
        sp.replay(d, model="Net")
    (d / "model.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="unreadable dump"):
        sp.replay(d, model=Net())


FACTORY = textwrap.dedent('''
    import torch
    from torch import nn


    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            e = torch.exp(self.lin(x))
            return e / e.sum(-1, keepdim=True)


    class Model(nn.Module):
        def __init__(self, width: int = 16):
            super().__init__()
            self.inp, self.blk, self.out = nn.Linear(8, width), Blk(), nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.blk(self.inp(x)))


    def factory(width: int = 16):
        return Model(width)
''')


def test_cli_replay(tmp_path, monkeypatch, capsys):
    (tmp_path / "sp_replay_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import sp_replay_factory

    d = tmp_path / "dump"
    _train(sp_replay_factory.factory(), d)
    capsys.readouterr()
    assert main(["replay", str(d), "--model", "sp_replay_factory:factory", "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "torch.exp" in out and "sp_replay_factory.py:12" in out and "blk (Blk), forward pass" in out
    assert json.loads((tmp_path / "r.json").read_text())["origin"]["operation"] == "torch.exp"
    # bad input: exit 2, one line on stderr
    for argv, match in ((["replay", str(tmp_path / "none"), "--model", "sp_replay_factory:factory"], "does not exist"),
                        (["replay", str(tmp_path), "--model", "sp_replay_factory:factory"], "holds no dump"),
                        (["replay", str(d), "--model", "sp_replay_factory:factory:width=8"], "does not fit the dump"),
                        (["replay", str(d), "--model", "torch.nn:Identity"], "is of a"),
                        (["replay", str(d), "--model", "sp_replay_factory:nothing"], "no callable"),
                        (["replay", str(d), "--model", "sp_replay_factory:factory", "--loss", "torch.nn:nope"],
                         "no callable")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
    (d / "rng.pt").write_bytes(b"")
    assert main(["replay", str(d), "--model", "sp_replay_factory:factory"]) == 2
    assert "unreadable dump" in capsys.readouterr().err
    # with the loss given on the command line (F.cross_entropy of the output and the saved targets)
    d2 = tmp_path / "dump2"
    _train(sp_replay_factory.factory(), d2, give_loss=False)
    assert json.loads((d2 / "manifest.json").read_text())["loss_fn"] == "none given"
    assert main(["replay", str(d2), "--model", "sp_replay_factory:factory", "--loss",
                 "torch.nn.functional:cross_entropy"]) == 1
    assert "torch.exp" in capsys.readouterr().out


def test_the_exact_pass_keeps_every_rows_output_so_no_address_is_reused():
    """``torch.exp(self.proj(x))``: proj's output is freed after exp, and a
    later tensor may take its address, making the next row look like it reads
    proj's output (``src == dst``), which hides the operation between them and
    named the following Linear instead of the block (seen on a replay). The
    exact pass holds every row's output for the pass."""
    from signalprop.probe.recorder import Recorder

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            e = torch.exp(self.proj(x))
            return e / e.sum(-1, keepdim=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Blk(), nn.Linear(16, 4))
    rec = Recorder(model, exact=True)
    rec.attach()
    try:
        model(torch.randn(32, 8))
    finally:
        rec.detach()
    assert [r.name for r in rec.rows] == ["0", "1.proj", "2"]
    assert all(r.output() is not None for r in rec.rows)  # proj's output, a temporary, is still alive
    r = sp.check(model, torch.randn(32, 8) * 1e3, loss_fn=F.cross_entropy, targets=torch.randint(0, 4, (32,)))
    assert r.verdict == "non-finite" and r.problems[0].layer == "1" and "own forward code" in r.problems[0].message


class _MaskedThenLog(nn.Module):
    """A causal mask of -inf written on purpose (torch.full, then masked_fill
    with -inf), softmax over it (finite), then a log of a negative number."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        n = x.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = (x @ x.transpose(1, 2)).masked_fill(future, float("-inf")) + mask
        h = torch.softmax(scores, dim=-1) @ x
        return torch.log(self.proj(h) - 100.0)  # negative: NaN


def test_a_mask_of_infinities_is_not_the_first_nan():
    """-inf written on purpose (a factory given -inf, masked_fill with -inf)
    is a mask, not the NaN's origin: the watch names torch.log, the first
    operation to make a NaN from finite inputs."""
    from signalprop.probe.nonfinite_op import locate

    torch.manual_seed(0)
    model = _MaskedThenLog()
    x = torch.randn(2, 5, 4)
    origin = locate(model, lambda: model(x).sum(), lambda loss: loss.backward())
    assert origin is not None and origin.operation == "torch.log" and origin.phase == "forward", origin
