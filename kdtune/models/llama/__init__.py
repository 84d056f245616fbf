"""Llama family: Llama 2, TinyLlama, Mistral, Llama 3 / 3.1 (scaled RoPE) / 3.2 (tied embeddings).

HF ``LlamaForCausalLM`` and ``MistralForCausalLM`` (with Mistral's sliding-window attention when ``sliding_window`` is
set, e.g. 4096 for Mistral-7B-v0.1).
"""

from __future__ import annotations

from typing import Any

from kdtune.errors import CheckpointError
from kdtune.models._builders import export_builders, make_size_builders
from kdtune.models._family import register_family
from kdtune.models._llama_like import LlamaLikeFamily
from kdtune.models.llama._sizes import SIZES
from kdtune.models.modules import TransformerDecoder


class LlamaFamily(LlamaLikeFamily):
    """Llama / Mistral checkpoints (``model.layers.{i}.self_attn.q_proj`` ... ``lm_head``)."""

    name = "llama"
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    hf_model_types = ("llama", "mistral")
    default_architecture = "LlamaForCausalLM"
    default_model_type = "llama"

    def sliding_window(self, cfg: dict[str, Any]) -> int | None:
        """Mistral's ``sliding_window`` (None/absent: full attention; Llama configs have none)."""
        window = cfg.get("sliding_window")
        return int(window) if window else None


FAMILY = register_family(LlamaFamily())


def llama(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int = 4096,
    head_dim: int | None = None,
    norm_eps: float = 1e-5,
    rope_base: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    tie_word_embeddings: bool = False,
    attn_bias: bool = False,
    mlp_bias: bool = False,
) -> TransformerDecoder:
    """Build a Llama-architecture model of any dimensions (random weights), e.g. a tiny test student.

    Args:
        vocab_size: V.
        num_layers: number of transformer blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA when fewer than ``num_heads``).
        embed_dim: model dimension D.
        intermediate_dim: MLP hidden dimension.
        max_seq_len: ``max_position_embeddings``.
        head_dim: per-head dimension (default ``embed_dim // num_heads``).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE theta.
        rope_scaling: HF rope scaling dict (``{"rope_type": "llama3", "factor": ..., ...}``), or None.
        tie_word_embeddings: share the output projection with the token embedding.
        attn_bias: bias on q/k/v/o projections.
        mlp_bias: bias on the MLP projections.
    """
    return FAMILY.build(
        llama_hf_config(
            vocab_size=vocab_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            embed_dim=embed_dim,
            intermediate_dim=intermediate_dim,
            max_seq_len=max_seq_len,
            head_dim=head_dim,
            norm_eps=norm_eps,
            rope_base=rope_base,
            rope_scaling=rope_scaling,
            tie_word_embeddings=tie_word_embeddings,
            attn_bias=attn_bias,
            mlp_bias=mlp_bias,
        )
    )


def llama_hf_config(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int = 4096,
    head_dim: int | None = None,
    norm_eps: float = 1e-5,
    rope_base: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    tie_word_embeddings: bool = False,
    attn_bias: bool = False,
    mlp_bias: bool = False,
) -> dict[str, Any]:
    """The HF ``config.json`` dict of a ``LlamaForCausalLM`` with these dimensions (see ``llama`` for the args)."""
    if embed_dim % num_heads and head_dim is None:
        raise CheckpointError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; pass head_dim.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": embed_dim,
        "intermediate_size": intermediate_dim,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim or embed_dim // num_heads,
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": norm_eps,
        "rope_theta": rope_base,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": attn_bias,
        "mlp_bias": mlp_bias,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


BUILDERS = make_size_builders(FAMILY, SIZES, __name__)
__all__ = ["FAMILY", "LlamaFamily", "llama", "llama_hf_config", "SIZES", "BUILDERS"]
export_builders(globals(), BUILDERS, list(SIZES))
