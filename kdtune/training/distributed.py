"""Distributed training on ``torchrun`` + FSDP2 (``torch.distributed.fsdp.fully_shard``).

What the distributed recipes need beyond the single-device ones, and nothing else:

* process group setup with the backend picked from the device (NCCL on CUDA, Gloo on CPU) and one device per local
  rank (:func:`init_distributed`);
* sharding a model per decoder layer and then at the root (:func:`shard_model`), for the student and the teacher;
* filling a model built on the ``meta`` device from an HF checkpoint one shard file at a time
  (:func:`load_hf_into_sharded_model`), so no rank ever holds a full copy of a large model;
* global reductions for token normalisation and logged metrics (:func:`all_reduce_sum`);
* sharded resume checkpoints with ``torch.distributed.checkpoint`` (:func:`save_sharded_checkpoint`,
  :func:`load_sharded_checkpoint`) and the full state dict gathered on rank 0 for the final HF directory
  (:func:`gather_full_state_dict`).

Gradient normalisation. FSDP2 reduce-scatters gradients with an *average* over ranks. A recipe computes, on each rank,
``loss_sum_local`` (summed over the rank's valid tokens) and must end with gradients of
``sum_over_ranks(loss_sum_local) / global_tokens``. Since FSDP divides by the world size, the factor to apply to the
reduced gradients is ``world_size / global_tokens`` (:func:`global_grad_scale`). Setting FSDP's divide factor to 1
instead would need a ``PREMUL_SUM``/``SUM`` reduce-scatter that Gloo does not offer, so the factor is applied afterwards.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdtune.errors import CheckpointError, ConfigError
from kdtune.training.recipe_settings import FinetuneSettings, KDSettings, LoRAFinetuneSettings
from kdtune.training.resume import capture_rng_state, restore_rng_state

__all__ = [
    "DistEnv",
    "init_distributed",
    "destroy_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_rank_zero",
    "barrier",
    "all_reduce_sum",
    "broadcast_object",
    "rank_zero_first",
    "global_grad_scale",
    "shard_model",
    "materialize_meta_model",
    "load_hf_into_sharded_model",
    "gather_full_state_dict",
    "init_lora_parameters",
    "build_sharded_model",
    "DistributedResumeCheckpoints",
    "save_final_distributed",
    "reduce_eval_metrics",
    "save_sharded_checkpoint",
    "load_sharded_checkpoint",
    "latest_sharded_checkpoint",
]


# --------------------------------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank.
        local_rank: rank on this node (selects the GPU).
        world_size: number of processes in the job.
        local_world_size: processes on this node.
        device: this process's device (``cuda:<local_rank>`` or ``cpu``).
        backend: the process-group backend (``nccl`` or ``gloo``; ``cuda:nccl,cpu:gloo`` on CUDA so CPU collectives
            such as object broadcasts also work).
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_rank_zero(self) -> bool:
        """True on global rank 0 (the rank that logs and writes single-writer files)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistEnv:
    """Initialise the default process group from the ``torchrun`` environment.

    Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) a single-process group is created, so a distributed
    recipe also runs as a plain script. Calling it again returns the existing setup.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``. On CUDA each process takes
            ``cuda:<LOCAL_RANK>``; an explicit index (``cuda:1``) is refused because the local rank picks it.
        timeout_s: collective timeout in seconds.

    Returns:
        The :class:`DistEnv` of this process.

    Raises:
        ConfigError: ``device`` is unknown, CUDA is asked for but absent, or more processes were launched on this node
            than there are GPUs.
    """
    device = str(device).strip().lower()
    if device == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    elif device in ("cpu", "cuda"):
        device_type = device
    elif device.startswith("cuda:"):
        raise ConfigError(
            f"device={device!r}: a distributed recipe picks the GPU from LOCAL_RANK; set device=cuda (or auto) and "
            "choose GPUs with CUDA_VISIBLE_DEVICES."
        )
    else:
        raise ConfigError(f"device={device!r} is not supported by the distributed recipes; use auto, cpu or cuda.")

    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1))
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu (runs with the gloo backend).")
        n_gpus = torch.cuda.device_count()
        if local_world_size > n_gpus:
            raise ConfigError(
                f"launched {local_world_size} processes on this node but only {n_gpus} GPU(s) are visible; "
                f"use --nproc_per_node {n_gpus} (or fewer), or device=cpu."
            )
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        torch_device = torch.device("cpu")
        backend = "gloo"

    if not dist.is_initialized():
        kwargs: dict[str, Any] = {
            "backend": backend,
            "timeout": datetime.timedelta(seconds=timeout_s),
            "device_id": torch_device if device_type == "cuda" else None,
        }
        if "WORLD_SIZE" not in os.environ:  # plain `python recipe.py`: a world of one, no rendezvous, env untouched
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(**kwargs)
    return DistEnv(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        local_world_size=local_world_size,
        device=torch_device,
        backend=backend,
    )


def destroy_distributed() -> None:
    """Tear the process group down; a no-op when none exists.

    No barrier: the recipes call it from ``finally``, and after an error on one rank a barrier would wait forever for
    ranks stuck in another collective (the recipes' last step, the final save, already ends with a barrier).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """True on global rank 0, and in a non-distributed run."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    if is_distributed() and dist.get_backend() != "gloo" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor | float | int | Iterable[float]) -> torch.Tensor:
    """Sum a tensor, a number or a list of numbers over all ranks (one collective).

    Args:
        values: a tensor (its dtype and device are kept), or a number / iterable of numbers (summed in float64, so
            token counts and loss sums stay exact).

    Returns:
        The global sums (unchanged without a process group); a float64 CPU tensor for numbers.
    """
    if isinstance(values, torch.Tensor):  # keeps dtype and device (StepAccumulator passes int64/float64 tensors)
        t = values.detach().clone()
        if is_distributed() and get_world_size() > 1:
            moved = t.to(_comm_device())
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t = moved.to(values.device)
        return t
    if isinstance(values, (int, float)):
        t = torch.tensor(float(values), dtype=torch.float64)
    else:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_distributed() and get_world_size() > 1:
        t = t.to(_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (e.g. building a dataset that writes a shared cache)."""
    if not is_rank_zero():
        barrier()
    try:
        yield
    finally:
        if is_rank_zero():
            barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank and return it."""
    if not is_distributed() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def global_grad_scale(global_num_tokens: float, world_size: int | None = None) -> float:
    """The factor to multiply FSDP-reduced gradients by so they equal d(global loss sum)/d(theta) / global tokens.

    FSDP2 averages gradients over ranks; each rank back-propagates its *local* token-summed loss, so the reduced
    gradient is ``sum_ranks(grad_local) / world_size`` and the right factor is ``world_size / global_num_tokens``.

    Args:
        global_num_tokens: valid (label != ignore_index) tokens of the whole optimizer step, summed over all ranks.
        world_size: defaults to the current world size.

    Returns:
        The scale factor (0.0 when the step has no valid token, so nothing moves).
    """
    ws = get_world_size() if world_size is None else world_size
    return 0.0 if global_num_tokens <= 0 else float(ws) / float(global_num_tokens)


# --------------------------------------------------------------------------------------------------------------------
# sharding and meta-device loading
# --------------------------------------------------------------------------------------------------------------------


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ConfigError(
            f"{type(model).__name__} has no `layers` attribute; shard_model expects a kdtune TransformerDecoder "
            "(decoder layers in model.layers)."
        )
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def shard_model(
    model: nn.Module,
    *,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    mp_policy: Any | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2: ``fully_shard`` each decoder layer, then the root (embeddings, norm, output).

    Works on a model whose parameters are on the ``meta`` device (build with ``torch.device("meta")``, shard, then
    :func:`materialize_meta_model` + :func:`load_hf_into_sharded_model`), which is how the recipes avoid a full copy
    per rank. Frozen (teacher, LoRA base) and trainable parameters may share a layer. Apply activation checkpointing
    *before* sharding.

    Args:
        model: a kdtune ``TransformerDecoder`` (decoder layers in ``model.layers``).
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
    for layer in _decoder_layers(model):
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


@torch.no_grad()
def _copy_full_into(target: torch.Tensor, full: torch.Tensor, name: str, source: Path) -> None:
    """Copy a full (unsharded) tensor into ``target``: a DTensor gets only this rank's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(full.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{source}: tensor for {name} has shape {tuple(full.shape)} but the model expects {tuple(target.shape)}; "
            "the model config (vocab_size, dims) does not match this checkpoint."
        )
    if isinstance(target, DTensor):
        local = target.to_local()
        # Every rank read the file itself (safetensors mmap), so each one slices its own shard: no communication.
        shard = distribute_tensor(
            full.to(device=target.device_mesh.device_type, dtype=target.dtype),
            target.device_mesh,
            target.placements,
            src_data_rank=None,
        ).to_local()
        local.copy_(shard)
    else:
        target.copy_(full.to(dtype=target.dtype))


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
    from kdtune.models._family import family_for_hf_config
    from kdtune.models._safetensors_io import read_weight_file, resolve_weight_files
    from kdtune.models.checkpointer import read_hf_config

    ckpt = Path(checkpoint_dir).expanduser()
    hf_config = read_hf_config(ckpt)
    _ensure_families_registered()
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


@torch.no_grad()
def init_lora_parameters(model: nn.Module, seed: int) -> int:
    """(Re-)initialise every LoRA matrix from ``seed`` alone, identically on a plain or a sharded model.

    PEFT's init (``lora_a`` Kaiming-uniform with ``a=sqrt(5)``, ``lora_b`` zeros), drawn on CPU from
    ``torch.Generator().manual_seed(seed)`` in ``named_modules`` order as full matrices, then each rank keeps its shard.
    So a run built on the meta device and sharded over N ranks starts from exactly the adapters of a single-device run
    that calls this too, independent of how much of the global RNG stream a model's random base init consumed.

    Args:
        model: a model with ``kdtune.models.modules.lora.LoRALinear`` modules (no-op without).
        seed: the run's seed.

    Returns:
        The number of LoRA modules initialised.
    """
    from kdtune.models.modules.lora import LoRALinear

    gen = torch.Generator().manual_seed(int(seed))
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        a, b = module.lora_a.weight, module.lora_b.weight  # [r, in], [out, r]
        full_a = torch.empty(tuple(a.shape), dtype=torch.float32)
        nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=gen)
        _copy_full_into(a, full_a, f"{name}.lora_a.weight", Path("<init>"))
        _copy_full_into(b, torch.zeros(tuple(b.shape)), f"{name}.lora_b.weight", Path("<init>"))
        count += 1
    return count


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for mod_name, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def _ensure_families_registered() -> None:
    try:  # importing kdtune.models registers every family package
        import kdtune.models  # noqa: F401
    except ImportError:  # pragma: no cover - only while the models package is incomplete
        pass


# --------------------------------------------------------------------------------------------------------------------
# gradients, full state dict
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------------

_STEP_DIR = re.compile(r"^step_(\d+)$")


def latest_sharded_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The complete ``step_N`` directory with the largest N under ``checkpoints_dir`` (temporary dirs are ignored)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    steps = [(n, p) for n, p in steps if (p / "state.json").exists()]
    return max(steps)[1] if steps else None


def save_sharded_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra_state: Mapping[str, Any],
    *,
    keep_last: int = 1,
    trainable_only: bool = False,
    config: Any = None,
) -> Path:
    """Write a resume checkpoint ``checkpoints_dir/step_<step>`` with ``torch.distributed.checkpoint``.

    Every rank writes its own shards of the model and optimizer state (no gather) plus its RNG state; rank 0 writes
    ``extra_state.pt`` (data position, LR schedule...), ``config.yaml`` and, last, ``state.json``. Everything goes to
    ``step_<step>.tmp`` first; after a barrier rank 0 renames it (atomic), then removes all but the newest
    ``keep_last`` complete checkpoints. ``checkpoints_dir`` must be on storage every rank sees (multi-node: shared FS).

    Args:
        checkpoints_dir: the directory of resume checkpoints.
        step: optimizer steps done.
        model: the sharded model.
        optimizer: its optimizer.
        extra_state: the rest of the run state (LR schedule state dict, data position, config...), saved by rank 0
            with ``torch.save`` (so every rank must pass the same values).
        keep_last: complete checkpoints to keep (>= 1).
        trainable_only: store only trainable parameters (LoRA: the frozen base comes from the HF checkpoint).
        config: the run's config, saved as ``config.yaml``.

    Returns:
        The final checkpoint directory.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    root = Path(checkpoints_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if is_rank_zero():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp), no_dist=not is_distributed())
    torch.save(capture_rng_state(), tmp / f"rng_rank{get_rank()}.pt")
    barrier()
    if is_rank_zero():
        torch.save(dict(extra_state), tmp / "extra_state.pt")
        if config is not None:
            from kdtune.config import save_config

            save_config(config, tmp / "config.yaml")
        meta = {"step": step, "world_size": get_world_size(), "trainable_only": trainable_only, "format": "dcp"}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))  # written last: marks the checkpoint complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        complete = sorted(
            (int(m.group(1)), p)
            for p in root.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / "state.json").exists()
        )
        for _, old in complete[: max(0, len(complete) - max(1, keep_last))]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_sharded_checkpoint(
    checkpoint_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from :func:`save_sharded_checkpoint`'s directory.

    The world size must be the one the checkpoint was written with (the data position is per rank).

    Args:
        checkpoint_dir: a ``step_N`` directory.
        model: the sharded model, built and sharded as when it was saved.
        optimizer: its optimizer (state is created if still empty).

    Returns:
        The ``extra_state`` dict saved with it (plus ``step``).

    Raises:
        CheckpointError: incomplete checkpoint, or a different world size.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    ckpt = Path(checkpoint_dir)
    if not (ckpt / "state.json").exists():
        raise CheckpointError(f"{ckpt}: not a complete resume checkpoint (no state.json); delete it and resume again.")
    state = json.loads((ckpt / "state.json").read_text())
    if int(state.get("world_size", 1)) != get_world_size():
        raise CheckpointError(
            f"{ckpt}: written by {state.get('world_size')} processes but this run has {get_world_size()}; resume "
            f"with --nproc_per_node {state.get('world_size')} (total processes must match)."
        )
    options = StateDictOptions(ignore_frozen_params=bool(state.get("trainable_only", False)))
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    to_load = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(to_load, checkpoint_id=str(ckpt), no_dist=not is_distributed())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=to_load["model"],
        optim_state_dict=to_load["optimizer"],
        options=options,
    )
    rng_path = ckpt / f"rng_rank{get_rank()}.pt"
    if rng_path.exists():
        restore_rng_state(torch.load(rng_path, weights_only=True))
    extra = torch.load(ckpt / "extra_state.pt", weights_only=False) if (ckpt / "extra_state.pt").exists() else {}
    return {**extra, **state}


class DistributedResumeCheckpoints:
    """The distributed recipes' resume checkpoints: :class:`kdtune.training.builders.ResumeCheckpoints`'s interface
    (``save(pos)``, ``resume()``, ``last``) on sharded ``torch.distributed.checkpoint`` directories.

    ``output_dir/checkpoints/step_N/`` holds the DCP shards of the model (only the adapters of a LoRA model) and the
    optimizer, one RNG file per rank, ``extra_state.pt`` (LR schedule, data position), ``config.yaml`` and
    ``state.json`` (written last). The newest ``keep_last_n_checkpoints`` are kept.

    Args:
        runtime: output layout (``runtime.checkpoints_dir``).
        settings: recipe settings (``keep_last_n_checkpoints``).
        model: the sharded model.
        optimizer: its optimizer.
        scheduler: its LR schedule or None.
        data: the :class:`kdtune.training.builders.TrainData` (its ``position`` is saved and restored).
        cfg: the run's config, saved with each checkpoint.
    """

    def __init__(
        self,
        runtime: Any,
        settings: Any,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        data: Any,
        cfg: Any = None,
    ) -> None:
        from kdtune.training.builders import is_lora_model

        self.runtime, self.keep_last = runtime, int(settings.keep_last_n_checkpoints)
        self.model, self.optimizer, self.scheduler, self.data, self.cfg = model, optimizer, scheduler, data, cfg
        self.trainable_only = is_lora_model(model)
        self.last: str | None = None

    def save(self, pos: Any) -> Path:
        """Write the checkpoint of the optimizer step that ended at ``pos`` (every rank must call it)."""
        from kdtune.training.builders import DataPosition

        nxt = pos if not self.data.is_epoch_end(pos) else DataPosition(pos.epoch + 1, 0, pos.global_step)
        extra = {
            "data_state": nxt.state_dict(),
            "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }
        path = save_sharded_checkpoint(
            self.runtime.checkpoints_dir,
            pos.global_step,
            self.model,
            self.optimizer,
            extra,
            keep_last=self.keep_last,
            trainable_only=self.trainable_only,
            config=self.cfg,
        )
        self.last = str(path)
        return path

    def resume(self) -> Any:
        """Restore the newest checkpoint into the model, optimizer, schedule, RNG and data position.

        Raises:
            CheckpointError: there is no complete checkpoint under ``output_dir/checkpoints``.
        """
        from kdtune.training.builders import DataPosition

        path = latest_sharded_checkpoint(self.runtime.checkpoints_dir)
        if path is None:
            raise CheckpointError(
                f"resume_from_checkpoint=true but {self.runtime.checkpoints_dir} holds no complete step_N checkpoint; "
                "set resume_from_checkpoint=false or point output_dir at the run to continue."
            )
        state = load_sharded_checkpoint(path, self.model, self.optimizer)
        if self.scheduler is not None and state.get("lr_scheduler") is not None:
            self.scheduler.load_state_dict(state["lr_scheduler"])
        self.data.position = DataPosition.from_state_dict(state["data_state"])
        self.last = str(path)
        return self.data.position


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
    """The distributed counterpart of :func:`kdtune.training.builders.build_model`: build on ``meta``, shard, fill.

    1. ``instantiate(model_cfg)`` under ``torch.device("meta")`` in the runtime dtype (no memory is allocated);
    2. activation checkpointing is switched on (before sharding);
    3. :func:`shard_model` (each decoder layer, then the root); only the rank-local shards are then allocated;
    4. the weights are read from the checkpointer's directory one file at a time into the shards
       (:func:`load_hf_into_sharded_model`); LoRA matrices get :func:`init_lora_parameters` (``seed``); a model without
       a checkpoint gets its builder's random init (``init_weights``).

    Args:
        model_cfg: the model ``_component_`` node.
        checkpointer_cfg: the ``kdtune.models.HFCheckpointer`` node; None = random init.
        runtime: device and dtype (:class:`kdtune.training.builders.Runtime`).
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
    from kdtune.config import instantiate
    from kdtune.models.modules.lora import get_lora_modules

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
        from kdtune.models import enable_activation_checkpointing

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
        for layer in _decoder_layers(model):
            layer.compile()
    return model, checkpointer


class EvenEvalLoader:
    """Validation batches of one rank: every example exactly once over all ranks, the same batch count on every rank.

    FSDP needs every rank to run the same number of forwards, so a rank whose share is shorter gets padding batches
    whose labels are all ignored (they add no token and no loss). Rank ``r`` takes examples ``r, r + W, ...`` in order.

    Args:
        loader: the single-process validation DataLoader (its dataset, batch size and collate function are reused).
        rank: this rank.
        world_size: number of ranks.
    """

    def __init__(self, loader: Any, rank: int | None = None, world_size: int | None = None) -> None:
        self.dataset, self.collate_fn, self.batch_size = loader.dataset, loader.collate_fn, int(loader.batch_size)
        ws = get_world_size() if world_size is None else world_size
        rk = get_rank() if rank is None else rank
        n = len(self.dataset)
        self.indices = list(range(rk, n, ws))
        self.num_batches = math.ceil(math.ceil(n / ws) / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for b in range(self.num_batches):
            idx = self.indices[b * self.batch_size : (b + 1) * self.batch_size]
            if idx:
                yield self.collate_fn([self.dataset[i] for i in idx])
            else:
                batch = self.collate_fn([self.dataset[0]])
                batch["labels"] = torch.full_like(batch["labels"], -100)  # padding: no valid token
                yield batch


def reduce_eval_metrics(metrics: dict[str, float], kd_ratio: float | None = None) -> dict[str, float]:
    """Combine the per-rank results of :func:`kdtune.training.builders.evaluate` into global per-token losses.

    Every rank must call it with its own shard's metrics; the token-weighted sums are all-reduced.

    Args:
        metrics: this rank's ``evaluate`` result.
        kd_ratio: the KD mixing weight used for ``val_loss``; None = fine-tuning (no KD term), as in ``evaluate``.

    Returns:
        The same keys, over the whole validation set.
    """
    tokens = metrics["val_tokens"]
    keys = [k for k in ("val_class_loss", "val_kd_loss") if k in metrics]
    sums = all_reduce_sum([tokens, *(metrics[k] * tokens for k in keys)]).tolist()
    n = max(sums[0], 1.0)
    out = {k: s / n for k, s in zip(keys, sums[1:])}
    out["val_tokens"] = sums[0]
    r = 0.0 if kd_ratio is None else float(kd_ratio)
    out["val_loss"] = (1 - r) * out["val_class_loss"] + r * out.get("val_kd_loss", 0.0)
    return out


def save_final_distributed(
    runtime: Any,
    checkpointer: Any,
    model: nn.Module,
    model_cfg: Any,
    *,
    adapter_only: bool = False,
) -> list[Path]:
    """Gather the trained model on rank 0 and write ``final/`` (HF) and, for LoRA, ``final_adapter/`` (PEFT).

    Every rank must call it. The full state dict is gathered one tensor at a time into rank 0's CPU memory (only the
    adapters when ``adapter_only``), loaded with ``assign=True`` into a fresh copy of the model built on ``meta`` (no
    second copy of the weights), and written by :func:`kdtune.training.builders.save_final`, i.e. by the same
    ``HFCheckpointer.save_hf`` / ``save_adapter`` as the single-device recipes.

    Args:
        runtime: output layout.
        checkpointer: the model's ``HFCheckpointer``.
        model: the sharded trained model.
        model_cfg: the model ``_component_`` node (to rebuild the unsharded module on rank 0).
        adapter_only: LoRA only: write only the adapter.

    Returns:
        The directories written (on rank 0; ``[]`` elsewhere).
    """
    from kdtune.config import instantiate
    from kdtune.training.builders import is_lora_model, save_final

    lora = is_lora_model(model)
    if adapter_only and not lora:
        raise ConfigError("save_adapter_weights_only=true needs a LoRA model (a lora_* builder); set it to false")
    full = gather_full_state_dict(model, trainable_only=adapter_only)
    written: list[Path] = []
    if is_rank_zero():
        dtype = next(iter(full.values())).dtype
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"):
                plain = instantiate(model_cfg)
        finally:
            torch.set_default_dtype(prev)
        plain.load_state_dict(full, strict=not adapter_only, assign=True)
        written = save_final(runtime, checkpointer, plain, adapter_only=adapter_only)
        del plain
    del full
    barrier()
    return written


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP unit of ``model`` that is still unsharded.

    The root unit is kept unsharded after forward (the chunked output projection and its backward recompute use its
    weights outside ``forward``); a frozen teacher has no backward to reshard it, so the recipes call this after each
    micro-batch's backward.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# --------------------------------------------------------------------------------------------------------------------
# settings of the distributed recipes
# --------------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _FSDPSettings:
    """What the distributed recipes add to the single-device settings."""

    fsdp_cpu_offload: bool = field(
        default=False,
        metadata={"help": "Keep sharded parameters, gradients and optimizer state in CPU memory (CUDA only)."},
    )
    fsdp_reshard_after_forward: bool = field(
        default=True,
        metadata={"help": "Free each layer's gathered weights after its forward (less memory, more communication)."},
    )


@dataclass(kw_only=True)
class FinetuneDistributedSettings(FinetuneSettings, _FSDPSettings):
    """Settings of ``full_finetune_distributed``: ``full_finetune_single_device``'s plus FSDP options."""


@dataclass(kw_only=True)
class LoRAFinetuneDistributedSettings(LoRAFinetuneSettings, _FSDPSettings):
    """Settings of ``lora_finetune_distributed``: ``lora_finetune_single_device``'s plus FSDP options."""


@dataclass(kw_only=True)
class KDDistributedSettings(KDSettings, _FSDPSettings):
    """Settings of ``knowledge_distillation_distributed``: the single-device KD settings plus FSDP options."""
