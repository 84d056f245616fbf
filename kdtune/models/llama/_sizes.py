"""Size table of the Llama family: the architecture fields of each model's public HF ``config.json``."""

from __future__ import annotations

from typing import Any


def _llama(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_scaling": None,
    }
    base.update(kw)
    return base


_LLAMA3_VOCAB = {"vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001, "rope_theta": 500000.0}


def _llama3_scaling(factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


_LLAMA2 = {"vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0}

SIZES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-{1B,3B}: tied embeddings, llama3 RoPE scaling factor 32
    "llama3_2_1b": _llama(
        _name_or_path="meta-llama/Llama-3.2-1B",
        **_LLAMA3_VOCAB,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_scaling=_llama3_scaling(32.0),
        tie_word_embeddings=True,
    ),
    "llama3_2_3b": _llama(
        _name_or_path="meta-llama/Llama-3.2-3B",
        **_LLAMA3_VOCAB,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_scaling=_llama3_scaling(32.0),
        tie_word_embeddings=True,
    ),
    # meta-llama/Llama-3.1-{8B,70B}: llama3 RoPE scaling factor 8
    "llama3_1_8b": _llama(
        _name_or_path="meta-llama/Llama-3.1-8B",
        **_LLAMA3_VOCAB,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_scaling=_llama3_scaling(8.0),
    ),
    "llama3_1_70b": _llama(
        _name_or_path="meta-llama/Llama-3.1-70B",
        **_LLAMA3_VOCAB,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_scaling=_llama3_scaling(8.0),
    ),
    # meta-llama/Meta-Llama-3-{8B,70B}
    "llama3_8b": _llama(
        _name_or_path="meta-llama/Meta-Llama-3-8B",
        **_LLAMA3_VOCAB,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    ),
    "llama3_70b": _llama(
        _name_or_path="meta-llama/Meta-Llama-3-70B",
        **_LLAMA3_VOCAB,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    ),
    # meta-llama/Llama-2-{7b,13b,70b}-hf
    "llama2_7b": _llama(
        _name_or_path="meta-llama/Llama-2-7b-hf",
        **_LLAMA2,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
    "llama2_13b": _llama(
        _name_or_path="meta-llama/Llama-2-13b-hf",
        **_LLAMA2,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
    ),
    "llama2_70b": _llama(
        _name_or_path="meta-llama/Llama-2-70b-hf",
        **_LLAMA2,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=4096,
    ),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T (and -Chat-v1.0: same architecture)
    "tinyllama_1_1b": _llama(
        _name_or_path="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
        **_LLAMA2,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    # mistralai/Mistral-7B-v0.1 (sliding window 4096: exact for sequences up to 4096 tokens, see docs)
    "mistral_7b": _llama(
        _name_or_path="mistralai/Mistral-7B-v0.1",
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        **_LLAMA2,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=4096,
    ),
}
