"""Build models from HF checkpoint directories: ``load_hf_model`` (architecture + weights) and ``hf_model``
(architecture only, optionally with LoRA; weights are then loaded by the checkpointer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtune.models._family import family_for_hf_config
from kdtune.models.checkpointer import read_hf_config


def hf_model(checkpoint_dir: str | Path, **lora_kwargs: Any) -> nn.Module:
    """Build (random weights) the architecture described by ``<checkpoint_dir>/config.json``.

    Args:
        checkpoint_dir: an HF model directory.
        **lora_kwargs: LoRA options (``lora_attn_modules``, ``apply_lora_to_mlp``, ``apply_lora_to_output``,
            ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``quantize_base``); none means a plain model.

    Returns:
        The model, carrying ``hf_family`` and ``hf_config``.
    """
    cfg = read_hf_config(checkpoint_dir)
    family = family_for_hf_config(cfg, source=str(Path(checkpoint_dir) / "config.json"))
    return family.build(cfg, **lora_kwargs)


def load_hf_model(
    checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build the model described by ``<checkpoint_dir>/config.json`` and load its weights exactly.

    The model is built on the ``meta`` device and the checkpoint tensors are assigned into it one weight file at a
    time (``HFCheckpointer``'s shard-wise loader), so only one copy of the weights is ever held. Reads single-file or
    sharded safetensors, or ``pytorch_model.bin`` (sharded or not).

    Args:
        checkpoint_dir: an HF model directory (config.json + weights).
        dtype: parameter dtype (floating checkpoint tensors are cast to it).
        device: where the model ends up.

    Returns:
        A ``TransformerDecoder`` in training mode with ``hf_family``/``hf_config`` set;
        ``model(tokens [B, T]) -> logits [B, T, V]``.
    """
    from kdtune.models.checkpointer import load_state_dict_shardwise

    cfg = read_hf_config(checkpoint_dir)
    family = family_for_hf_config(cfg, source=str(Path(checkpoint_dir) / "config.json"))
    with torch.device("meta"):
        model = family.build(cfg).to(dtype=dtype)
    load_state_dict_shardwise(model, checkpoint_dir, strict=True, assign=True, device=device)
    return model
