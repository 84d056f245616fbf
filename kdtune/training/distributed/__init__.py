"""What the distributed recipes (``torchrun`` + FSDP2) need beyond the single-device ones, and nothing else.

* :mod:`~kdtune.training.distributed.env` — the process group (NCCL on CUDA, Gloo on CPU; one device per local rank),
  rank queries and the collectives (global sums for token normalisation and metrics, even validation shares);
* :mod:`~kdtune.training.distributed.sharding` — meta-device build, per-layer ``fully_shard``, loading an HF checkpoint
  one weight file at a time, gathering the full state dict on rank 0;
* :mod:`~kdtune.training.distributed.checkpoints` — sharded resume checkpoints (DCP) and the final HF save.

These modules import the shared training modules; nothing shared imports them.
"""

from kdtune.training.distributed.checkpoints import (
    DistributedResumeCheckpoints,
    latest_sharded_checkpoint,
    load_sharded_checkpoint,
    save_final_distributed,
    save_sharded_checkpoint,
)
from kdtune.training.distributed.env import (
    DistEnv,
    EvenEvalLoader,
    all_reduce_sum,
    barrier,
    broadcast_object,
    destroy_distributed,
    get_rank,
    get_world_size,
    global_grad_scale,
    init_distributed,
    is_distributed,
    is_rank_zero,
    rank_zero_first,
)
from kdtune.training.distributed.sharding import (
    build_sharded_model,
    gather_full_state_dict,
    load_hf_into_sharded_model,
    materialize_meta_model,
    shard_model,
)

__all__ = [
    "DistEnv",
    "DistributedResumeCheckpoints",
    "EvenEvalLoader",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "build_sharded_model",
    "destroy_distributed",
    "gather_full_state_dict",
    "get_rank",
    "get_world_size",
    "global_grad_scale",
    "init_distributed",
    "is_distributed",
    "is_rank_zero",
    "latest_sharded_checkpoint",
    "load_hf_into_sharded_model",
    "load_sharded_checkpoint",
    "materialize_meta_model",
    "rank_zero_first",
    "save_final_distributed",
    "save_sharded_checkpoint",
    "shard_model",
]
