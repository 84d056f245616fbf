"""Qwen2/2.5, Qwen3 and GPT-2: kdtune logits == transformers logits on tiny random checkpoints (fp32)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdtune.models import load_hf_model

QWEN = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _compare(model, ref, vocab=256, t=24):
    tokens = torch.randint(0, vocab, (2, t))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_qwen2_logits_match_transformers(tie, tmp_path, hf_save):
    ref = hf_save("Qwen2Config", "Qwen2ForCausalLM", tmp_path, **QWEN, num_key_value_heads=2, tie_word_embeddings=tie)
    model = load_hf_model(tmp_path)
    assert model.hf_family == "qwen2"
    assert model.layers[0].attn.q_proj.bias is not None and model.layers[0].attn.output_proj.bias is None
    _compare(model, ref)


@pytest.mark.parametrize("tie", [True, False])
def test_qwen3_logits_match_transformers(tie, tmp_path, hf_save):
    # head_dim 32 != hidden/heads = 16: Qwen3 decouples them
    ref = hf_save(
        "Qwen3Config", "Qwen3ForCausalLM", tmp_path, **QWEN, num_key_value_heads=2, head_dim=32, tie_word_embeddings=tie
    )
    model = load_hf_model(tmp_path)
    assert model.hf_family == "qwen3" and model.layers[0].attn.q_norm is not None
    _compare(model, ref)


GPT2 = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)


def test_gpt2_logits_match_transformers(tmp_path, hf_save):
    ref = hf_save("GPT2Config", "GPT2LMHeadModel", tmp_path, **GPT2)
    model = load_hf_model(tmp_path)
    assert model.hf_family == "gpt2" and model.output is None
    _compare(model, ref)


def test_gpt2_loads_unprefixed_keys_with_mask_buffers(tmp_path, hf_save):
    """Original GPT-2 files name tensors ``h.0.attn.c_attn.weight`` (no ``transformer.``) and carry ``attn.bias``."""
    ref = hf_save("GPT2Config", "GPT2LMHeadModel", tmp_path, **GPT2, n_inner=80)
    state = load_file(str(tmp_path / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in state.items()}
    renamed["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _compare(load_hf_model(tmp_path), ref)


def test_gpt2_state_dict_to_hf_round_trips(tmp_path, hf_save):
    from kdtune.models.gpt2 import FAMILY

    hf_save("GPT2Config", "GPT2LMHeadModel", tmp_path, **GPT2)
    hf_state = load_file(str(tmp_path / "model.safetensors"))
    model = load_hf_model(tmp_path)
    back = FAMILY.state_dict_to_hf(model.state_dict(), model.hf_config)
    assert set(back) == set(hf_state) - {"lm_head.weight"}
    for k, v in back.items():
        assert torch.equal(v, hf_state[k]), k


@pytest.mark.parametrize("extra", [dict(), dict(partial_rotary_factor=0.5, sliding_window=6)])
def test_phi3_logits_match_transformers(extra, tmp_path, hf_save):
    from kdtune.models.phi3 import FAMILY

    ref = hf_save("Phi3Config", "Phi3ForCausalLM", tmp_path, **QWEN, num_key_value_heads=2, pad_token_id=0, **extra)
    model = load_hf_model(tmp_path)
    assert model.hf_family == "phi3"
    _compare(model, ref)
    hf_state = load_file(str(tmp_path / "model.safetensors"))
    back = FAMILY.state_dict_to_hf(model.state_dict(), model.hf_config)
    assert set(back) == set(hf_state) and all(torch.equal(back[k], hf_state[k]) for k in back)


def test_gemma_logits_match_transformers(tmp_path, hf_save):
    ref = hf_save(
        "GemmaConfig", "GemmaForCausalLM", tmp_path, **QWEN, num_key_value_heads=1, head_dim=32, pad_token_id=0
    )
    model = load_hf_model(tmp_path)
    assert model.hf_family == "gemma" and model.output is None
    _compare(model, ref)
    # bf16: the sqrt(D) embedding scale is rounded to bf16 as HF does, and norms multiply in fp32
    ref16, m16 = ref.to(torch.bfloat16), load_hf_model(tmp_path, dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(m16(tokens), ref16(tokens).logits, atol=1e-2, rtol=1e-2)
