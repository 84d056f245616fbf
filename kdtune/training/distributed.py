"""Distributed training on ``torchrun`` + FSDP2 (``torch.distributed.fsdp.fully_shard``).

What the distributed recipes need beyond the single-device ones, and nothing else:

* process group setup with the backend picked from the device (NCCL on CUDA, Gloo on CPU) and one device per local
  rank (:func:`init_distributed`);
* sharding a model per decoder layer and then at the root (:func:`shard_model`), for the student and the teacher;
* filling a model built on the ``meta`` device from an HF checkpoint one shard file at a time
  (:func:`load_hf_into_sharded_model`), so no rank ever holds a full copy of a large model;
* global reductions for token normalisation and logged metrics (:func:`all_reduce_sum`);
* gradient clipping on sharded (DTensor) parameters (:func:`clip_grad_norm_`);
* a resumable, per-epoch reshuffled sampler (:class:`ResumableDistributedSampler`);
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

import datetime
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data import DistributedSampler as _TorchDistributedSampler

from kdtune.errors import CheckpointError, ConfigError

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
    "global_grad_scale",
    "shard_model",
    "materialize_meta_model",
    "load_hf_into_sharded_model",
    "gather_full_state_dict",
    "clip_grad_norm_",
    "ResumableDistributedSampler",
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

    if "WORLD_SIZE" not in os.environ:  # plain `python recipe.py`: a world of one
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        os.environ["WORLD_SIZE"] = "1"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=torch_device if device_type == "cuda" else None,
        )
    return DistEnv(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        local_world_size=local_world_size,
        device=torch_device,
        backend=backend,
    )


def destroy_distributed() -> None:
    """Tear the process group down (after a final barrier); a no-op when none exists."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
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
    """Sum a number (or a 1-D batch of numbers) over all ranks, in float64 so token counts and loss sums are exact.

    Args:
        values: a scalar, a tensor, or an iterable of numbers reduced together in one collective.

    Returns:
        A float64 CPU tensor of the same shape holding the global sums (unchanged without a process group).
    """
    if isinstance(values, torch.Tensor):
        t = values.detach().to(torch.float64)
    elif isinstance(values, (int, float)):
        t = torch.tensor(float(values), dtype=torch.float64)
    else:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_distributed() and get_world_size() > 1:
        t = t.to(_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


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
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

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


def _hf_shard_files(checkpoint_dir: Path, checkpoint_files: list[str] | None) -> list[Path]:
    if checkpoint_files:
        files = [checkpoint_dir / f for f in checkpoint_files]
    elif (checkpoint_dir / "model.safetensors.index.json").exists():
        index = json.loads((checkpoint_dir / "model.safetensors.index.json").read_text())
        files = [checkpoint_dir / f for f in sorted(set(index["weight_map"].values()))]
    elif (checkpoint_dir / "model.safetensors").exists():
        files = [checkpoint_dir / "model.safetensors"]
    else:
        files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{checkpoint_dir}: no *.safetensors weights found; the distributed recipes read safetensors "
            "(convert .bin checkpoints with `kdtune download` or save them with safe_serialization=True)."
        )
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: listed checkpoint file does not exist; fix checkpointer.checkpoint_files.")
        if f.suffix != ".safetensors":
            raise CheckpointError(f"{f}: the distributed loader reads .safetensors files only; convert it first.")
    return files


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
    checkpoint_files: list[str] | None = None,
    *,
    strict: bool = True,
    allow_missing: Iterable[str] = ("lora_",),
) -> list[str]:
    """Fill a (sharded, materialised) model from an HF checkpoint directory, one safetensors shard file at a time.

    Each rank opens the shard files itself (memory-mapped) and keeps only its slice of each tensor: at any time a rank
    holds at most one HF shard file's converted tensors plus its own parameter shards, never a full model. (The
    alternative, rank 0 reading and broadcasting, costs a full copy of each shard file in network traffic per rank
    and makes rank 0 the bottleneck; reading locally needs the checkpoint on every node, which multi-node jobs have.)
    Names and layouts are converted by the model's family (:func:`kdtune.models._family.family_for_hf_config`).

    Args:
        model: the model, built on ``meta``, sharded with :func:`shard_model` and materialised.
        checkpoint_dir: an HF model directory (``config.json`` + ``*.safetensors``).
        checkpoint_files: explicit shard file names; default: from the index, or ``model.safetensors``.
        strict: raise if a model parameter is not in the checkpoint (except ``allow_missing`` patterns) or a checkpoint
            tensor has no parameter.
        allow_missing: substrings of parameter names that may be absent from the checkpoint (LoRA weights).

    Returns:
        The names of the model parameters that were not loaded (LoRA weights), which the caller must initialise.

    Raises:
        CheckpointError: missing directory/files, unknown architecture, a shape mismatch, or (strict) missing/unexpected
            tensors.
    """
    from safetensors import safe_open

    from kdtune.models._family import family_for_hf_config

    ckpt = Path(checkpoint_dir)
    config_path = ckpt / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{ckpt}: no config.json; point checkpointer.checkpoint_dir at an HF model directory.")
    hf_config = json.loads(config_path.read_text())
    _ensure_families_registered()
    family = family_for_hf_config(hf_config, source=str(config_path))

    expected = {name for name, _ in model.named_parameters()}
    expected |= {
        name
        for name, _ in _persistent_buffers(model)
        if _lookup_param_or_buffer(model, name) is not None and not name.endswith("inv_freq")
    }
    loaded: set[str] = set()
    unexpected: list[str] = []
    for path in _hf_shard_files(ckpt, checkpoint_files):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            hf_part = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        converted = family.state_dict_from_hf(hf_part, hf_config)
        del hf_part
        for name, full in converted.items():
            target = _lookup_param_or_buffer(model, name)
            if target is None:
                unexpected.append(name)
                continue
            _copy_full_into(target, full, name, path)
            loaded.add(name)
        del converted
    missing = sorted(expected - loaded)
    allowed = [m for m in missing if any(p in m for p in allow_missing)]
    really_missing = [m for m in missing if m not in allowed]
    if strict and (really_missing or unexpected):
        parts = []
        if really_missing:
            parts.append(f"missing {len(really_missing)} tensor(s) e.g. {really_missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"{ckpt}: checkpoint does not match the model ({'; '.join(parts)}); check that the model builder "
            "matches config.json."
        )
    return allowed


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


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global L2 gradient norm over all (possibly sharded) parameters, clipped to ``max_norm`` when given.

    ``torch.nn.utils.clip_grad_norm_`` handles DTensor gradients in torch >= 2.6: it reduces the per-shard norms over
    the mesh and scales each shard by the same factor. Its DTensor result is turned into a plain tensor here.

    Args:
        parameters: the trainable parameters.
        max_norm: clip threshold; ``None`` only measures the norm.

    Returns:
        The total norm before clipping, a 0-dim float32 tensor (identical on every rank).
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.detach().float().cpu()


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
    else:
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainable_only:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in trainable}
    return sd if is_rank_zero() else {}


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------


class ResumableDistributedSampler(_TorchDistributedSampler):
    """``torch.utils.data.DistributedSampler`` that can start part-way through an epoch (exact resume).

    The order is torch's: each epoch a permutation seeded with ``seed + epoch`` (call :meth:`set_epoch`), then rank
    ``r`` takes positions ``r, r + W, r + 2W, ...``. So ``W`` ranks with micro-batch ``B`` see, step for step, the same
    samples as one process with micro-batch ``W * B`` using the same sampler with ``num_replicas=1``.

    Args:
        dataset: the map-style dataset.
        num_replicas: world size (default: the current one).
        rank: this rank (default: the current one).
        shuffle: reshuffle each epoch.
        seed: base seed (the same on every rank).
        drop_last: drop the tail that does not divide evenly by the world size (else pad by repeating samples).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=get_world_size() if num_replicas is None else num_replicas,
            rank=get_rank() if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start_index = 0

    def set_start_index(self, start_index: int) -> None:
        """Skip the first ``start_index`` samples of this rank's share of the current epoch (reset by set_epoch)."""
        if start_index < 0 or start_index > self.num_samples:
            raise ValueError(f"start_index {start_index} outside [0, {self.num_samples}]")
        self.start_index = start_index

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation and start from its beginning."""
        super().set_epoch(epoch)
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    def state_dict(self) -> dict[str, int]:
        """Epoch and start position (samples of this rank already consumed are tracked by the caller)."""
        return {"epoch": int(self.epoch), "start_index": int(self.start_index), "seed": int(self.seed)}


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


def _rng_state() -> dict[str, Any]:
    import random

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_sharded_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra_state: Mapping[str, Any],
    *,
    keep_last: int = 1,
    trainable_only: bool = False,
) -> Path:
    """Write a resume checkpoint ``checkpoints_dir/step_<step>`` with ``torch.distributed.checkpoint``.

    Every rank writes its own shards of the model and optimizer state (no gather) plus its RNG state; rank 0 writes
    ``state.json`` (``extra_state``: step, epoch, data position, LR schedule, config...). Everything goes to
    ``step_<step>.tmp`` first; after a barrier rank 0 renames it (atomic), then removes all but the newest
    ``keep_last`` complete checkpoints. ``checkpoints_dir`` must be on storage every rank sees (multi-node: shared FS).

    Args:
        checkpoints_dir: the directory of resume checkpoints.
        step: optimizer steps done.
        model: the sharded model.
        optimizer: its optimizer.
        extra_state: JSON-serialisable state (``lr_scheduler`` state dicts are JSON-friendly); tensors are not allowed.
        keep_last: complete checkpoints to keep (>= 1).
        trainable_only: store only trainable parameters (LoRA: the frozen base comes from the HF checkpoint).

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
    torch.save(_rng_state(), tmp / f"rng_rank{get_rank()}.pt")
    barrier()
    if is_rank_zero():
        state = dict(extra_state)
        state.update({"step": step, "world_size": get_world_size(), "trainable_only": trainable_only})
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=_json_default))
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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


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
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return state
