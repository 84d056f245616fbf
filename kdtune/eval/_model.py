"""Build the model an evaluation scores: a checkpoint directory, optionally with a PEFT LoRA adapter on top.

A PEFT ``adapter_config.json`` names HF modules (``target_modules``); :func:`lora_kwargs_from_adapter` maps them to
kdtune's LoRA options (``lora_attn_modules``, ``apply_lora_to_mlp``, ``apply_lora_to_output``, rank, alpha) through the
family's own module-name conversion, so ``kdtune.models.hf_model(dir, **kwargs)`` builds a model the adapter loads into.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdtune.errors import CheckpointError, ConfigError

__all__ = ["build_eval_model", "lora_kwargs_from_adapter"]

_HF_MODEL = "kdtune.models.hf_model"
_LORA_KEYS = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha")


def _matches(hf_name: str, targets: Any) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches a module named exactly so or ending in ``.name``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, hf_name) is not None
    return any(hf_name == t or hf_name.endswith("." + t) for t in targets or [])


def lora_kwargs_from_adapter(adapter_dir: str | Path, checkpoint_dir: str | Path) -> dict[str, Any]:
    """kdtune LoRA options equivalent to a PEFT adapter's ``adapter_config.json`` for the model in ``checkpoint_dir``.

    Args:
        adapter_dir: the adapter directory (``adapter_config.json``).
        checkpoint_dir: the base model directory (``config.json``).

    Returns:
        Keyword arguments for ``kdtune.models.hf_model(checkpoint_dir, **kwargs)``.

    Raises:
        CheckpointError: no/broken ``adapter_config.json``, or target modules kdtune's LoRA cannot express.
    """
    from kdtune.models import hf_model
    from kdtune.models.checkpointer import family_for_model

    path = Path(adapter_dir).expanduser() / "adapter_config.json"
    if not path.is_file():
        raise CheckpointError(
            f"adapter_dir {str(adapter_dir)!r} has no adapter_config.json; point it at a PEFT adapter directory "
            "(a LoRA run's final_adapter/)"
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-save the adapter") from None
    with torch.device("meta"):
        model = hf_model(checkpoint_dir)
    family = family_for_model(model)
    targets = cfg.get("target_modules")
    attn: list[str] = []
    mlp: set[str] = set()
    all_mlp: set[str] = set()
    output = False
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        try:
            hf = family.module_name_to_hf(name)
        except Exception:  # noqa: BLE001 - modules without an HF name cannot be adapter targets
            continue
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "mlp":
            all_mlp.add(name)
        if not _matches(hf, targets):
            continue
        if len(parts) >= 2 and parts[-2] == "attn":
            if parts[-1] not in attn:
                attn.append(parts[-1])
        elif len(parts) >= 2 and parts[-2] == "mlp":
            mlp.add(name)
        elif name == "output":
            output = True
    if not attn and not mlp and not output:
        raise CheckpointError(
            f"{path}: target_modules {targets!r} match no linear layer of the model in {checkpoint_dir}; "
            "is this adapter for another base model?"
        )
    if mlp and mlp != all_mlp:
        raise CheckpointError(
            f"{path}: target_modules {targets!r} adapt only some MLP projections; kdtune's LoRA adapts all of them "
            "(apply_lora_to_mlp) or none, so merge this adapter into the base model with PEFT and evaluate that"
        )
    order = ["q_proj", "k_proj", "v_proj", "output_proj"]
    return {
        "lora_attn_modules": sorted(attn, key=lambda n: order.index(n) if n in order else len(order)),
        "apply_lora_to_mlp": bool(mlp),
        "apply_lora_to_output": output,
        "lora_rank": int(cfg.get("r", 8)),
        "lora_alpha": float(cfg.get("lora_alpha", 8)),
    }


def build_eval_model(
    model_cfg: DictConfig, checkpointer_cfg: DictConfig | None, runtime: Any, *, adapter_dir: str | None = None
) -> nn.Module:
    """Build the model to evaluate on ``runtime``'s device/dtype, load its weights and (optionally) a LoRA adapter.

    With ``adapter_dir`` and a ``kdtune.models.hf_model`` component that sets no LoRA option, the LoRA options are
    read from the adapter; other builders must already be ``lora_*`` builders with the adapter's settings.

    Args:
        model_cfg: the ``model`` ``_component_`` node.
        checkpointer_cfg: the ``checkpointer`` node (the base weights).
        runtime: a :class:`kdtune.training.runtime.Runtime` (device, dtype).
        adapter_dir: a PEFT adapter directory, or None.

    Returns:
        The model in eval mode.

    Raises:
        ConfigError: an adapter with a model that has no LoRA modules.
        CheckpointError: unreadable or mismatching adapter.
    """
    from kdtune.models.checkpointer import load_adapter
    from kdtune.training import build_model, is_lora_model

    if adapter_dir is not None:
        component = str(model_cfg.get("_component_", ""))
        if component == _HF_MODEL and not any(k in model_cfg for k in _LORA_KEYS):
            base_dir = model_cfg.get("checkpoint_dir")
            model_cfg = OmegaConf.merge(model_cfg, lora_kwargs_from_adapter(adapter_dir, base_dir))
    model, _ = build_model(model_cfg, checkpointer_cfg, runtime)
    if adapter_dir is not None:
        if not is_lora_model(model):
            raise ConfigError(
                f"adapter_dir is set but model ({model_cfg.get('_component_')}) has no LoRA modules; use "
                "model._component_=kdtune.models.hf_model (LoRA settings come from adapter_config.json) or a lora_* "
                "builder with the adapter's settings"
            )
        load_adapter(model, adapter_dir)
    model.requires_grad_(False)
    return model.eval()
