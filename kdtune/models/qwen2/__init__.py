"""Qwen2 / Qwen2.5 family (HF ``Qwen2ForCausalLM``): Llama-shaped with a bias on q/k/v, tied embeddings on the
small sizes. Sliding-window attention (off in every released config: ``use_sliding_window: false``) is not
implemented."""

from __future__ import annotations

from typing import Any

from kdtune.models._builders import export_builders, make_size_builders
from kdtune.models._family import register_family
from kdtune.models._llama_like import LlamaLikeFamily
from kdtune.models.modules import TransformerDecoder


class Qwen2Family(LlamaLikeFamily):
    """Qwen2/Qwen2.5 checkpoints: Llama names, q/k/v always carry a bias, o_proj never does."""

    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    hf_model_types = ("qwen2",)
    default_architecture = "Qwen2ForCausalLM"
    default_model_type = "qwen2"
    qkv_bias_always = True

    out_bias_from_config = False


FAMILY = register_family(Qwen2Family())


def _qwen(name: str, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "_name_or_path": name,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "vocab_size": 151936,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
    }
    cfg.update(kw)
    return cfg


# Values from each model's public config.json (Qwen/<name>).
SIZES: dict[str, dict[str, Any]] = {
    "qwen2_0_5b": _qwen(
        "Qwen/Qwen2-0.5B",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "qwen2_1_5b": _qwen(
        "Qwen/Qwen2-1.5B",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "qwen2_7b": _qwen(
        "Qwen/Qwen2-7B",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
    ),
    "qwen2_5_0_5b": _qwen(
        "Qwen/Qwen2.5-0.5B",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen2_5_1_5b": _qwen(
        "Qwen/Qwen2.5-1.5B",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "qwen2_5_3b": _qwen(
        "Qwen/Qwen2.5-3B",
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen2_5_7b": _qwen(
        "Qwen/Qwen2.5-7B",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
    ),
    "qwen2_5_14b": _qwen(
        "Qwen/Qwen2.5-14B",
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
}


def qwen2(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int = 32768,
    norm_eps: float = 1e-6,
    rope_base: float = 1000000.0,
    tie_word_embeddings: bool = False,
) -> TransformerDecoder:
    """Build a Qwen2-architecture model of any dimensions (random weights).

    Args:
        vocab_size: V.
        num_layers: number of blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads.
        embed_dim: model dimension D.
        intermediate_dim: MLP hidden dimension.
        max_seq_len: ``max_position_embeddings``.
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE theta.
        tie_word_embeddings: share the output projection with the token embedding.
    """
    return FAMILY.build(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": embed_dim,
            "intermediate_size": intermediate_dim,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": max_seq_len,
            "rms_norm_eps": norm_eps,
            "rope_theta": rope_base,
            "tie_word_embeddings": tie_word_embeddings,
            "hidden_act": "silu",
            "use_sliding_window": False,
            "torch_dtype": "float32",
        }
    )


BUILDERS = make_size_builders(FAMILY, SIZES, __name__)
__all__ = ["FAMILY", "Qwen2Family", "SIZES", "BUILDERS", "qwen2"]
export_builders(globals(), BUILDERS, list(SIZES))
