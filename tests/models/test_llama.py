"""Llama / Mistral: kdtune logits == transformers logits on tiny random checkpoints (fp32)."""

from __future__ import annotations

import pytest
import torch

from kdtune.models import load_hf_model

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

CASES = {
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "llama3_scaled_tied": dict(
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "mha_biases": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5),
    "head_dim_decoupled": dict(num_key_value_heads=2, head_dim=32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_logits_match_transformers(case, tmp_path, hf_save):
    ref = hf_save("LlamaConfig", "LlamaForCausalLM", tmp_path, **TINY, **CASES[case])
    model = load_hf_model(tmp_path)
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = model(tokens)
    assert model.hf_family == "llama"
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_mistral_logits_match_transformers(tmp_path, hf_save):
    ref = hf_save("MistralConfig", "MistralForCausalLM", tmp_path, **TINY, num_key_value_heads=2, sliding_window=4096)
    model = load_hf_model(tmp_path)
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=2e-5, rtol=1e-5)


def test_mistral_sliding_window_matches_transformers(tmp_path, hf_save):
    ref = hf_save("MistralConfig", "MistralForCausalLM", tmp_path, **TINY, num_key_value_heads=2, sliding_window=5)
    model = load_hf_model(tmp_path)
    assert model.sliding_window == 5
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        full = model(tokens)
        torch.testing.assert_close(full, ref(tokens).logits, atol=2e-5, rtol=1e-5)
        model.setup_caches(2, 16)
        steps = [model(tokens[:, :3])] + [model(tokens[:, i : i + 1]) for i in range(3, 16)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
