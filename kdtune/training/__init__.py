"""What every recipe must get right, as small tested helpers shared by all recipes.

Token-normalised gradient accumulation and loss mixing (``accumulation``), teacher setup and vocabulary checks
(``teacher``), LR schedules (``schedules``), precision / device / seed / clipping / memory / NaN guards (``runtime``),
resume checkpoints (``resume``), metric loggers and the progress bar (``metric_logging``).
Distributed helpers live in ``kdtune.training.distributed``.
"""

from kdtune.training.accumulation import StepAccumulator, StepMetrics, check_kd_ratio, mix_losses, scale_grads
from kdtune.training.metric_logging import (
    DiskLogger,
    MetricLogger,
    ProgressBar,
    StdoutLogger,
    TensorBoardLogger,
    WandBLogger,
    is_rank_zero,
)
from kdtune.training.resume import LoadedState, ResumeState, capture_rng_state, restore_rng_state
from kdtune.training.runtime import (
    NonFiniteLossError,
    check_finite,
    clip_grad_norm,
    get_device,
    get_dtype,
    peak_memory,
    reset_peak_memory,
    set_seed,
)
from kdtune.training.schedules import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    resolve_warmup_steps,
)
from kdtune.training.teacher import assert_frozen, check_vocab_compatibility, param_fingerprint, setup_teacher

__all__ = [
    "DiskLogger",
    "LoadedState",
    "MetricLogger",
    "NonFiniteLossError",
    "ProgressBar",
    "ResumeState",
    "StdoutLogger",
    "StepAccumulator",
    "StepMetrics",
    "TensorBoardLogger",
    "WandBLogger",
    "assert_frozen",
    "capture_rng_state",
    "check_finite",
    "check_kd_ratio",
    "check_vocab_compatibility",
    "clip_grad_norm",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_device",
    "get_dtype",
    "get_linear_schedule_with_warmup",
    "is_rank_zero",
    "mix_losses",
    "param_fingerprint",
    "peak_memory",
    "reset_peak_memory",
    "resolve_warmup_steps",
    "restore_rng_state",
    "scale_grads",
    "set_seed",
    "setup_teacher",
]
