"""make_tiny_hf_checkpoint writes a directory that transformers and kdtune load to identical logits."""

from __future__ import annotations

import pytest
import torch

from kdtune.models import load_hf_model
from kdtune.testing import make_tiny_hf_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "family,tie",
    [
        ("llama", False),
        ("llama", True),
        ("mistral", False),
        ("qwen2", True),
        ("qwen3", False),
        ("phi3", False),
        ("gpt2", True),
    ],
)
def test_tiny_checkpoint_loads_in_transformers(family, tie, tmp_path):
    path = make_tiny_hf_checkpoint(
        tmp_path / "m", family, vocab_size=128, dim=32, layers=2, heads=4, kv_heads=2, tie=tie
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = load_hf_model(path)
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=2e-5, rtol=1e-5)


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = load_hf_model(make_tiny_hf_checkpoint(tmp_path / "a", seed=3, vocab_size=64, dim=16, heads=2, kv_heads=1))
    b = load_hf_model(make_tiny_hf_checkpoint(tmp_path / "b", seed=3, vocab_size=64, dim=16, heads=2, kv_heads=1))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_llama3_scaled_rope_config_written_by_kdtune_loads_in_transformers(tmp_path):
    """Legacy ``rope_theta`` + ``rope_scaling`` keys (what kdtune writes) mean the same to transformers."""
    scaling = dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    )
    path = make_tiny_hf_checkpoint(
        tmp_path,
        "llama",
        vocab_size=128,
        dim=32,
        heads=4,
        kv_heads=1,
        tie=True,
        rope_theta=500000.0,
        rope_scaling=scaling,
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = load_hf_model(path)
    tokens = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("builder", ["llama", "qwen2", "qwen3", "gpt2"])
def test_generic_builder_hf_config_loads_in_transformers(builder, tmp_path):
    """A never-loaded model's synthesised ``hf_config`` describes it: transformers builds the same architecture."""
    import json

    from safetensors.torch import save_file

    from kdtune.models._family import registered_families

    dims = dict(vocab_size=64, num_layers=2, num_heads=2, embed_dim=16)
    if builder == "gpt2":
        from kdtune.models.gpt2 import gpt2 as build

        model = build(**dims)
    else:
        mod = __import__(f"kdtune.models.{builder}", fromlist=[builder])
        extra = dict(head_dim=16) if builder == "qwen3" else {}
        model = getattr(mod, builder)(**dims, num_kv_heads=1, intermediate_dim=24, **extra)
    model.init_weights(0.1)
    fam = registered_families()[model.hf_family]
    (tmp_path / "config.json").write_text(json.dumps(model.hf_config))
    save_file(fam.state_dict_to_hf(model.state_dict(), model.hf_config), str(tmp_path / "model.safetensors"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=2e-5, rtol=1e-5)
