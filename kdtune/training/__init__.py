"""What every recipe must get right, as small tested helpers shared by all recipes — one module per job:

* ``runtime`` — the :class:`Runtime` (device, dtype, output layout, run id and lock), the :class:`Precision` (fp32 /
  bf16 / fp16 mixed precision with loss scaling), seeding, clipping, memory, NaN guard, rank queries;
* ``preflight`` — checks of the inputs before any model loads (every missing checkpoint, with the command making it);
* ``settings`` — every recipe's typed settings (one declaration read by the recipe, ``kdtune validate`` and the docs);
* ``setup`` — building components from the config: models (+ LoRA init), tokenizer, optimizer, LR schedule, objective;
* ``data`` — datasets, validation split, the resumable data order and step arithmetic;
* ``step`` — token-normalised gradient accumulation and the optimizer step with its NaN/inf guard;
* ``evaluation`` — validation losses from the objective's sums; the teacher check before KD;
* ``checkpoints`` — resume checkpoints (atomic, exact) and the final HF / PEFT outputs with their model card;
* ``export`` — any resume checkpoint written as the run's ``final/`` would be (``kdtune export``);
* ``reporting`` — metric loggers, progress bar, the per-step :class:`Reporter` and the :class:`RunSummary`;
* ``teacher`` — freezing the teacher, vocabulary compatibility;
* ``schedules`` — LR schedules;
* ``distributed`` — torchrun + FSDP2 only (imports the modules above; none of them imports it).

The loss itself — cross-entropy, divergence, temperature, ``kd_ratio``, chunking — is
:class:`kdtune.losses.DistillationObjective`; nothing here knows how it mixes.
"""

from kdtune.training.checkpoints import (
    LoadedState,
    ResumeCheckpoints,
    ResumeState,
    capture_rng_state,
    restore_rng_state,
    run_card,
    save_final,
)
from kdtune.training.data import DataPosition, TrainData, build_data, to_device
from kdtune.training.evaluation import check_teacher, evaluate
from kdtune.training.reporting import (
    DiskLogger,
    MetricLogger,
    ProgressBar,
    Reporter,
    RunSummary,
    StdoutLogger,
    TensorBoardLogger,
    WandBLogger,
)
from kdtune.training.runtime import (
    NonFiniteLossError,
    Precision,
    Runtime,
    check_finite,
    clip_grad_norm,
    get_device,
    get_dtype,
    get_precision,
    is_rank_zero,
    peak_memory,
    reset_peak_memory,
    set_seed,
    setup_runtime,
)
from kdtune.training.schedules import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    resolve_warmup_steps,
)
from kdtune.training.setup import (
    build_lr_scheduler,
    build_model,
    build_objective,
    build_optimizer,
    build_teacher,
    build_tokenizer,
    is_lora_model,
    trainable_parameters,
)
from kdtune.training.step import StepAccumulator, StepMetrics, StepResult, due, optimizer_step, scale_grads
from kdtune.training.teacher import assert_frozen, check_vocab_compatibility, param_fingerprint, setup_teacher

__all__ = [
    "DataPosition",
    "DiskLogger",
    "LoadedState",
    "MetricLogger",
    "NonFiniteLossError",
    "Precision",
    "ProgressBar",
    "Reporter",
    "ResumeCheckpoints",
    "ResumeState",
    "RunSummary",
    "Runtime",
    "StdoutLogger",
    "StepAccumulator",
    "StepMetrics",
    "StepResult",
    "TensorBoardLogger",
    "TrainData",
    "WandBLogger",
    "assert_frozen",
    "build_data",
    "build_lr_scheduler",
    "build_model",
    "build_objective",
    "build_optimizer",
    "build_teacher",
    "build_tokenizer",
    "capture_rng_state",
    "check_finite",
    "check_teacher",
    "check_vocab_compatibility",
    "clip_grad_norm",
    "due",
    "evaluate",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_device",
    "get_dtype",
    "get_linear_schedule_with_warmup",
    "get_precision",
    "is_lora_model",
    "is_rank_zero",
    "optimizer_step",
    "param_fingerprint",
    "peak_memory",
    "reset_peak_memory",
    "resolve_warmup_steps",
    "restore_rng_state",
    "run_card",
    "save_final",
    "scale_grads",
    "set_seed",
    "setup_runtime",
    "setup_teacher",
    "to_device",
    "trainable_parameters",
]
