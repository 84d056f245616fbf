"""The process group of a ``torchrun`` job: setup/teardown, ranks, and the collectives the recipes need.

Gradient normalisation. FSDP2 reduce-scatters gradients with an *average* over ranks. A recipe computes, on each rank,
``loss_sum_local`` (summed over the rank's trained tokens) and must end with gradients of
``sum_over_ranks(loss_sum_local) / global_tokens``. Since FSDP divides by the world size, the factor to apply to the
reduced gradients is ``world_size / global_tokens`` (:func:`global_grad_scale`; ``StepAccumulator`` applies it with
``grad_average_factor=world_size``). Setting FSDP's divide factor to 1 instead would need a ``PREMUL_SUM``/``SUM``
reduce-scatter that Gloo does not offer, so the factor is applied afterwards.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kdtune.errors import ConfigError
from kdtune.training.runtime import get_rank, get_world_size, is_distributed, is_rank_zero

__all__ = [
    "DistEnv",
    "EvenEvalLoader",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "get_rank",
    "get_world_size",
    "global_grad_scale",
    "init_distributed",
    "is_distributed",
    "is_rank_zero",
    "rank_zero_first",
]


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
