"""BART family (HF ``BartForConditionalGeneration``): learned positions looked up at ``position + 2``, embeddings
optionally scaled by ``sqrt(d_model)`` (``scale_embedding``) then ``layernorm_embedding``, post-norm blocks with biased
attention and a GELU ``fc1``/``fc2`` MLP, output tied to the shared embedding (by default) plus ``final_logits_bias``."""

from __future__ import annotations

import math
import re
from typing import Any

from torch import nn

from kdtune.errors import CheckpointError
from kdtune.models._builders import apply_lora_if_requested, export_builders, make_size_builders
from kdtune.models._family import ModelFamily, register_family
from kdtune.models._llama_like import require
from kdtune.models.modules import MLP, MultiHeadAttention, TransformerSelfAttentionLayer
from kdtune.models.modules.encoder_decoder import (
    CrossAttention,
    EncoderDecoder,
    TransformerCrossAttentionLayer,
    TransformerStack,
)

__all__ = ["BUILDERS", "BartFamily", "FAMILY", "SIZES", "bart"]

#: BART looks learned positions up at ``position + 2``.
POSITION_OFFSET = 2

_TOP = {
    "tok_embeddings": "model.shared",
    "encoder.pos_embeddings": "model.encoder.embed_positions",
    "decoder.pos_embeddings": "model.decoder.embed_positions",
    "encoder.embed_norm": "model.encoder.layernorm_embedding",
    "decoder.embed_norm": "model.decoder.layernorm_embedding",
    "output": "lm_head",
}
_LAYER = {
    "sa_norm": "self_attn_layer_norm",
    "ca_norm": "encoder_attn_layer_norm",
    "mlp_norm": "final_layer_norm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.out_proj",
    "cross_attn.q_proj": "encoder_attn.q_proj",
    "cross_attn.k_proj": "encoder_attn.k_proj",
    "cross_attn.v_proj": "encoder_attn.v_proj",
    "cross_attn.output_proj": "encoder_attn.out_proj",
    "mlp.w1": "fc1",
    "mlp.w2": "fc2",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_KD_LAYER_RE = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$")
_HF_TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Architecture settings of a BART ``config.json`` dict, read and validated in one place."""
    for key in ("add_final_layer_norm", "normalize_before", "add_bias_logits", "normalize_embedding"):
        default = key == "normalize_embedding"
        if key in cfg and bool(cfg[key]) != default:
            raise CheckpointError(
                f"config.json: BART option {key}={cfg[key]} (mBART-style) is not supported by kdtune."
            )
    s = {
        "dim": int(require(cfg, "d_model")),
        "vocab": int(require(cfg, "vocab_size")),
        "enc_layers": int(require(cfg, "encoder_layers")),
        "dec_layers": int(require(cfg, "decoder_layers")),
        "enc_heads": int(require(cfg, "encoder_attention_heads")),
        "dec_heads": int(require(cfg, "decoder_attention_heads")),
        "enc_ffn": int(require(cfg, "encoder_ffn_dim")),
        "dec_ffn": int(require(cfg, "decoder_ffn_dim")),
        "n_pos": int(cfg.get("max_position_embeddings", 1024)),
        "act": str(cfg.get("activation_function", "gelu")),
        "scale_embedding": bool(cfg.get("scale_embedding", False)),
        "tie": bool(cfg.get("tie_word_embeddings", True)),
    }
    for side in ("enc", "dec"):
        if s["dim"] % s[f"{side}_heads"]:
            raise CheckpointError(
                f"config.json: d_model {s['dim']} is not divisible by the {side}oder's {s[f'{side}_heads']} heads."
            )
    return s


class BartFamily(ModelFamily):
    """BART checkpoints (``model.encoder.layers.{i}.self_attn.q_proj`` ...)."""

    name = "bart"
    hf_tie_default = True
    hf_architectures = ("BartForConditionalGeneration",)
    hf_model_types = ("bart",)
    hf_passthrough = ("final_logits_bias",)

    def build(self, hf_config: dict[str, Any], **lora_kwargs: Any) -> nn.Module:
        cfg = dict(hf_config)
        cfg.setdefault("architectures", ["BartForConditionalGeneration"])
        cfg.setdefault("model_type", "bart")
        cfg.setdefault("is_encoder_decoder", True)
        cfg.setdefault("tie_word_embeddings", True)
        cfg.setdefault("decoder_start_token_id", cfg.get("eos_token_id", 2))
        s = _settings(cfg)
        dim = s["dim"]

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(dim, eps=1e-5)

        def attn(heads: int) -> MultiHeadAttention:
            return MultiHeadAttention(dim, heads, heads, dim // heads, qkv_bias=True, out_bias=True)

        enc_layers = [
            TransformerSelfAttentionLayer(
                attn(s["enc_heads"]), MLP(dim, s["enc_ffn"], s["act"], bias=True), norm(), norm(), post_norm=True
            )
            for _ in range(s["enc_layers"])
        ]
        dec_layers = [
            TransformerCrossAttentionLayer(
                attn(s["dec_heads"]),
                CrossAttention(dim, s["dec_heads"], dim // s["dec_heads"], bias=True),
                MLP(dim, s["dec_ffn"], s["act"], bias=True),
                norm(),
                norm(),
                norm(),
                post_norm=True,
            )
            for _ in range(s["dec_layers"])
        ]
        n_pos = s["n_pos"] + POSITION_OFFSET
        model = EncoderDecoder(
            tok_embeddings=nn.Embedding(s["vocab"], dim),
            encoder=TransformerStack(
                layers=enc_layers,
                norm=nn.Identity(),
                causal=False,
                pos_embeddings=nn.Embedding(n_pos, dim),
                pos_offset=POSITION_OFFSET,
                embed_norm=norm(),
            ),
            decoder=TransformerStack(
                layers=dec_layers,
                norm=nn.Identity(),
                causal=True,
                pos_embeddings=nn.Embedding(n_pos, dim),
                pos_offset=POSITION_OFFSET,
                embed_norm=norm(),
            ),
            output=None if s["tie"] else nn.Linear(dim, s["vocab"], bias=False),
            embed_scale=math.sqrt(dim) if s["scale_embedding"] else None,
            final_logits_bias=True,
            max_seq_len=s["n_pos"],
        )
        model.hf_family = self.name
        model.hf_config = cfg
        return apply_lora_if_requested(model, lora_kwargs)

    def module_name_to_hf(self, name: str) -> str:
        if name in _TOP:
            return _TOP[name]
        m = _KD_LAYER_RE.match(name)
        if m and m.group(3) in _LAYER and (m.group(1) == "decoder" or not m.group(3).startswith(("ca_", "cross"))):
            return f"model.{m.group(1)}.layers.{m.group(2)}.{_LAYER[m.group(3)]}"
        raise KeyError(f"bart: no HF module for kdtune module {name!r}")

    def hf_key_ignored(self, key: str) -> bool:
        return key in _HF_TIED  # copies of the shared embedding

    def module_name_from_hf(self, name: str) -> str:
        """Inverse of ``module_name_to_hf``."""
        if name in _TOP_INV:
            return _TOP_INV[name]
        m = _HF_LAYER_RE.match(name)
        if m and m.group(3) in _LAYER_INV:
            return f"{m.group(1)}.layers.{m.group(2)}.{_LAYER_INV[m.group(3)]}"
        raise KeyError(name)


FAMILY = register_family(BartFamily())


def _bart(name: str, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "_name_or_path": name,
        "architectures": ["BartForConditionalGeneration"],
        "model_type": "bart",
        "vocab_size": 50265,
        "max_position_embeddings": 1024,
        "activation_function": "gelu",
        "scale_embedding": False,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "forced_eos_token_id": 2,
    }
    cfg.update(kw)
    return cfg


def _dims(d_model: int, layers: int, heads: int, ffn: int) -> dict[str, Any]:
    return {
        "d_model": d_model,
        "encoder_layers": layers,
        "decoder_layers": layers,
        "num_hidden_layers": layers,
        "encoder_attention_heads": heads,
        "decoder_attention_heads": heads,
        "encoder_ffn_dim": ffn,
        "decoder_ffn_dim": ffn,
    }


# Values from each model's public config.json (facebook/bart-*, sshleifer/distilbart-cnn-12-6).
SIZES: dict[str, dict[str, Any]] = {
    "bart_base": _bart("facebook/bart-base", **_dims(768, 6, 12, 3072)),
    "bart_large": _bart("facebook/bart-large", **_dims(1024, 12, 16, 4096)),
    "bart_large_cnn": _bart(
        "facebook/bart-large-cnn", **_dims(1024, 12, 16, 4096), vocab_size=50264, forced_bos_token_id=0
    ),
    "distilbart_cnn_12_6": _bart(
        "sshleifer/distilbart-cnn-12-6",
        **{**_dims(1024, 12, 16, 4096), "decoder_layers": 6},
        vocab_size=50264,
        forced_bos_token_id=0,
    ),
}


def bart(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    num_decoder_layers: int | None = None,
    max_seq_len: int = 1024,
    scale_embedding: bool = False,
    tie_word_embeddings: bool = True,
) -> EncoderDecoder:
    """Build a BART-architecture encoder-decoder of any dimensions (random weights).

    Args:
        vocab_size: V.
        num_layers: encoder blocks (and decoder blocks unless ``num_decoder_layers``).
        num_heads: attention heads (encoder and decoder).
        embed_dim: model dimension (``d_model``).
        intermediate_dim: MLP hidden dimension (``encoder_ffn_dim`` = ``decoder_ffn_dim``).
        num_decoder_layers: decoder blocks.
        max_seq_len: learned positions per side (``max_position_embeddings``).
        scale_embedding: multiply token embeddings by ``sqrt(embed_dim)``.
        tie_word_embeddings: share the output projection with the token embedding (BART does).
    """
    dec = num_decoder_layers or num_layers
    return FAMILY.build(
        {
            "architectures": ["BartForConditionalGeneration"],
            "model_type": "bart",
            "vocab_size": vocab_size,
            **_dims(embed_dim, num_layers, num_heads, intermediate_dim),
            "decoder_layers": dec,
            "max_position_embeddings": max_seq_len,
            "scale_embedding": scale_embedding,
            "tie_word_embeddings": tie_word_embeddings,
            "activation_function": "gelu",
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "decoder_start_token_id": 2,
            "torch_dtype": "float32",
        }
    )


BUILDERS = make_size_builders(FAMILY, SIZES, __name__)
export_builders(globals(), BUILDERS, list(SIZES))
