"""Build a recipe's components from its config: models (+ LoRA init, teacher), tokenizer, optimizer, LR schedule and
the training objective.

Every function takes plain settings values or ``DictConfig`` component nodes and returns the built object, so a new
recipe reuses them as they are. Data loading is in :mod:`kdtune.training.data`; the distributed variants (meta-device
build + sharding) in :mod:`kdtune.training.distributed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from kdtune.config import instantiate
from kdtune.errors import CheckpointError, ConfigError
from kdtune.losses import DistillationObjective, LiveTeacher, OnPolicy, TeacherSource
from kdtune.models import enable_activation_checkpointing
from kdtune.models.modules.lora import LoRALinear
from kdtune.perf import compile_options
from kdtune.training.data import TrainData
from kdtune.training.runtime import Runtime
from kdtune.training.teacher import check_vocab_compatibility, setup_teacher

__all__ = [
    "build_lr_scheduler",
    "build_model",
    "build_objective",
    "build_optimizer",
    "build_teacher",
    "build_tokenizer",
    "compile_layers",
    "count_parameters",
    "init_lora_parameters",
    "is_lora_model",
    "trainable_parameters",
    "transformer_layers",
]


def build_model(
    model_cfg: DictConfig,
    checkpointer_cfg: DictConfig | None,
    runtime: Runtime,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    lora_seed: int | None = None,
    key: str = "model",
) -> tuple[nn.Module, Any]:
    """Build a model from its ``_component_`` on the runtime's device/dtype and load its weights.

    LoRA/QLoRA models (built by a ``lora_*`` builder) keep only their adapter parameters trainable; their base weights
    come from the checkpointer and the adapters start from their own initialisation (``lora_b`` = 0).

    Args:
        model_cfg: the model ``_component_`` node.
        checkpointer_cfg: the ``kdtune.models.HFCheckpointer`` node; None = keep random init.
        runtime: device and dtype.
        activation_checkpointing: recompute each decoder layer in backward.
        compile: ``torch.compile`` each decoder layer.
        lora_seed: (re-)initialise the LoRA matrices from this seed alone (PEFT init), so a run's adapters start the
            same whatever the base model's construction consumed from the global RNG (and the same as a sharded run).
        key: config key of the model, for error messages.

    Returns:
        ``(model, checkpointer)`` (checkpointer None when ``checkpointer_cfg`` is None).
    """
    checkpointer = instantiate(checkpointer_cfg) if checkpointer_cfg is not None else None
    from_disk = checkpointer is not None and getattr(checkpointer, "checkpoint_dir", None) is not None
    prev = torch.get_default_dtype()
    torch.set_default_dtype(runtime.dtype)
    try:
        # weights that come from disk: build on the meta device (no random init, no second copy) and assign them
        with torch.device("meta") if from_disk else runtime.device:
            model = instantiate(model_cfg)
    finally:
        torch.set_default_dtype(prev)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{key}: _component_ built a {type(model).__name__}, not a model; use a kdtune.models builder"
        )
    if from_disk:
        # LoRA matrices are not in a base checkpoint (never "missing"); they are created on the device at PEFT init
        checkpointer.load_into(model, strict=True, assign=True, device=runtime.device)
        on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if on_meta:
            raise CheckpointError(
                f"{key}: {len(on_meta)} tensors were not filled from {checkpointer.checkpoint_dir} (e.g. {on_meta[:3]}); "
                "the checkpoint does not match the model builder"
            )
    model.to(device=runtime.device)
    if lora_seed is not None and is_lora_model(model):
        init_lora_parameters(model, lora_seed)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if compile:
        compile_layers(transformer_layers(model, key), runtime.device)
    return model, checkpointer


def compile_layers(layers: Iterable[nn.Module], device: torch.device) -> None:
    """``torch.compile`` each transformer block in place: what ``compile: true`` does, single-device and sharded.

    With :func:`kdtune.perf.compile_options` (on a CPU the C++ wrapper: per-step losses identical to the Python
    wrapper's; cold compilation 39 vs 38 s on the benchmark's small pair).
    """
    options = compile_options(device)
    for layer in layers:
        layer.compile(options=options)


def transformer_layers(model: nn.Module, key: str = "model") -> list[nn.Module]:
    """The transformer blocks of a kdtune model in forward order — ``model.layers`` of a decoder-only model, the
    encoder's then the decoder's blocks of an encoder-decoder (``is_encoder_decoder``): what ``compile`` compiles and
    FSDP shards one by one.

    Raises:
        ConfigError: the model has no blocks where kdtune models keep them.
    """
    if getattr(model, "is_encoder_decoder", False):
        return [*model.encoder.layers, *model.decoder.layers]
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ConfigError(
            f"{key}: {type(model).__name__} has no `layers` (nor encoder/decoder stacks); kdtune expects a kdtune "
            "model (kdtune.models builders or kdtune.models.hf_model)"
        )
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def is_lora_model(model: nn.Module) -> bool:
    """Whether ``model`` contains LoRA adapters (``lora_a``/``lora_b`` submodules)."""
    return any(name.endswith("lora_a") for name, _ in model.named_modules())


def trainable_parameters(model: nn.Module, key: str = "model") -> list[nn.Parameter]:
    """The parameters the optimizer updates (all of a full model; only the adapters of a LoRA model).

    Raises:
        ConfigError: when nothing is trainable.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{key}: the model has no trainable parameters; check lora_attn_modules / the builder")
    return params


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def build_tokenizer(tokenizer_cfg: DictConfig) -> Any:
    """Build the tokenizer ``_component_`` (e.g. ``kdtune.data.load_hf_tokenizer``)."""
    return instantiate(tokenizer_cfg)


def build_optimizer(optimizer_cfg: DictConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Build the optimizer ``_component_`` with ``params`` as its first argument."""
    return instantiate(optimizer_cfg, params)


def build_objective(
    settings: Any,
    teacher: TeacherSource | nn.Module | None = None,
    tokenizer: Any | None = None,
) -> DistillationObjective:
    """The run's :class:`~kdtune.losses.DistillationObjective` from its settings — the one place they meet.

    Fine-tuning settings (no ``kd_loss``) give the cross-entropy objective; KD settings give the divergence
    ``kd_loss`` mixed by ``kd_ratio`` at ``temperature`` with ``teacher`` as the teacher source. ``num_output_chunks``
    sets the chunking for both; ``compile`` compiles the fused chunk loss. The objective validates every value (one
    line naming the key when one is wrong).

    Args:
        settings: the recipe's settings (:mod:`kdtune.training.settings`).
        teacher: the teacher source, or the teacher model (wrapped in :class:`kdtune.losses.LiveTeacher`).
        tokenizer: the student's tokenizer (its pad and stop ids); needed with ``on_policy``.

    Returns:
        The objective.
    """
    kd_loss_cfg = getattr(settings, "kd_loss", None)
    if kd_loss_cfg is None:
        return DistillationObjective(num_output_chunks=settings.num_output_chunks, compile_loss=settings.compile)
    return DistillationObjective(
        instantiate(kd_loss_cfg),
        teacher=teacher,
        kd_ratio=settings.kd_ratio,
        temperature=settings.temperature,
        scale_by_temperature_squared=settings.scale_by_temperature_squared,
        num_output_chunks=settings.num_output_chunks,
        on_policy=_build_on_policy(settings, tokenizer),
        compile_loss=settings.compile,
    )


def _build_on_policy(settings: Any, tokenizer: Any | None) -> OnPolicy | None:
    """The ``on_policy`` sampler of KD settings (None when the key is absent or null)."""
    op = getattr(settings, "on_policy", None)
    if op is None:
        return None
    if tokenizer is None:
        raise ConfigError("on_policy is set but the recipe gave build_objective no tokenizer (its pad and stop ids)")
    return OnPolicy(
        op.lmbda, op.max_new_tokens, op.temperature, op.top_k, op.seq_kd,
        pad_id=tokenizer.pad_id, eos_ids=list(tokenizer.stop_ids), seed=settings.seed,
    )  # fmt: skip


def build_teacher(
    settings: Any,
    student: nn.Module,
    tokenizer: Any,
    data: TrainData,
    load_model: Callable[[], nn.Module],
) -> TeacherSource:
    """The KD run's teacher source: a frozen live model (``teacher_model``) or a cache of its top-k logits
    (``teacher_logits``), checked against the student, the tokenizer and the data at setup.

    Args:
        settings: KD settings (``teacher_model``/``teacher_checkpointer``/``teacher_tokenizer`` or ``teacher_logits``,
            ``temperature``).
        student: the student (its vocabulary size).
        tokenizer: the student's tokenizer.
        data: the training data (a cached teacher must cover its examples).
        load_model: builds and loads the teacher model (single-device or sharded), called only for a live teacher.

    Returns:
        A :class:`~kdtune.losses.LiveTeacher` or the cached teacher component.
    """
    if settings.teacher_logits is not None:
        live = [k for k in ("teacher_model", "teacher_checkpointer") if getattr(settings, k) is not None]
        if live:
            raise ConfigError(
                f"teacher_logits is set, and so is {' and '.join(live)}: a run distils from a cached teacher OR a "
                f"teacher model; remove one (e.g. ~{live[0]})"
            )
        source = instantiate(settings.teacher_logits)
        if not isinstance(source, TeacherSource):
            raise ConfigError(
                f"teacher_logits: {type(source).__name__} is not a teacher source (kdtune.losses.CachedTeacher)"
            )
        datasets = [data.loader.dataset, data.val_loader.dataset if data.val_loader is not None else None]
        source.check_run(
            tokenizer=tokenizer,
            temperature=settings.temperature,
            student_vocab_size=student.vocab_size,
            datasets=datasets,
        )
        return source
    missing = [k for k in ("teacher_model", "teacher_checkpointer") if getattr(settings, k) is None]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} missing: KD needs a teacher model (teacher_model + teacher_checkpointer) or a "
            "cached teacher (teacher_logits: {_component_: kdtune.losses.CachedTeacher, path: <cache dir>})"
        )
    teacher = setup_teacher(load_model())
    kinds = {True: "an encoder-decoder (seq2seq)", False: "a decoder-only (causal)"}
    seq2seq = bool(getattr(student, "is_encoder_decoder", False)), bool(getattr(teacher, "is_encoder_decoder", False))
    if seq2seq[0] != seq2seq[1]:
        raise ConfigError(
            f"teacher_model is {kinds[seq2seq[1]]} model but the student (model) is {kinds[seq2seq[0]]} one: KD "
            "compares them position by position, so both must be causal or both seq2seq; pick a teacher of that kind"
        )
    teacher_tokenizer = build_tokenizer(settings.teacher_tokenizer) if settings.teacher_tokenizer is not None else None
    check_vocab_compatibility(student.vocab_size, teacher.vocab_size, tokenizer, teacher_tokenizer)
    return LiveTeacher(teacher)


def build_lr_scheduler(
    scheduler_cfg: DictConfig | None, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Build the LR schedule ``_component_`` as ``component(optimizer, num_training_steps=total_steps, ...)``.

    Returns None (constant LR) when ``scheduler_cfg`` is None.
    """
    if scheduler_cfg is None:
        return None
    return instantiate(scheduler_cfg, optimizer, num_training_steps=total_steps)


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
