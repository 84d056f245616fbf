"""Tiny random HF model directories, written with kdtune's own builders and each family's HF conversion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import kdtune.models  # noqa: F401  (registers the families)
from kdtune.models._family import registered_families


def tiny_hf_config(
    family: str = "llama",
    *,
    vocab_size: int = 256,
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """The HF ``config.json`` dict of a tiny model of ``family`` (``llama``, ``mistral``, ``qwen2``, ``qwen3``,
    ``phi3``, ``gemma``, ``gpt2``, ``opt``, ``t5`` (flan-t5 layout), ``bart``); ``extra`` keys override or add HF
    config fields (e.g. ``rope_scaling``, ``intermediate_size``, ``decoder_start_token_id``). ``kv_heads`` is ignored
    by gpt2, opt, t5 and bart; ``tie`` by gpt2, opt and bart (always tied)."""
    if family in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"):
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "phi3": "Phi3ForCausalLM",
            "gemma": "GemmaForCausalLM",
        }[family]
        cfg: dict[str, Any] = {
            "architectures": [arch],
            "model_type": family,
            "vocab_size": vocab_size,
            "hidden_size": dim,
            "intermediate_size": 2 * dim,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": dim // heads,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": tie,
            "torch_dtype": "float32",
        }
        if family in ("llama", "qwen3"):
            cfg["attention_bias"] = False
        if family == "llama":
            cfg["mlp_bias"] = False
        if family == "gemma":
            cfg.update(
                hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1
            )
        if family == "phi3":  # Phi3Config defaults name ids of the real 32k vocab
            cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    elif family == "gpt2":
        cfg = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": vocab_size,
            "n_embd": dim,
            "n_layer": layers,
            "n_head": heads,
            "n_positions": 1024,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        }
    elif family == "opt":
        cfg = {
            "architectures": ["OPTForCausalLM"],
            "model_type": "opt",
            "vocab_size": vocab_size,
            "hidden_size": dim,
            "word_embed_proj_dim": dim,
            "ffn_dim": 4 * dim,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": 512,
            "do_layer_norm_before": True,
            "activation_function": "relu",
            "enable_bias": True,
            "layer_norm_elementwise_affine": True,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        }
    elif family == "t5":  # T5 v1.1 / flan-t5 layout: gated-gelu, relative position buckets, untied head
        cfg = {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": vocab_size,
            "d_model": dim,
            "d_kv": dim // heads,
            "d_ff": 2 * dim,
            "num_layers": layers,
            "num_decoder_layers": layers,
            "num_heads": heads,
            "feed_forward_proj": "gated-gelu",
            "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 32,
            "layer_norm_epsilon": 1e-6,
            "is_encoder_decoder": True,
            "tie_word_embeddings": tie,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
            "torch_dtype": "float32",
        }
    elif family == "bart":
        cfg = {
            "architectures": ["BartForConditionalGeneration"],
            "model_type": "bart",
            "vocab_size": vocab_size,
            "d_model": dim,
            "encoder_layers": layers,
            "decoder_layers": layers,
            "num_hidden_layers": layers,
            "encoder_attention_heads": heads,
            "decoder_attention_heads": heads,
            "encoder_ffn_dim": 2 * dim,
            "decoder_ffn_dim": 2 * dim,
            "max_position_embeddings": 512,
            "activation_function": "gelu",
            "scale_embedding": False,
            "is_encoder_decoder": True,
            "tie_word_embeddings": True,
            "bos_token_id": 0,
            "pad_token_id": 1,
            "eos_token_id": 2,
            "decoder_start_token_id": 2,
            "forced_eos_token_id": None,
            "torch_dtype": "float32",
        }
    else:
        raise ValueError(
            f"unknown family {family!r}; expected llama, mistral, qwen2, qwen3, phi3, gemma, gpt2, opt, t5 or bart"
        )
    cfg.update(extra)
    return cfg


def make_tiny_hf_checkpoint(
    out_dir: str | Path,
    family: str = "llama",
    *,
    vocab_size: int = 256,
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = False,
    seed: int = 0,
    **extra: Any,
) -> Path:
    """Write a tiny random HF model directory (``config.json`` + ``model.safetensors``) and return its path.

    Weights are drawn HF-style (N(0, 0.02), biases 0, norms 1) from ``seed`` with kdtune's builder, then converted
    with the family's ``state_dict_to_hf``, so ``transformers`` and ``kdtune.models.load_hf_model`` both load it.

    Args:
        out_dir: directory to create (parents too); existing files of the same names are overwritten.
        family: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``phi3``, ``gemma``, ``gpt2``, ``opt``, ``t5`` or ``bart``.
        vocab_size: V.
        dim: hidden size.
        layers: number of blocks.
        heads: attention heads.
        kv_heads: key/value heads (ignored for gpt2, opt, t5 and bart).
        tie: tie the output projection to the embedding (gpt2 is always tied).
        seed: RNG seed of the weights.
        **extra: extra/overriding HF config fields (e.g. ``bos_token_id=1``, ``rope_scaling={...}``).
    """
    from safetensors.torch import save_file

    cfg = tiny_hf_config(
        family, vocab_size=vocab_size, dim=dim, layers=layers, heads=heads, kv_heads=kv_heads, tie=tie, **extra
    )
    fam = registered_families()["llama" if family == "mistral" else family]
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = fam.build(cfg)
        model.init_weights(std=0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    hf_state = fam.state_dict_to_hf({k: v.detach().contiguous() for k, v in model.state_dict().items()}, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
