"""Gemma (1) family (HF ``GemmaForCausalLM``): Llama names; embeddings scaled by ``sqrt(hidden_size)``, RMSNorm scaling
by ``1 + weight``, tanh-approximated GELU gate, ``head_dim`` 256, tied output. (Gemma 2/3 are not supported.)"""

from __future__ import annotations

from typing import Any

from kdtune.models._builders import export_builders, make_size_builders
from kdtune.models._family import register_family
from kdtune.models._llama_like import LlamaLikeFamily


class GemmaFamily(LlamaLikeFamily):
    """Gemma checkpoints (``model.layers.{i}.self_attn.q_proj`` ..., always tied)."""

    name = "gemma"
    hf_architectures = ("GemmaForCausalLM",)
    hf_model_types = ("gemma",)
    default_architecture = "GemmaForCausalLM"
    default_model_type = "gemma"
    rms_offset = True
    scale_embeddings = True

    def activation(self, cfg: dict[str, Any]) -> str:
        # Gemma was trained with the tanh approximation; early config.json files say "gelu" (HF maps it the same way).
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        return "gelu_pytorch_tanh" if act == "gelu" else act

    def build(self, hf_config: dict[str, Any], **lora_kwargs: Any):
        return super().build({"tie_word_embeddings": True, **hf_config}, **lora_kwargs)


FAMILY = register_family(GemmaFamily())

_GEMMA = {
    "architectures": ["GemmaForCausalLM"],
    "model_type": "gemma",
    "hidden_act": "gelu_pytorch_tanh",
    "vocab_size": 256000,
    "head_dim": 256,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 8192,
    "attention_bias": False,
    "tie_word_embeddings": True,
}
# Values from the public config.json of google/gemma-2b and google/gemma-7b.
SIZES: dict[str, dict[str, Any]] = {
    "gemma_2b": {
        **_GEMMA,
        "_name_or_path": "google/gemma-2b",
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
    },
    "gemma_7b": {
        **_GEMMA,
        "_name_or_path": "google/gemma-7b",
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    },
}

BUILDERS = make_size_builders(FAMILY, SIZES, __name__)
__all__ = ["FAMILY", "GemmaFamily", "SIZES", "BUILDERS"]
export_builders(globals(), BUILDERS, list(SIZES))
