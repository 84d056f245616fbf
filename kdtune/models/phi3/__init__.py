"""Phi-3 family (HF ``Phi3ForCausalLM``; Phi-3-mini-4k, Phi-3-medium-4k): Llama-shaped with fused ``qkv_proj`` and
``gate_up_proj`` in the checkpoint (split into q/k/v and w1/w3 here), sliding-window attention and optional partial
rotary embeddings. The ``longrope`` scaling of the 128k variants is not supported (a clear error says so)."""

from __future__ import annotations

import re
from typing import Any

import torch

from kdtune.errors import CheckpointError
from kdtune.models._builders import export_builders, make_size_builders
from kdtune.models._family import register_family
from kdtune.models._llama_like import LlamaLikeFamily, require

_FUSED_ATTN = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
_FUSED_MLP = ("mlp.w1", "mlp.w3")  # gate first, then up
_KD_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.(weight|bias)$")


class Phi3Family(LlamaLikeFamily):
    """Phi-3 checkpoints: Llama names except ``self_attn.qkv_proj`` and ``mlp.gate_up_proj`` (fused)."""

    name = "phi3"
    hf_architectures = ("Phi3ForCausalLM",)
    hf_model_types = ("phi3",)
    default_architecture = "Phi3ForCausalLM"
    default_model_type = "phi3"

    def sliding_window(self, cfg: dict[str, Any]) -> int | None:
        window = cfg.get("sliding_window")
        return int(window) if window else None

    def _split_sizes(self, cfg: dict[str, Any]) -> tuple[list[int], list[int]]:
        dim = int(require(cfg, "hidden_size"))
        heads = int(require(cfg, "num_attention_heads"))
        kv = int(cfg.get("num_key_value_heads") or heads)
        hd = int(cfg.get("head_dim") or dim // heads)
        inter = int(require(cfg, "intermediate_size"))
        return [heads * hd, kv * hd, kv * hd], [inter, inter]

    def module_name_to_hf(self, name: str) -> str:
        """q/k/v map to the fused ``self_attn.qkv_proj``; w1 (gate) and w3 (up) to ``mlp.gate_up_proj``."""
        m = _KD_LAYER_RE.match(name)
        if m and m.group(2) in _FUSED_ATTN:
            return f"model.layers.{m.group(1)}.self_attn.qkv_proj"
        if m and m.group(2) in _FUSED_MLP:
            return f"model.layers.{m.group(1)}.mlp.gate_up_proj"
        return super().module_name_to_hf(name)

    def state_dict_from_hf(
        self, hf_state: dict[str, torch.Tensor], hf_config: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        attn_sizes, mlp_sizes = self._split_sizes(hf_config)
        rest: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for key, tensor in hf_state.items():
            m = _HF_LAYER_RE.match(key)
            if m is None:
                rest[key] = tensor
                continue
            layer, module, leaf = m.groups()
            names, sizes = (_FUSED_ATTN, attn_sizes) if module == "self_attn.qkv_proj" else (_FUSED_MLP, mlp_sizes)
            if tensor.shape[0] != sum(sizes):
                raise CheckpointError(
                    f"checkpoint: tensor {key!r} has {tensor.shape[0]} rows but config.json implies {sum(sizes)}; "
                    "config.json and the weights are from different models."
                )
            for name, part in zip(names, tensor.split(sizes, dim=0)):
                out[f"layers.{layer}.{name}.{leaf}"] = part.contiguous()
        out.update(super().state_dict_from_hf(rest, hf_config))
        return out

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        groups: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
        rest: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            module, _, leaf = key.rpartition(".")
            m = _KD_LAYER_RE.match(module)
            if m and m.group(2) in _FUSED_ATTN + _FUSED_MLP:
                fused = "self_attn.qkv_proj" if m.group(2) in _FUSED_ATTN else "mlp.gate_up_proj"
                groups.setdefault((m.group(1), fused, leaf), {})[m.group(2)] = tensor
            else:
                rest[key] = tensor
        out = super().state_dict_to_hf(rest, hf_config)
        for (layer, fused, leaf), parts in groups.items():
            order = _FUSED_ATTN if fused == "self_attn.qkv_proj" else _FUSED_MLP
            if set(parts) != set(order):
                raise KeyError(f"phi3: layer {layer} {fused}.{leaf} needs {order} together (got {sorted(parts)})")
            out[f"model.layers.{layer}.{fused}.{leaf}"] = torch.cat([parts[n] for n in order], dim=0)
        return out


FAMILY = register_family(Phi3Family())

_PHI3 = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_act": "silu",
    "vocab_size": 32064,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
}
# Values from the public config.json of microsoft/Phi-3-mini-4k-instruct and microsoft/Phi-3-medium-4k-instruct.
SIZES: dict[str, dict[str, Any]] = {
    "phi3_mini": {
        **_PHI3,
        "_name_or_path": "microsoft/Phi-3-mini-4k-instruct",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "phi3_medium": {
        **_PHI3,
        "_name_or_path": "microsoft/Phi-3-medium-4k-instruct",
        "hidden_size": 5120,
        "intermediate_size": 17920,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 10,
        "vocab_size": 32064,
    },
}

BUILDERS = make_size_builders(FAMILY, SIZES, __name__)
__all__ = ["FAMILY", "Phi3Family", "SIZES", "BUILDERS"]
export_builders(globals(), BUILDERS, list(SIZES))
