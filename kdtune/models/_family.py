"""The interface every model family implements, and the registry that picks a family from ``config.json``.

A family owns everything specific to one HF architecture: how ``config.json`` maps to its builder's arguments, and how
its parameter names (and layouts) map to and from HF. The checkpointer and ``load_hf_model`` only ask the registry.
"""

from __future__ import annotations

import abc
import difflib
from typing import Any

import torch
from torch import nn

from kdtune.errors import CheckpointError

_FAMILIES: dict[str, ModelFamily] = {}


class ModelFamily(abc.ABC):
    """One HF architecture family (e.g. Llama, Qwen2, GPT-2).

    Attributes:
        name: short family name, e.g. ``"llama"``.
        hf_architectures: the ``architectures`` entries of ``config.json`` this family reads, e.g.
            ``("LlamaForCausalLM", "MistralForCausalLM")``.
        hf_model_types: the ``model_type`` values this family reads (used when ``architectures`` is absent).
    """

    name: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    #: kdtune tensor names written to HF unchanged (not parameters of a module ``module_name_to_hf`` maps)
    hf_passthrough: tuple[str, ...] = ()

    @abc.abstractmethod
    def build(self, hf_config: dict[str, Any], **lora_kwargs: Any) -> nn.Module:
        """Build the (randomly initialised) model described by an HF ``config.json`` dict.

        ``lora_kwargs`` are the LoRA options (``lora_attn_modules``, ``apply_lora_to_mlp``, ...); none means no LoRA.
        The returned model carries ``hf_family`` and ``hf_config`` attributes.
        """

    #: what ``tie_word_embeddings`` means when config.json leaves it out (transformers' default for the architecture)
    hf_tie_default: bool = False

    def state_dict_from_hf(
        self, hf_state: dict[str, torch.Tensor], hf_config: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Convert (a subset of) HF tensors to kdtune names/layouts. Tensors that are fused in HF (GPT-2 ``c_attn``)
        arrive together in one call. Buffers HF stores but kdtune recomputes (rotary ``inv_freq``) are dropped.

        The default renames each tensor's module with :meth:`module_name_from_hf` (of :meth:`for_config`), skips
        :meth:`hf_key_ignored` keys and a tied ``lm_head.weight``, and keeps :attr:`hf_passthrough` tensors as they
        are; families whose HF layout fuses or transposes tensors (GPT-2, Phi-3, T5) override it.
        """
        family = self.for_config(hf_config)
        tie = bool(hf_config.get("tie_word_embeddings", self.hf_tie_default))
        out: dict[str, torch.Tensor] = {}
        for key, tensor in hf_state.items():
            if family.hf_key_ignored(key) or (tie and key == "lm_head.weight"):
                continue
            if key in self.hf_passthrough:
                out[key] = tensor
                continue
            module, _, leaf = key.rpartition(".")
            try:
                out[f"{family.module_name_from_hf(module)}.{leaf}"] = tensor
            except KeyError:
                raise CheckpointError(
                    f"checkpoint: unexpected tensor {key!r} for the {self.name} model family; is config.json's architecture "
                    "right?"
                ) from None
        return out

    def hf_key_ignored(self, key: str) -> bool:
        """Whether an HF tensor is not loaded (a buffer kdtune recomputes, a duplicate of a tied weight)."""
        return False

    def module_name_from_hf(self, name: str) -> str:
        """The inverse of :meth:`module_name_to_hf`; ``KeyError`` for an HF module kdtune has no counterpart of."""
        raise KeyError(name)

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Convert kdtune base-model tensors (no LoRA keys) to HF names/layouts.

        The default renames each tensor's module with :meth:`module_name_to_hf` (of :meth:`for_config`); families
        whose HF layout fuses tensors (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``) override it.
        """
        family = self.for_config(hf_config)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if key in self.hf_passthrough:
                out[key] = tensor
                continue
            module, _, leaf = key.rpartition(".")
            out[f"{family.module_name_to_hf(module)}.{leaf}"] = tensor
        return out

    def for_config(self, hf_config: dict[str, Any]) -> ModelFamily:
        """The family object for one ``config.json`` (default: ``self``). A family whose HF module names depend on the
        config (T5: ``wi`` vs ``wi_0``/``wi_1``) returns a variant, so ``module_name_to_hf`` needs no config."""
        return self

    @abc.abstractmethod
    def module_name_to_hf(self, name: str) -> str:
        """Map a kdtune module path (``layers.0.attn.q_proj``) to the HF module path (``model.layers.0.self_attn.q_proj``),
        used to name PEFT adapter tensors and ``target_modules``."""


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry (called once by each family package on import)."""
    _FAMILIES[family.name] = family
    return family


def registered_families() -> dict[str, ModelFamily]:
    """All registered families by name."""
    return dict(_FAMILIES)


def supported_architectures() -> list[str]:
    """Every HF architecture name kdtune can build, sorted."""
    return sorted(a for f in _FAMILIES.values() for a in f.hf_architectures)


def family_for_hf_config(hf_config: dict[str, Any], source: str = "config.json") -> ModelFamily:
    """Pick the family for an HF ``config.json`` dict, or raise a clear error naming the supported architectures."""
    archs = hf_config.get("architectures") or []
    for family in _FAMILIES.values():
        if any(a in family.hf_architectures for a in archs):
            return family.for_config(hf_config)
    model_type = hf_config.get("model_type")
    for family in _FAMILIES.values():
        if model_type in family.hf_model_types:
            return family.for_config(hf_config)
    what = f"architectures={archs}" if archs else f"model_type={model_type!r}"
    wanted = archs[0] if archs else str(model_type)
    close = difflib.get_close_matches(wanted, supported_architectures(), n=3, cutoff=0.5)
    hint = f" (closest: {', '.join(close)})" if close else ""
    raise CheckpointError(
        f"{source}: architecture not supported ({what}){hint}. Supported: {', '.join(supported_architectures())}."
    )
