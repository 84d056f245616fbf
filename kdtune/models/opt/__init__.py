"""OPT family (HF ``OPTForCausalLM``): learned positions looked up at ``position + 2``, pre-norm (most sizes) or
post-norm (350m: ``do_layer_norm_before=false``) blocks, ReLU MLP ``fc1``/``fc2``, biases everywhere, the optional
``project_in``/``project_out`` pair when ``word_embed_proj_dim != hidden_size`` (350m), tied output projection."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from kdtune.errors import CheckpointError
from kdtune.models._builders import apply_lora_if_requested, export_builders, make_size_builders
from kdtune.models._family import ModelFamily, register_family
from kdtune.models._llama_like import require
from kdtune.models.modules import MLP, MultiHeadAttention, TransformerDecoder, TransformerSelfAttentionLayer

__all__ = ["BUILDERS", "FAMILY", "OPTFamily", "SIZES", "opt"]

#: OPT looks learned positions up at ``position + 2`` (the first two rows are never used by real tokens).
POSITION_OFFSET = 2

_TOP = {
    "tok_embeddings": "model.decoder.embed_tokens",
    "pos_embeddings": "model.decoder.embed_positions",
    "project_in": "model.decoder.project_in",
    "project_out": "model.decoder.project_out",
    "norm": "model.decoder.final_layer_norm",
    "output": "lm_head",
}
_LAYER = {
    "sa_norm": "self_attn_layer_norm",
    "mlp_norm": "final_layer_norm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.out_proj",
    "mlp.w1": "fc1",
    "mlp.w2": "fc2",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_KD_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")


def _norm(dim: int, cfg: dict[str, Any]) -> nn.LayerNorm:
    return nn.LayerNorm(
        dim, eps=1e-5, elementwise_affine=bool(cfg.get("layer_norm_elementwise_affine", True)), bias=True
    )


class OPTFamily(ModelFamily):
    """OPT checkpoints (``model.decoder.layers.{i}.self_attn.q_proj`` ...; a bare ``decoder.`` prefix also reads)."""

    name = "opt"
    hf_tie_default = True
    hf_architectures = ("OPTForCausalLM",)
    hf_model_types = ("opt",)

    def build(self, hf_config: dict[str, Any], **lora_kwargs: Any) -> nn.Module:
        cfg = dict(hf_config)
        cfg.setdefault("architectures", ["OPTForCausalLM"])
        cfg.setdefault("model_type", "opt")
        cfg.setdefault("tie_word_embeddings", True)
        if cfg.get("_remove_final_layer_norm"):
            raise CheckpointError("config.json: OPT option _remove_final_layer_norm=true is not supported by kdtune.")
        if not cfg.get("layer_norm_elementwise_affine", True):
            raise CheckpointError(
                "config.json: OPT layer_norm_elementwise_affine=false is not supported by kdtune (no released OPT "
                "uses it)."
            )
        dim = int(require(cfg, "hidden_size"))
        n_heads = int(require(cfg, "num_attention_heads"))
        n_layers = int(require(cfg, "num_hidden_layers"))
        vocab = int(require(cfg, "vocab_size"))
        ffn = int(require(cfg, "ffn_dim"))
        n_pos = int(cfg.get("max_position_embeddings", 2048))
        proj_dim = int(cfg.get("word_embed_proj_dim") or dim)
        pre_norm = bool(cfg.get("do_layer_norm_before", True))
        bias = bool(cfg.get("enable_bias", True))
        act = cfg.get("activation_function", "relu")
        if dim % n_heads:
            raise CheckpointError(f"config.json: hidden_size {dim} is not divisible by num_attention_heads {n_heads}.")
        head_dim = dim // n_heads
        layers = [
            TransformerSelfAttentionLayer(
                MultiHeadAttention(dim, n_heads, n_heads, head_dim, qkv_bias=bias, out_bias=bias),
                MLP(dim, ffn, act, bias=bias),
                _norm(dim, cfg),
                _norm(dim, cfg),
                post_norm=not pre_norm,
            )
            for _ in range(n_layers)
        ]
        tie = bool(cfg["tie_word_embeddings"])
        model = TransformerDecoder(
            tok_embeddings=nn.Embedding(vocab, proj_dim),
            layers=layers,
            norm=_norm(dim, cfg) if pre_norm else nn.Identity(),
            output=None if tie else nn.Linear(proj_dim, vocab, bias=False),
            rope=None,
            pos_embeddings=nn.Embedding(n_pos + POSITION_OFFSET, dim),
            max_seq_len=n_pos,
            pos_offset=POSITION_OFFSET,
            project_in=nn.Linear(proj_dim, dim, bias=False) if proj_dim != dim else None,
            project_out=nn.Linear(dim, proj_dim, bias=False) if proj_dim != dim else None,
        )
        model.hf_family = self.name
        model.hf_config = cfg
        return apply_lora_if_requested(model, lora_kwargs)

    def module_name_to_hf(self, name: str) -> str:
        if name in _TOP:
            return _TOP[name]
        m = _KD_LAYER_RE.match(name)
        if m and m.group(2) in _LAYER:
            return f"model.decoder.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
        raise KeyError(f"opt: no HF module for kdtune module {name!r}")

    def module_name_from_hf(self, name: str) -> str:
        """Inverse of ``module_name_to_hf``; HF OPT checkpoints may leave out the ``model.`` prefix."""
        full = name if name.startswith(("model.", "lm_head")) else f"model.{name}"
        if full in _TOP_INV:
            return _TOP_INV[full]
        m = _HF_LAYER_RE.match(full)
        if m and m.group(2) in _LAYER_INV:
            return f"layers.{m.group(1)}.{_LAYER_INV[m.group(2)]}"
        raise KeyError(name)


FAMILY = register_family(OPTFamily())


def _opt(name: str, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "_name_or_path": name,
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "activation_function": "relu",
        "do_layer_norm_before": True,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "tie_word_embeddings": True,
    }
    cfg.update(kw)
    cfg.setdefault("word_embed_proj_dim", cfg["hidden_size"])
    return cfg


# Values from each model's public config.json (facebook/opt-*).
SIZES: dict[str, dict[str, Any]] = {
    "opt_125m": _opt("facebook/opt-125m", hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12),
    "opt_350m": _opt(
        "facebook/opt-350m",
        hidden_size=1024,
        ffn_dim=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        word_embed_proj_dim=512,
        do_layer_norm_before=False,
    ),
    "opt_1_3b": _opt("facebook/opt-1.3b", hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32),
    "opt_2_7b": _opt(
        "facebook/opt-2.7b", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32
    ),
    "opt_6_7b": _opt(
        "facebook/opt-6.7b", hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32
    ),
    "opt_13b": _opt("facebook/opt-13b", hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40),
}


def opt(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int = 2048,
    word_embed_proj_dim: int | None = None,
    do_layer_norm_before: bool = True,
    tie_word_embeddings: bool = True,
) -> TransformerDecoder:
    """Build an OPT-architecture model of any dimensions (random weights).

    Args:
        vocab_size: V.
        num_layers: number of blocks.
        num_heads: attention heads.
        embed_dim: model dimension D (``hidden_size``).
        intermediate_dim: MLP hidden dimension (``ffn_dim``).
        max_seq_len: number of learned positions (``max_position_embeddings``).
        word_embed_proj_dim: token-embedding width E (default D); E != D adds ``project_in``/``project_out``.
        do_layer_norm_before: pre-norm (True) or post-norm (False, as opt-350m) blocks.
        tie_word_embeddings: share the output projection with the token embedding (OPT always does).
    """
    return FAMILY.build(
        {
            "architectures": ["OPTForCausalLM"],
            "model_type": "opt",
            "vocab_size": vocab_size,
            "hidden_size": embed_dim,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "ffn_dim": intermediate_dim,
            "max_position_embeddings": max_seq_len,
            "word_embed_proj_dim": word_embed_proj_dim or embed_dim,
            "do_layer_norm_before": do_layer_norm_before,
            "activation_function": "relu",
            "enable_bias": True,
            "tie_word_embeddings": tie_word_embeddings,
            "torch_dtype": "float32",
        }
    )


BUILDERS = make_size_builders(FAMILY, SIZES, __name__)
export_builders(globals(), BUILDERS, list(SIZES))
