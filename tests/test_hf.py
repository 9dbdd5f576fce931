"""Real models no one here wrote: HuggingFace GPT-2 and BERT built from a config
(random weights, nothing downloaded)."""

import re

import pytest
import torch

import signalprop as sp

transformers = pytest.importorskip("transformers")  # installed by `make test` (the [test] extra)


def _blocks(report, pattern):
    return {int(m.group(1)) for layer in report.layers if (m := re.search(pattern, layer.name))}


def test_gpt2_from_config():
    cfg = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=200, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    r = sp.check(model, {"input_ids": ids})
    assert _blocks(r, r"\.h\.(\d+)\.") == {0, 1, 2}
    assert all(layer.grad_rms is not None for layer in r.layers if ".h." in layer.name and "drop" not in layer.name)
    assert r.verdict == "healthy", [p.message for p in r.problems]


def test_bert_from_config():
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=300, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    r = sp.check(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert _blocks(r, r"encoder\.layer\.(\d+)\.") == {0, 1}
    assert any(layer.kind == "LayerNorm" for layer in r.layers)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
