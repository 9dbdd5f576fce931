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


def test_hf_activation_modules_are_the_registry_entries_they_compute():
    """transformers' own activation classes (ACT2FN) are read as the registry's
    entries, each equal to the module on a grid (float64), so their rows are
    judged as torch's GELU/SiLU rows are: a ViT whose second MLP is dead
    (fc1's bias -100) was called healthy."""
    from transformers import activations as hf

    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    for cls, name in [("GELUActivation", "gelu"), ("GELUTanh", "gelu_tanh"), ("NewGELUActivation", "gelu_tanh"),
                      ("FastGELUActivation", "gelu_tanh"), ("SiLUActivation", "silu"), ("MishActivation", "mish")]:
        m = getattr(hf, cls)()
        a = sp.activations.from_module(m)
        assert a is not None and a.name == name, cls
        assert torch.allclose(m(x), torch.from_numpy(a.phi(x.numpy())), rtol=0, atol=1e-11), cls
    assert sp.activations.from_module(hf.QuickGELUActivation()) is None  # x * sigmoid(1.702 x): not one we model
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8)
    torch.manual_seed(0)
    v = transformers.ViTModel(cfg)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert sp.check(v, x).verdict == "healthy"
    with torch.no_grad():
        v.layers[1].mlp.fc1.bias.fill_(-100.0)
    r = sp.check(v, x)
    assert r.verdict == "dead" and r.problems[0].layer == "layers.1.mlp.activation_fn"
