"""Shared machinery of the Llama-shaped families (Llama/Mistral, Qwen2, Qwen3): HF config reading, the decoder
construction, and the HF <-> kdtune name mapping (``model.layers.{i}.self_attn.q_proj`` <-> ``layers.{i}.attn.q_proj``).

Each family subclasses ``LlamaLikeFamily`` and says only what differs (q/k/v bias, q/k norm, defaults).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from kdtune.errors import CheckpointError
from kdtune.models._builders import apply_lora_if_requested
from kdtune.models._family import ModelFamily
from kdtune.models.modules import (
    GatedMLP,
    MultiHeadAttention,
    RMSNorm,
    RotaryEmbedding,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "sa_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_KD_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def rope_settings(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(theta, scaling)`` from an HF config in either the classic (``rope_theta`` + ``rope_scaling``) or the
    transformers-5 (``rope_parameters``) layout."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return float(theta), scaling


def require(cfg: dict[str, Any], key: str, source: str = "config.json") -> Any:
    """``cfg[key]``, or a CheckpointError naming the missing key."""
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"{source}: required key {key!r} is missing; add it (see the model's HF config.json).")
    return cfg[key]


class LlamaLikeFamily(ModelFamily):
    """Llama-shaped decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP, optional tied output."""

    name = "llama"
    hf_architectures: tuple[str, ...] = ()
    hf_model_types: tuple[str, ...] = ()
    default_architecture = "LlamaForCausalLM"
    default_model_type = "llama"
    qkv_bias_always = False  # Qwen2: q/k/v carry a bias whatever the config says
    qk_norm = False  # Qwen3: per-head RMSNorm on q and k
    out_bias_from_config = True  # Qwen2: o_proj never has a bias
    rms_offset = False  # Gemma: norms scale by (1 + weight)
    scale_embeddings = False  # Gemma: embeddings multiplied by sqrt(hidden_size)

    def activation(self, cfg: dict[str, Any]) -> str:
        """The MLP activation named by the config."""
        return cfg.get("hidden_act", "silu")

    # ---------------------------------------------------------------------------------------------- building
    def build(self, hf_config: dict[str, Any], **lora_kwargs: Any) -> nn.Module:
        cfg = dict(hf_config)
        cfg.setdefault("architectures", [self.default_architecture])
        cfg.setdefault("model_type", self.default_model_type)
        dim = int(require(cfg, "hidden_size"))
        n_heads = int(require(cfg, "num_attention_heads"))
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        n_layers = int(require(cfg, "num_hidden_layers"))
        vocab = int(require(cfg, "vocab_size"))
        hidden = int(require(cfg, "intermediate_size"))
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        act = self.activation(cfg)
        qkv_bias = self.qkv_bias_always or bool(cfg.get("attention_bias", False))
        out_bias = self.out_bias_from_config and bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))
        tie = bool(cfg.get("tie_word_embeddings", False))
        theta, scaling = rope_settings(cfg)
        layers = []
        for _ in range(n_layers):
            attn = MultiHeadAttention(
                dim,
                n_heads,
                n_kv,
                head_dim,
                qkv_bias=qkv_bias,
                out_bias=out_bias,
                q_norm=RMSNorm(head_dim, eps, self.rms_offset) if self.qk_norm else None,
                k_norm=RMSNorm(head_dim, eps, self.rms_offset) if self.qk_norm else None,
            )
            mlp = GatedMLP(dim, hidden, act, bias=mlp_bias)
            norms = RMSNorm(dim, eps, self.rms_offset), RMSNorm(dim, eps, self.rms_offset)
            layers.append(TransformerSelfAttentionLayer(attn, mlp, *norms))
        model = TransformerDecoder(
            tok_embeddings=nn.Embedding(vocab, dim),
            layers=layers,
            norm=RMSNorm(dim, eps, self.rms_offset),
            output=None if tie else nn.Linear(dim, vocab, bias=False),
            rope=RotaryEmbedding(int(head_dim * float(cfg.get("partial_rotary_factor", 1.0))), theta, scaling),
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            sliding_window=self.sliding_window(cfg),
            embed_scale=dim**0.5 if self.scale_embeddings else None,
        )
        model.hf_family = self.name
        model.hf_config = cfg
        return apply_lora_if_requested(model, lora_kwargs)

    def sliding_window(self, cfg: dict[str, Any]) -> int | None:
        """The attention window of every layer, or None for full causal attention (the default)."""
        if cfg.get("use_sliding_window"):
            raise CheckpointError(
                f"config.json: use_sliding_window=true is not supported for {self.name} models; set it to false."
            )
        return None

    # ---------------------------------------------------------------------------------------------- names
    def module_name_to_hf(self, name: str) -> str:
        if name in _TOP:
            return _TOP[name]
        m = _KD_LAYER_RE.match(name)
        if m and m.group(2) in _LAYER:
            return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
        raise KeyError(f"{self.name}: no HF module for kdtune module {name!r}")

    def module_name_from_hf(self, name: str) -> str:
        """Inverse of ``module_name_to_hf``."""
        if name in _TOP_INV:
            return _TOP_INV[name]
        m = _HF_LAYER_RE.match(name)
        if m and m.group(2) in _LAYER_INV:
            return f"layers.{m.group(1)}.{_LAYER_INV[m.group(2)]}"
        raise KeyError(name)

    def hf_key_ignored(self, key: str) -> bool:
        return key.endswith(_HF_IGNORED_SUFFIXES)
