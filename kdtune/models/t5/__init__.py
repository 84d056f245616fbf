"""T5 family (HF ``T5ForConditionalGeneration``): original T5 (ReLU MLP, output tied to the shared embedding and scaled
by ``d_model ** -0.5``) and T5 v1.1 / flan-t5 (gated-GELU MLP, untied head, no scaling). Pre-norm blocks with T5's
RMS-style LayerNorm (no mean, no bias), unscaled attention without biases, relative position buckets (bidirectional in
the encoder, causal in the decoder) from each stack's first-layer table, shared by all its layers."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from kdtune.errors import CheckpointError
from kdtune.models._builders import apply_lora_if_requested, export_builders, make_size_builders
from kdtune.models._family import ModelFamily, register_family
from kdtune.models._llama_like import require
from kdtune.models.modules import MLP, GatedMLP, MultiHeadAttention, RMSNorm, TransformerSelfAttentionLayer
from kdtune.models.modules.encoder_decoder import (
    CrossAttention,
    EncoderDecoder,
    RelativePositionBias,
    TransformerCrossAttentionLayer,
    TransformerStack,
)

__all__ = ["BUILDERS", "FAMILY", "SIZES", "T5Family", "t5", "t5_settings"]

_ATTN = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "output_proj": "o"}
_ATTN_INV = {v: k for k, v in _ATTN.items()}
_MLP = {"w1": "wi", "w2": "wo"}  # ReLU (original T5)
_GATED_MLP = {"w1": "wi_0", "w3": "wi_1", "w2": "wo"}  # gated (v1.1 / flan-t5): w1 = gate, w3 = up
_KD_LAYER_RE = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)$")
# tied copies of `shared` that HF may store, and the unused decoder cross-attention bias table of old checkpoints
_HF_IGNORED = re.compile(
    r"^(encoder\.embed_tokens\.weight|decoder\.embed_tokens\.weight|"
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight)$"
)


def t5_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The architecture settings of a T5 ``config.json`` dict, read and validated in one place.

    Returns ``dim, head_dim, ffn, n_heads, enc_layers, dec_layers, vocab, buckets, max_distance, eps, gated, act,
    tie, scale_output``. ``tie`` follows ``tie_word_embeddings`` (default True); ``scale_output`` follows
    ``scale_decoder_outputs`` when present (transformers >= 5 configs), else ``tie`` (the original T5 rule).
    """
    proj = str(cfg.get("feed_forward_proj", "relu"))
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise CheckpointError(
            f"config.json: feed_forward_proj={proj!r} is not valid; T5 expects 'gated-<act>' or '<act>' (e.g. "
            "'gated-gelu', 'relu')."
        )
    gated = parts[0] == "gated"
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    tie = bool(cfg.get("tie_word_embeddings", True))
    enc_layers = int(require(cfg, "num_layers"))
    return {
        "dim": int(require(cfg, "d_model")),
        "head_dim": int(require(cfg, "d_kv")),
        "ffn": int(require(cfg, "d_ff")),
        "n_heads": int(require(cfg, "num_heads")),
        "enc_layers": enc_layers,
        "dec_layers": int(cfg.get("num_decoder_layers") or enc_layers),
        "vocab": int(require(cfg, "vocab_size")),
        "buckets": int(cfg.get("relative_attention_num_buckets", 32)),
        "max_distance": int(cfg.get("relative_attention_max_distance", 128)),
        "eps": float(cfg.get("layer_norm_epsilon", 1e-6)),
        "gated": gated,
        "act": act,
        "tie": tie,
        "scale_output": bool(cfg.get("scale_decoder_outputs", tie)),
    }


def _mlp(s: dict[str, Any]) -> nn.Module:
    if s["gated"]:
        return GatedMLP(s["dim"], s["ffn"], s["act"], bias=False)
    return MLP(s["dim"], s["ffn"], s["act"], bias=False)


def _attn(s: dict[str, Any]) -> MultiHeadAttention:
    n, hd = s["n_heads"], s["head_dim"]
    return MultiHeadAttention(s["dim"], n, n, hd, scale=1.0)


class T5Family(ModelFamily):
    """T5 checkpoints (``encoder.block.{i}.layer.{j}.SelfAttention.q`` ...)."""

    name = "t5"
    hf_architectures = ("T5ForConditionalGeneration",)
    hf_model_types = ("t5",)

    def build(self, hf_config: dict[str, Any], **lora_kwargs: Any) -> nn.Module:
        cfg = dict(hf_config)
        cfg.setdefault("architectures", ["T5ForConditionalGeneration"])
        cfg.setdefault("model_type", "t5")
        cfg.setdefault("is_encoder_decoder", True)
        cfg.setdefault("decoder_start_token_id", cfg.get("pad_token_id", 0))
        s = t5_settings(cfg)
        cfg["tie_word_embeddings"] = s["tie"]
        dim, eps = s["dim"], s["eps"]
        enc_layers = [
            TransformerSelfAttentionLayer(_attn(s), _mlp(s), RMSNorm(dim, eps), RMSNorm(dim, eps))
            for _ in range(s["enc_layers"])
        ]
        dec_layers = [
            TransformerCrossAttentionLayer(
                _attn(s),
                CrossAttention(dim, s["n_heads"], s["head_dim"], scale=1.0),
                _mlp(s),
                RMSNorm(dim, eps),
                RMSNorm(dim, eps),
                RMSNorm(dim, eps),
            )
            for _ in range(s["dec_layers"])
        ]
        model = EncoderDecoder(
            tok_embeddings=nn.Embedding(s["vocab"], dim),
            encoder=TransformerStack(
                layers=enc_layers,
                norm=RMSNorm(dim, eps),
                causal=False,
                rel_bias=RelativePositionBias(s["buckets"], s["max_distance"], s["n_heads"], bidirectional=True),
            ),
            decoder=TransformerStack(
                layers=dec_layers,
                norm=RMSNorm(dim, eps),
                causal=True,
                rel_bias=RelativePositionBias(s["buckets"], s["max_distance"], s["n_heads"], bidirectional=False),
            ),
            output=None if s["tie"] else nn.Linear(dim, s["vocab"], bias=False),
            output_scale=dim**-0.5 if s["scale_output"] else None,
            max_seq_len=cfg.get("n_positions"),
        )
        model.hf_family = self.name
        model.hf_config = cfg
        return apply_lora_if_requested(model, lora_kwargs)

    def module_name_to_hf(self, name: str) -> str:
        if name == "tok_embeddings":
            return "shared"
        if name == "output":
            return "lm_head"
        if name in ("encoder.norm", "decoder.norm"):
            return name.replace("norm", "final_layer_norm")
        if name in ("encoder.rel_bias.embedding", "decoder.rel_bias.embedding"):
            return f"{name.split('.')[0]}.block.0.layer.0.SelfAttention.relative_attention_bias"
        m = _KD_LAYER_RE.match(name)
        if m:
            side, i, sub = m.groups()
            blk = f"{side}.block.{i}.layer"
            ff = 2 if side == "decoder" else 1
            head, _, leaf = sub.partition(".")
            if sub == "sa_norm":
                return f"{blk}.0.layer_norm"
            if sub == "ca_norm" and side == "decoder":
                return f"{blk}.1.layer_norm"
            if sub == "mlp_norm":
                return f"{blk}.{ff}.layer_norm"
            if head == "attn" and leaf in _ATTN:
                return f"{blk}.0.SelfAttention.{_ATTN[leaf]}"
            if head == "cross_attn" and leaf in _ATTN and side == "decoder":
                return f"{blk}.1.EncDecAttention.{_ATTN[leaf]}"
            if head == "mlp" and leaf in _GATED_MLP:
                return f"{blk}.{ff}.DenseReluDense.{_GATED_MLP[leaf] if self._gated else _MLP.get(leaf, leaf)}"
        raise KeyError(f"t5: no HF module for kdtune module {name!r}")

    def __init__(self, gated: bool = True) -> None:
        self._gated = gated  # HF MLP names: wi_0/wi_1/wo (gated) or wi/wo

    def for_config(self, hf_config: dict[str, Any]) -> T5Family:
        """The variant whose MLP names match ``feed_forward_proj`` (gated or not)."""
        gated = t5_settings(hf_config)["gated"] if hf_config else self._gated
        return self if gated == self._gated else T5Family(gated)

    def state_dict_from_hf(
        self, hf_state: dict[str, torch.Tensor], hf_config: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        s = t5_settings(hf_config)
        mlp_inv = {v: k for k, v in (_GATED_MLP if s["gated"] else _MLP).items()}
        out: dict[str, torch.Tensor] = {}
        for key, tensor in hf_state.items():
            if _HF_IGNORED.match(key) or (s["tie"] and key == "lm_head.weight"):
                continue
            module, _, leaf = key.rpartition(".")
            kd: str | None = None
            if module == "shared":
                kd = "tok_embeddings"
            elif module == "lm_head":
                kd = "output"
            elif module in ("encoder.final_layer_norm", "decoder.final_layer_norm"):
                kd = f"{module.split('.')[0]}.norm"
            else:
                m = _HF_BLOCK_RE.match(module)
                if m:
                    side, i, j, sub = m.group(1), m.group(2), int(m.group(3)), m.group(4)
                    ff = 2 if side == "decoder" else 1
                    base = f"{side}.layers.{i}"
                    head, _, name = sub.partition(".")
                    if sub == "layer_norm":
                        kd = f"{base}.{'sa_norm' if j == 0 else 'mlp_norm' if j == ff else 'ca_norm'}"
                    elif j == 0 and sub == "SelfAttention.relative_attention_bias" and i == "0":
                        kd = f"{side}.rel_bias.embedding"
                    elif j == 0 and head == "SelfAttention" and name in _ATTN_INV:
                        kd = f"{base}.attn.{_ATTN_INV[name]}"
                    elif side == "decoder" and j == 1 and head == "EncDecAttention" and name in _ATTN_INV:
                        kd = f"{base}.cross_attn.{_ATTN_INV[name]}"
                    elif j == ff and head == "DenseReluDense" and name in mlp_inv:
                        kd = f"{base}.mlp.{mlp_inv[name]}"
            if kd is None:
                raise CheckpointError(
                    f"checkpoint: unexpected tensor {key!r} for a t5 model (feed_forward_proj="
                    f"{hf_config.get('feed_forward_proj', 'relu')!r}); is config.json right?"
                )
            out[f"{kd}.{leaf}"] = tensor
        return out


FAMILY = register_family(T5Family())


def _t5(name: str, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "_name_or_path": name,
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": 32128,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "n_positions": 512,
    }
    cfg.update(kw)
    return cfg


def _flan(name: str, **kw: Any) -> dict[str, Any]:
    return _t5(name, feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=64, **kw)


# Values from each model's public config.json (google-t5/t5-*, google/flan-t5-*).
SIZES: dict[str, dict[str, Any]] = {
    "t5_small": _t5(
        "google-t5/t5-small", d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu"
    ),
    "t5_base": _t5(
        "google-t5/t5-base", d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, feed_forward_proj="relu"
    ),
    "t5_large": _t5(
        "google-t5/t5-large", d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16, feed_forward_proj="relu"
    ),
    "flan_t5_small": _flan(
        "google/flan-t5-small", d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6
    ),
    "flan_t5_base": _flan(
        "google/flan-t5-base", d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12
    ),
    "flan_t5_large": _flan(
        "google/flan-t5-large", d_model=1024, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16
    ),
    "flan_t5_xl": _flan(
        "google/flan-t5-xl", d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32
    ),
    "flan_t5_xxl": _flan(
        "google/flan-t5-xxl", d_model=4096, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64
    ),
}


def t5(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    head_dim: int | None = None,
    num_decoder_layers: int | None = None,
    feed_forward_proj: str = "gated-gelu",
    tie_word_embeddings: bool = False,
    relative_attention_num_buckets: int = 32,
    relative_attention_max_distance: int = 128,
    norm_eps: float = 1e-6,
) -> EncoderDecoder:
    """Build a T5-architecture encoder-decoder of any dimensions (random weights); the defaults are T5 v1.1 / flan-t5.

    Args:
        vocab_size: V.
        num_layers: encoder blocks (and decoder blocks unless ``num_decoder_layers``).
        num_heads: attention heads.
        embed_dim: model dimension (``d_model``).
        intermediate_dim: MLP hidden dimension (``d_ff``).
        head_dim: per-head dimension (``d_kv``; default ``embed_dim // num_heads``).
        num_decoder_layers: decoder blocks.
        feed_forward_proj: ``gated-gelu`` (v1.1 / flan-t5) or ``relu`` (original T5), or ``[gated-]<act>``.
        tie_word_embeddings: tie the head to the embedding and scale the decoder output by ``embed_dim ** -0.5``
            (original T5).
        relative_attention_num_buckets: relative position buckets.
        relative_attention_max_distance: longest distance with its own bucket range.
        norm_eps: LayerNorm epsilon.
    """
    return FAMILY.build(
        {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": vocab_size,
            "d_model": embed_dim,
            "d_kv": head_dim or embed_dim // num_heads,
            "d_ff": intermediate_dim,
            "num_layers": num_layers,
            "num_decoder_layers": num_decoder_layers or num_layers,
            "num_heads": num_heads,
            "feed_forward_proj": feed_forward_proj,
            "tie_word_embeddings": tie_word_embeddings,
            "relative_attention_num_buckets": relative_attention_num_buckets,
            "relative_attention_max_distance": relative_attention_max_distance,
            "layer_norm_epsilon": norm_eps,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
            "torch_dtype": "float32",
        }
    )


BUILDERS = make_size_builders(FAMILY, SIZES, __name__)
export_builders(globals(), BUILDERS, list(SIZES))
