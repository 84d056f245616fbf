"""Build models from HF checkpoint directories: ``load_hf_model`` (architecture + weights) and ``hf_model``
(architecture only, optionally with LoRA; weights are then loaded by the checkpointer)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtune.errors import CheckpointError
from kdtune.models._family import ModelFamily, family_for_hf_config


def read_hf_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Read ``<checkpoint_dir>/config.json`` with clear errors for a missing directory/file or broken JSON."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise CheckpointError(
            f"checkpoint directory {str(ckpt)!r} does not exist; download the model first (kdtune download ...) "
            "or fix the checkpoint_dir setting."
        )
    path = ckpt / "config.json"
    if not path.is_file():
        present = sorted(p.name for p in ckpt.iterdir())[:20]
        raise CheckpointError(f"{path}: config.json not found; the directory holds {present}.")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object at top level.")
    return cfg


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


def weight_files(checkpoint_dir: str | Path) -> list[Path]:
    """The weight files of an HF directory: sharded or single safetensors, else sharded or single ``.bin``/``.pt``."""
    ckpt = Path(checkpoint_dir)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = ckpt / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object).") from None
            missing = [n for n in names if not (ckpt / n).is_file()]
            if missing:
                present = sorted(p.name for p in ckpt.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
                raise CheckpointError(
                    f"{index}: listed weight files are missing: {missing}; present: {present}. Re-download the model."
                )
            return [ckpt / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin", "model.pt"):
        if (ckpt / single).is_file():
            return [ckpt / single]
    present = sorted(p.name for p in ckpt.iterdir())[:20]
    raise CheckpointError(
        f"{ckpt}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin); "
        f"the directory holds {present}."
    )


def iter_hf_tensors(path: Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from one weight file, cast to ``dtype`` (floating tensors only) one at a time."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = f.get_tensor(name)
                yield name, t.to(dtype) if dtype is not None and t.is_floating_point() else t
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        for name in list(state):
            t = state.pop(name)
            yield name, t.to(dtype) if dtype is not None and t.is_floating_point() else t


def load_hf_state_dict(
    checkpoint_dir: str | Path, family: ModelFamily, hf_config: dict[str, Any], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read every weight file of ``checkpoint_dir`` and convert it to kdtune names, one file at a time."""
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(checkpoint_dir):
        out.update(family.state_dict_from_hf(dict(iter_hf_tensors(path, dtype)), hf_config))
    return out


def _hf_name(family: ModelFamily | None, key: str) -> str:
    """``'<hf name>' (kdtune '<key>')`` when the family can name it, else ``'<key>'``."""
    if family is None:
        return repr(key)
    module, _, leaf = key.rpartition(".")
    try:
        return f"'{family.module_name_to_hf(module)}.{leaf}' (kdtune {key!r})"
    except KeyError:
        return repr(key)


def check_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, family: ModelFamily | None = None
) -> None:
    """Raise a CheckpointError for missing/unexpected keys or shape mismatches between ``state`` and ``model``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} tensor(s) (e.g. {', '.join(_hf_name(family, k) for k in missing[:3])})"
            )
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s) (e.g. {unexpected[:3]})")
        raise CheckpointError(f"{source}: weights do not match config.json: {'; '.join(parts)}.")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor {_hf_name(family, key)} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected[key].shape)}; config.json and the weights are from different models."
            )


def load_hf_model(
    checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build the model described by ``<checkpoint_dir>/config.json`` and load its weights exactly.

    The model is built on the ``meta`` device and the checkpoint tensors are assigned into it, so only one copy of
    the weights is ever held. Reads single-file or sharded safetensors, or ``pytorch_model.bin`` (sharded or not).

    Args:
        checkpoint_dir: an HF model directory (config.json + weights).
        dtype: parameter dtype (floating checkpoint tensors are cast to it).
        device: where the model ends up.

    Returns:
        A ``TransformerDecoder`` in training mode with ``hf_family``/``hf_config`` set;
        ``model(tokens [B, T]) -> logits [B, T, V]``.
    """
    cfg = read_hf_config(checkpoint_dir)
    family = family_for_hf_config(cfg, source=str(Path(checkpoint_dir) / "config.json"))
    with torch.device("meta"):
        model = family.build(cfg)
    state = load_hf_state_dict(checkpoint_dir, family, cfg, dtype)
    check_state_dict(model, state, str(checkpoint_dir), family)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device)
