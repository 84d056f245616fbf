"""GPT-2 family (HF ``GPT2LMHeadModel``; DialoGPT): learned positions, LayerNorm with bias, ``gelu_new`` MLP,
Conv1D weights (stored ``[in, out]``, transposed here), fused ``c_attn`` split into q/k/v, tied output projection."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from kdtune.errors import CheckpointError
from kdtune.models._builders import apply_lora_if_requested, export_builders, make_size_builders
from kdtune.models._family import ModelFamily, register_family
from kdtune.models._llama_like import require
from kdtune.models.modules import MLP, MultiHeadAttention, TransformerDecoder, TransformerSelfAttentionLayer

_TOP = {
    "tok_embeddings": "transformer.wte",
    "pos_embeddings": "transformer.wpe",
    "norm": "transformer.ln_f",
    "output": "lm_head",
}
_LAYER = {
    "sa_norm": "ln_1",
    "mlp_norm": "ln_2",
    "attn.q_proj": "attn.c_attn",
    "attn.k_proj": "attn.c_attn",
    "attn.v_proj": "attn.c_attn",
    "attn.output_proj": "attn.c_proj",
    "mlp.w1": "mlp.c_fc",
    "mlp.w2": "mlp.c_proj",
}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # HF Conv1D: weight is [in, out]
_TOP_INV = {v.removeprefix("transformer."): k for k, v in _TOP.items()}
_LAYER_INV = {
    "ln_1": "sa_norm",
    "ln_2": "mlp_norm",
    "attn.c_proj": "attn.output_proj",
    "mlp.c_fc": "mlp.w1",
    "mlp.c_proj": "mlp.w2",
}
_KD_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^h\.(\d+)\.(.+)$")
_HF_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old checkpoints


class GPT2Family(ModelFamily):
    """GPT-2 / DialoGPT checkpoints (``transformer.h.{i}.attn.c_attn`` ...; the ``transformer.`` prefix optional)."""

    name = "gpt2"
    hf_architectures = ("GPT2LMHeadModel",)
    hf_model_types = ("gpt2",)

    def build(self, hf_config: dict[str, Any], **lora_kwargs: Any) -> nn.Module:
        cfg = dict(hf_config)
        cfg.setdefault("architectures", ["GPT2LMHeadModel"])
        cfg.setdefault("model_type", "gpt2")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if cfg.get(key):
                raise CheckpointError(f"config.json: GPT-2 option {key}=true is not supported by kdtune.")
        dim = int(require(cfg, "n_embd"))
        n_heads = int(require(cfg, "n_head"))
        n_layers = int(require(cfg, "n_layer"))
        vocab = int(require(cfg, "vocab_size"))
        n_pos = int(cfg.get("n_positions", 1024))
        inner = int(cfg.get("n_inner") or 4 * dim)
        eps = float(cfg.get("layer_norm_epsilon", 1e-5))
        act = cfg.get("activation_function", "gelu_new")
        head_dim = dim // n_heads
        scale = None if cfg.get("scale_attn_weights", True) else 1.0
        layers = [
            TransformerSelfAttentionLayer(
                MultiHeadAttention(dim, n_heads, n_heads, head_dim, qkv_bias=True, out_bias=True, scale=scale),
                MLP(dim, inner, act, bias=True),
                nn.LayerNorm(dim, eps=eps),
                nn.LayerNorm(dim, eps=eps),
            )
            for _ in range(n_layers)
        ]
        tie = bool(cfg.get("tie_word_embeddings", True))
        model = TransformerDecoder(
            tok_embeddings=nn.Embedding(vocab, dim),
            layers=layers,
            norm=nn.LayerNorm(dim, eps=eps),
            output=None if tie else nn.Linear(dim, vocab, bias=False),
            rope=None,
            pos_embeddings=nn.Embedding(n_pos, dim),
            max_seq_len=n_pos,
        )
        model.hf_family = self.name
        model.hf_config = cfg
        return apply_lora_if_requested(model, lora_kwargs)

    def module_name_to_hf(self, name: str) -> str:
        """kdtune module → HF module; q_proj/k_proj/v_proj all map to the fused ``attn.c_attn``."""
        if name in _TOP:
            return _TOP[name]
        m = _KD_LAYER_RE.match(name)
        if m and m.group(2) in _LAYER:
            return f"transformer.h.{m.group(1)}.{_LAYER[m.group(2)]}"
        raise KeyError(f"gpt2: no HF module for kdtune module {name!r}")

    def state_dict_from_hf(
        self, hf_state: dict[str, torch.Tensor], hf_config: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        tie = bool(hf_config.get("tie_word_embeddings", True))
        out: dict[str, torch.Tensor] = {}
        for key, tensor in hf_state.items():
            short = key.removeprefix("transformer.")
            if _HF_IGNORED.match(short) or (tie and short == "lm_head.weight"):
                continue
            module, _, leaf = short.rpartition(".")
            if module in _TOP_INV:
                out[f"{_TOP_INV[module]}.{leaf}"] = tensor
                continue
            m = _HF_LAYER_RE.match(module)
            sub = m.group(2) if m else None
            if sub == "attn.c_attn":
                # Conv1D [D, 3D] -> three nn.Linear weights [D, D]; bias [3D] -> three [D]
                t = tensor.t() if leaf == "weight" else tensor
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[f"layers.{m.group(1)}.attn.{proj}.{leaf}"] = part.contiguous()
            elif sub in _LAYER_INV:
                t = tensor.t().contiguous() if (sub in _CONV1D and leaf == "weight") else tensor
                out[f"layers.{m.group(1)}.{_LAYER_INV[sub]}.{leaf}"] = t
            else:
                raise CheckpointError(
                    f"checkpoint: unexpected tensor {key!r} for a gpt2 model; is config.json's architecture right?"
                )
        return out

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            module, _, leaf = key.rpartition(".")
            m = _KD_LAYER_RE.match(module)
            if m and m.group(2) in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
                qkv.setdefault((m.group(1), leaf), {})[m.group(2)] = tensor
                continue
            hf = self.module_name_to_hf(module)
            conv = m is not None and m.group(2) in ("attn.output_proj", "mlp.w1", "mlp.w2") and leaf == "weight"
            out[f"{hf}.{leaf}"] = tensor.t().contiguous() if conv else tensor
        for (layer, leaf), parts in qkv.items():
            if len(parts) != 3:
                raise KeyError(f"gpt2: layer {layer} {leaf}: q/k/v must be converted together (got {sorted(parts)})")
            fused = torch.cat([parts["attn.q_proj"], parts["attn.k_proj"], parts["attn.v_proj"]], dim=0)
            out[f"transformer.h.{layer}.attn.c_attn.{leaf}"] = fused.t().contiguous() if leaf == "weight" else fused
        return out


FAMILY = register_family(GPT2Family())


def _gpt2(name: str, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "_name_or_path": name,
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_ctx": 1024,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
    }
    cfg.update(kw)
    return cfg


# Values from each model's public config.json (openai-community/gpt2*, microsoft/DialoGPT-*).
SIZES: dict[str, dict[str, Any]] = {
    "gpt2_small": _gpt2("openai-community/gpt2", n_embd=768, n_layer=12, n_head=12),
    "gpt2_medium": _gpt2("openai-community/gpt2-medium", n_embd=1024, n_layer=24, n_head=16),
    "gpt2_large": _gpt2("openai-community/gpt2-large", n_embd=1280, n_layer=36, n_head=20),
    "gpt2_xl": _gpt2("openai-community/gpt2-xl", n_embd=1600, n_layer=48, n_head=25),
    "dialogpt_small": _gpt2("microsoft/DialoGPT-small", n_embd=768, n_layer=12, n_head=12),
    "dialogpt_medium": _gpt2("microsoft/DialoGPT-medium", n_embd=1024, n_layer=24, n_head=16),
    "dialogpt_large": _gpt2("microsoft/DialoGPT-large", n_embd=1280, n_layer=36, n_head=20),
}


def gpt2(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    max_seq_len: int = 1024,
    intermediate_dim: int | None = None,
    norm_eps: float = 1e-5,
    tie_word_embeddings: bool = True,
) -> TransformerDecoder:
    """Build a GPT-2-architecture model of any dimensions (random weights).

    Args:
        vocab_size: V.
        num_layers: number of blocks.
        num_heads: attention heads.
        embed_dim: model dimension D.
        max_seq_len: number of learned positions (``n_positions``).
        intermediate_dim: MLP hidden dimension (default ``4 * embed_dim``).
        norm_eps: LayerNorm epsilon.
        tie_word_embeddings: share the output projection with the token embedding (GPT-2 always does).
    """
    return FAMILY.build(
        {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": vocab_size,
            "n_embd": embed_dim,
            "n_layer": num_layers,
            "n_head": num_heads,
            "n_positions": max_seq_len,
            "n_inner": intermediate_dim,
            "layer_norm_epsilon": norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": tie_word_embeddings,
            "torch_dtype": "float32",
        }
    )


BUILDERS = make_size_builders(FAMILY, SIZES, __name__)
__all__ = ["FAMILY", "GPT2Family", "SIZES", "BUILDERS", "gpt2"]
export_builders(globals(), BUILDERS, list(SIZES))
