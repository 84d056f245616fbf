"""Turn a family's size table (real HF ``config.json`` values) into named builder functions.

Each size ``name`` yields ``name()`` (the base model) and ``lora_name(lora_attn_modules, ...)`` (LoRA/QLoRA), both
plain functions with real signatures so configs can name them as ``_component_`` and validation can bind arguments.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from kdtune.errors import ConfigError
from kdtune.models._family import ModelFamily

LORA_ARG_NAMES = (
    "lora_attn_modules",
    "apply_lora_to_mlp",
    "apply_lora_to_output",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "quantize_base",
)


def apply_lora_if_requested(model: nn.Module, lora_kwargs: dict[str, Any]) -> nn.Module:
    """Apply ``kdtune.models.modules.lora.apply_lora`` when any LoRA option is given; else return ``model``."""
    if not lora_kwargs:
        return model
    unknown = sorted(set(lora_kwargs) - set(LORA_ARG_NAMES))
    if unknown:
        raise ConfigError(
            f"model: unknown LoRA option(s) {unknown}; use some of {list(LORA_ARG_NAMES)} (check the spelling)."
        )
    from kdtune.models.modules.lora import apply_lora  # owned by the LoRA module; imported only when used

    hf_family, hf_config = getattr(model, "hf_family", ""), getattr(model, "hf_config", {})
    model = apply_lora(model, **lora_kwargs)
    model.hf_family, model.hf_config = hf_family, hf_config
    return model


def make_size_builders(
    family: ModelFamily, sizes: dict[str, dict[str, Any]], module: str
) -> dict[str, Callable[..., nn.Module]]:
    """Build ``{name: builder, "lora_" + name: lora_builder}`` for every entry of ``sizes``.

    Args:
        family: the family whose ``build`` turns an HF config dict into a model.
        sizes: ``{builder_name: hf_config_dict}`` with the public ``config.json`` values of each model.
        module: the module the functions are exported from (their ``__module__``).
    """
    out: dict[str, Callable[..., nn.Module]] = {}
    for name, hf_config in sizes.items():
        out[name] = _base_builder(family, name, hf_config, module)
        out["lora_" + name] = _lora_builder(family, name, hf_config, module)
    return out


def _num_layers(hf_config: dict[str, Any]) -> str:
    """The layer count of a size-table config, however the family spells it (encoder-decoder: ``enc+dec``)."""
    for key in ("num_hidden_layers", "n_layer"):
        if key in hf_config:
            return str(hf_config[key])
    enc = hf_config.get("num_layers", hf_config.get("encoder_layers"))
    dec = hf_config.get("num_decoder_layers", hf_config.get("decoder_layers")) or enc
    return f"{enc}+{dec}"


def _base_builder(family: ModelFamily, name: str, hf_config: dict[str, Any], module: str) -> Callable[[], nn.Module]:
    def builder() -> nn.Module:
        return family.build(copy.deepcopy(hf_config))

    builder.__name__ = builder.__qualname__ = name
    builder.__module__ = module
    builder.__doc__ = (
        f"Build {hf_config.get('_name_or_path', name)} ({family.name} family) with random weights: "
        f"{_num_layers(hf_config)} layers; "
        "load weights with the checkpointer or use ``kdtune.models.load_hf_model``."
    )
    return builder


def _lora_builder(family: ModelFamily, name: str, hf_config: dict[str, Any], module: str) -> Callable[..., nn.Module]:
    def builder(
        lora_attn_modules: list[str],
        apply_lora_to_mlp: bool = False,
        apply_lora_to_output: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        quantize_base: bool = False,
    ) -> nn.Module:
        return family.build(
            copy.deepcopy(hf_config),
            lora_attn_modules=list(lora_attn_modules),
            apply_lora_to_mlp=apply_lora_to_mlp,
            apply_lora_to_output=apply_lora_to_output,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            quantize_base=quantize_base,
        )

    builder.__name__ = builder.__qualname__ = "lora_" + name
    builder.__module__ = module
    builder.__doc__ = (
        f"Build {name} with LoRA adapters (base weights frozen; NF4 base when ``quantize_base``).\n\n"
        "Args:\n"
        "    lora_attn_modules: attention projections to adapt, from q_proj, k_proj, v_proj, output_proj.\n"
        "    apply_lora_to_mlp: also adapt the MLP projections.\n"
        "    apply_lora_to_output: also adapt the output projection.\n"
        "    lora_rank: adapter rank.\n"
        "    lora_alpha: adapter scale numerator (scale = alpha / rank).\n"
        "    lora_dropout: dropout on the adapter input.\n"
        "    quantize_base: store frozen base weights in NF4 (QLoRA, via torchao).\n"
    )
    return builder


def export_builders(namespace: dict[str, Any], builders: dict[str, Callable[..., nn.Module]], names: list[str]) -> None:
    """Put the base and LoRA builders of ``names`` into a module namespace (and its ``__all__``)."""
    exported = namespace.setdefault("__all__", [])
    for name in names:
        for fn_name in (name, "lora_" + name):
            fn = builders[fn_name]
            namespace[fn_name] = fn
            exported.append(fn_name)
