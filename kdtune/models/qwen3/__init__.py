"""Qwen3 family (HF ``Qwen3ForCausalLM``): Llama-shaped with a per-head RMSNorm on q and k (before RoPE) and a
head dimension decoupled from the model dimension."""

from __future__ import annotations

from typing import Any

from kdtune.models._builders import export_builders, make_size_builders
from kdtune.models._family import register_family
from kdtune.models._llama_like import LlamaLikeFamily
from kdtune.models.modules import TransformerDecoder


class Qwen3Family(LlamaLikeFamily):
    """Qwen3 checkpoints: Llama names plus ``self_attn.q_norm``/``k_norm``."""

    name = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    hf_model_types = ("qwen3",)
    default_architecture = "Qwen3ForCausalLM"
    default_model_type = "qwen3"
    qk_norm = True


FAMILY = register_family(Qwen3Family())


def _qwen3(name: str, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "_name_or_path": name,
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "vocab_size": 151936,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
    }
    cfg.update(kw)
    return cfg


# Values from each model's public config.json (Qwen/<name>).
SIZES: dict[str, dict[str, Any]] = {
    "qwen3_0_6b": _qwen3(
        "Qwen/Qwen3-0.6B",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3_1_7b": _qwen3(
        "Qwen/Qwen3-1.7B",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3_4b": _qwen3(
        "Qwen/Qwen3-4B",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3_8b": _qwen3(
        "Qwen/Qwen3-8B",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "qwen3_14b": _qwen3(
        "Qwen/Qwen3-14B",
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=8,
    ),
}


def qwen3(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    head_dim: int,
    max_seq_len: int = 40960,
    norm_eps: float = 1e-6,
    rope_base: float = 1000000.0,
    tie_word_embeddings: bool = False,
) -> TransformerDecoder:
    """Build a Qwen3-architecture model of any dimensions (random weights).

    Args:
        vocab_size: V.
        num_layers: number of blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads.
        embed_dim: model dimension D.
        intermediate_dim: MLP hidden dimension.
        head_dim: per-head dimension (independent of ``embed_dim // num_heads``).
        max_seq_len: ``max_position_embeddings``.
        norm_eps: RMSNorm epsilon (also for q/k norms).
        rope_base: RoPE theta.
        tie_word_embeddings: share the output projection with the token embedding.
    """
    return FAMILY.build(
        {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": vocab_size,
            "hidden_size": embed_dim,
            "intermediate_size": intermediate_dim,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": max_seq_len,
            "rms_norm_eps": norm_eps,
            "rope_theta": rope_base,
            "tie_word_embeddings": tie_word_embeddings,
            "attention_bias": False,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
    )


BUILDERS = make_size_builders(FAMILY, SIZES, __name__)
__all__ = ["FAMILY", "Qwen3Family", "SIZES", "BUILDERS", "qwen3"]
export_builders(globals(), BUILDERS, list(SIZES))
