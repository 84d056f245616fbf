"""FSDP2 sharding: build a model on the meta device, shard it per decoder layer, fill it from an HF checkpoint one
weight file at a time (no rank ever holds a full copy), and gather its full state dict back on rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtune.config import instantiate
from kdtune.errors import CheckpointError, ConfigError
from kdtune.models import enable_activation_checkpointing
from kdtune.models._family import family_for_hf_config
from kdtune.models._safetensors_io import read_weight_file, resolve_weight_files
from kdtune.models.checkpointer import read_hf_config
from kdtune.models.modules.lora import get_lora_modules
from kdtune.training.distributed.env import _comm_device, get_world_size, is_distributed
from kdtune.training.runtime import is_rank_zero
from kdtune.training.setup import _copy_full_into, compile_layers, init_lora_parameters, transformer_layers

__all__ = [
    "build_sharded_model",
    "gather_full_state_dict",
    "load_hf_into_sharded_model",
    "materialize_meta_model",
    "shard_model",
]


def shard_model(
    model: nn.Module,
    *,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    mp_policy: Any | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2: ``fully_shard`` each transformer block (decoder-only: ``model.layers``; encoder-decoder:
    every encoder and decoder block), then the root (embeddings, positions, norms, output).

    Works on a model whose parameters are on the ``meta`` device (build with ``torch.device("meta")``, shard, then
    :func:`materialize_meta_model` + :func:`load_hf_into_sharded_model`), which is how the recipes avoid a full copy
    per rank. Frozen (teacher, LoRA base) and trainable parameters may share a layer. Apply activation checkpointing
    *before* sharding.

    Args:
        model: a kdtune ``TransformerDecoder`` (blocks in ``model.layers``) or ``EncoderDecoder`` (``encoder.layers``,
            ``decoder.layers``).
        reshard_after_forward: free the gathered parameters after each layer's forward (ZeRO-3, less memory) instead of
            keeping them until backward (ZeRO-2-like, less communication). The root is never resharded after forward.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory (CUDA only).
        mp_policy: an optional ``torch.distributed.fsdp.MixedPrecisionPolicy``.
        device: the training device; defaults to the device of the current process group setup.

    Returns:
        The same module, now an FSDP module (its parameters are DTensors sharded on dim 0).

    Raises:
        ConfigError: CPU offload was asked for on a CPU device, or the model has no ``layers``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    device = torch.device(device) if device is not None else _comm_device()
    if cpu_offload and device.type != "cuda":
        raise ConfigError(
            "fsdp_cpu_offload=True needs CUDA devices (it moves sharded parameters off the GPU); "
            "set fsdp_cpu_offload=false when training on CPU."
        )
    mesh = init_device_mesh(device.type, (get_world_size(),))
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for layer in transformer_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    if callable(getattr(model, "output_logits", None)):
        # the chunked loss calls output_logits outside forward: let FSDP gather the root's weights for it too
        register_fsdp_forward_method(model, "output_logits")
    return model


def _reset_non_persistent_buffers(model: nn.Module) -> None:
    """Recompute buffers (RoPE tables) that a checkpoint does not hold, after a meta build."""
    for module in model.modules():
        for method in ("reset_buffers", "rope_init", "_rope_init", "reset_cache"):
            fn = getattr(module, method, None)
            if callable(fn) and any(True for _ in module.buffers(recurse=False)):
                fn()
                break


def materialize_meta_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate (uninitialised) storage for a sharded model built on ``meta`` and recompute its derived buffers.

    Only the rank-local shards are allocated. Parameter values are garbage until :func:`load_hf_into_sharded_model`
    (or an init function) fills them; non-persistent buffers such as RoPE tables are recomputed here by calling each
    module's ``reset_buffers()`` (or ``rope_init()``) method.

    Args:
        model: a model (usually already passed through :func:`shard_model`) with meta parameters.
        device: where the local shards live (``cpu`` for CPU offload).

    Returns:
        The same module.
    """
    model.to_empty(device=device)
    _reset_non_persistent_buffers(model)
    return model


def _lookup_param_or_buffer(model: nn.Module, name: str) -> torch.Tensor | None:
    module_path, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        return None
    if leaf in module._parameters:
        return module._parameters[leaf]
    if leaf in module._buffers and leaf not in module._non_persistent_buffers_set:
        return module._buffers[leaf]
    return None


def load_hf_into_sharded_model(
    model: nn.Module,
    checkpoint_dir: str | os.PathLike,
    checkpoint_files: list[str] | dict[str, Any] | None = None,
    *,
    strict: bool = True,
) -> list[str]:
    """Fill a (sharded, materialised) model from an HF checkpoint directory, one weight file at a time.

    Choice: *rank-local reads*. Every rank reads each weight file itself (safetensors are memory-mapped) and keeps only
    its slice of each tensor (``distribute_tensor(..., src_data_rank=None)`` slices locally, no communication). At any
    time a rank holds at most one weight file's converted tensors plus its own parameter shards, never a full model.
    Broadcasting from rank 0 instead would send every tensor to every rank and make rank 0 the bottleneck; local reads
    only need the checkpoint on each node's disk (or a shared file system), which multi-node jobs have anyway.
    Files are found and read by :mod:`kdtune.models.checkpointer` and converted by the model's family.

    Args:
        model: the model, built on ``meta``, sharded with :func:`shard_model` and materialised.
        checkpoint_dir: an HF model directory (``config.json`` + weights).
        checkpoint_files: weight file names (or torchtune's ``{filename_format, max_filename}``); default: detected.
        strict: raise if a model tensor (other than LoRA matrices) is not in the checkpoint, or a checkpoint tensor has
            no model tensor.

    Returns:
        The names of the LoRA parameters (never in a base checkpoint), which the caller initialises.

    Raises:
        CheckpointError: missing directory/files, unknown or different architecture, a shape mismatch, or (strict)
            missing/unexpected tensors.
    """

    ckpt = Path(checkpoint_dir).expanduser()
    hf_config = read_hf_config(ckpt)
    family = family_for_hf_config(hf_config, source=str(ckpt / "config.json"))
    model_family = getattr(model, "hf_family", "") or ""
    if model_family and model_family != family.name:
        raise CheckpointError(
            f"{ckpt / 'config.json'} describes a {family.name!r} model but the model was built as {model_family!r}; "
            "build it from this directory (kdtune.models.hf_model) or pick the matching builder."
        )
    lora = {n for n, _ in model.named_parameters() if n.endswith(("lora_a.weight", "lora_b.weight"))}
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in _persistent_buffers(model)}
    loaded: set[str] = set()
    unexpected: list[str] = []
    for path in resolve_weight_files(ckpt, checkpoint_files):
        hf_part = read_weight_file(path)
        converted = family.state_dict_from_hf(hf_part, hf_config)
        del hf_part
        for name, full in converted.items():
            target = _lookup_param_or_buffer(model, name)
            if target is None or name in lora:
                unexpected.append(name)
                continue
            _copy_full_into(target, full, name, path)
            loaded.add(name)
        del converted
    missing = sorted(expected - loaded - lora)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"{ckpt}: checkpoint does not match the model ({'; '.join(parts)}); check that the model builder "
            "matches config.json and checkpointer.checkpoint_files."
        )
    return sorted(lora)


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for mod_name, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def gather_full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """All-gather the full (unsharded) state dict on rank 0's CPU, one parameter at a time.

    Every rank must call it. Rank 0 receives the full tensors (moved to CPU as they arrive, so GPU memory stays at one
    tensor); the other ranks receive an empty dict.

    Args:
        model: an FSDP2-sharded model (a plain model works too).
        trainable_only: keep only parameters with ``requires_grad`` (LoRA adapters).

    Returns:
        ``{name: tensor}`` on rank 0, ``{}`` elsewhere.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_distributed():
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    else:  # frozen (LoRA base) tensors are not even gathered when only the trainable ones are wanted
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        sd = get_model_state_dict(model, options=options)
    if trainable_only:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in trainable}
    return sd if is_rank_zero() else {}


def build_sharded_model(
    model_cfg: Any,
    checkpointer_cfg: Any,
    runtime: Any,
    *,
    seed: int = 0,
    activation_checkpointing: bool = False,
    compile: bool = False,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    key: str = "model",
) -> tuple[nn.Module, Any]:
    """The distributed counterpart of :func:`kdtune.training.setup.build_model`: build on ``meta``, shard, fill.

    1. ``instantiate(model_cfg)`` under ``torch.device("meta")`` in the runtime dtype (no memory is allocated);
    2. activation checkpointing is switched on (before sharding);
    3. :func:`shard_model` (each decoder layer, then the root); only the rank-local shards are then allocated;
    4. the weights are read from the checkpointer's directory one file at a time into the shards
       (:func:`load_hf_into_sharded_model`); LoRA matrices get :func:`init_lora_parameters` (``seed``); a model without
       a checkpoint gets its builder's random init (``init_weights``).

    Args:
        model_cfg: the model ``_component_`` node.
        checkpointer_cfg: the ``kdtune.models.HFCheckpointer`` node; None = random init.
        runtime: device and dtype (:class:`kdtune.training.runtime.Runtime`).
        seed: seed of the LoRA initialisation.
        activation_checkpointing: recompute each decoder layer in backward.
        compile: ``torch.compile`` each decoder layer (after sharding).
        reshard_after_forward: see :func:`shard_model`.
        cpu_offload: keep parameter shards (and so gradients and optimizer state) in CPU memory (CUDA only).
        key: config key of the model, for error messages.

    Returns:
        ``(model, checkpointer)``; the checkpointer is None when ``checkpointer_cfg`` is None.

    Raises:
        ConfigError: the component is not a model, QLoRA was asked for (not supported sharded), or CPU offload on CPU.
    """

    if cpu_offload and runtime.device.type != "cuda":
        raise ConfigError(
            "fsdp_cpu_offload=True needs CUDA devices (it moves sharded parameters off the GPU); "
            "set fsdp_cpu_offload=false when training on CPU."
        )
    prev = torch.get_default_dtype()
    torch.set_default_dtype(runtime.dtype)
    try:
        with torch.device("meta"):
            model = instantiate(model_cfg)
    finally:
        torch.set_default_dtype(prev)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{key}: _component_ built a {type(model).__name__}, not a model; use a kdtune.models builder"
        )
    if any(m.quantize_base for m in get_lora_modules(model).values()):
        raise ConfigError(
            f"{key}: quantize_base=True (QLoRA) is not supported by the distributed recipes; set "
            f"{key}.quantize_base=false (LoRA on a sharded bf16 base) or use lora_finetune_single_device."
        )
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    shard_model(model, reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload, device=runtime.device)
    materialize_meta_model(model, "cpu" if cpu_offload else runtime.device)
    checkpointer = instantiate(checkpointer_cfg) if checkpointer_cfg is not None else None
    if checkpointer is not None and checkpointer.checkpoint_dir is not None:
        load_hf_into_sharded_model(model, checkpointer.checkpoint_dir, checkpointer.checkpoint_files)
    elif hasattr(model, "init_weights"):
        model.init_weights()
    init_lora_parameters(model, seed)
    if compile:
        compile_layers(transformer_layers(model, key), runtime.device)
    return model, checkpointer
