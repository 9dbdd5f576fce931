"""The zoo as tests: stock models healthy at every batch size and sequence
length, deliberately broken ones flagged with the right kind and module.
The verdict rules are built from mechanisms (see signalprop/probe/diagnose.py),
so each case here is a check of a mechanism, not a list the rules were fit to."""

import pytest

from signalprop.lab import zoo

transformers = pytest.importorskip("transformers")  # installed by `make test` (the [test] extra)


def _cells(cases, batches=(1, 8, 64), seqs=(8, 128)):
    return [pytest.param(c, b, s, id=f"{c.name}-b{b}" + (f"-t{s}" if c.sequence else ""))
            for c in cases for b in batches for s in (seqs if c.sequence else seqs[:1])]


@pytest.mark.parametrize("case,batch,seq", _cells(zoo.GOOD))
def test_known_good_models_are_healthy(case, batch, seq):
    row = zoo.run_case(case, batch, seq)
    assert row["verdict"] == "healthy", row["message"]


@pytest.mark.parametrize("case,batch,seq", _cells(zoo.BAD, batches=(1, 64)))
def test_known_bad_models_get_the_right_kind_and_module(case, batch, seq):
    row = zoo.run_case(case, batch, seq)
    assert row["verdict"] == case.expected, row["message"]
    if case.layer is not None:
        assert row["layer"].split(" ")[0] == case.layer, row["message"]
    assert set(case.cause) <= set(row["parameters"]), row["message"]  # the cause, by its parameters


def test_zoo_experiment_counts(tmp_path):
    from signalprop.lab import run_experiment

    res = run_experiment("zoo", tmp_path, batches=(8,), seqs=(16,),
                         cases=("llama", "relu mlp, bias -100", "nn.LSTM"))
    assert res["cells"] == 3 and res["false_alarms"] == 0 and res["misses"] == 0
    assert (tmp_path / "results.json").exists()
    assert any("false alarms" in h for h in res["headline"])
