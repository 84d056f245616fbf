"""Build a recipe's parts from its config: device/precision, models (+LoRA, +teacher) with their checkpointers,
tokenizer, datasets + validation split + a resumable data order, optimizer, LR schedule, metric logger, and the small
loop pieces every recipe shares (moving batches, evaluation, resume checkpoints, final save).

Recipes (single-device and distributed) call these so that each recipe file only shows its own training loop. Every
function takes plain settings values or ``DictConfig`` component nodes, so the functions can be reused by new recipes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from kdtune.config import instantiate
from kdtune.errors import CheckpointError, ConfigError

log = logging.getLogger("kdtune")

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    """Where and how a recipe computes: the device, the parameter/compute dtype and the output layout.

    Attributes:
        device: the torch device models and batches live on.
        dtype: parameter and compute dtype (fp32 or bf16).
        output_dir: the run's output directory (created).
    """

    device: torch.device
    dtype: torch.dtype
    output_dir: Path

    @property
    def checkpoints_dir(self) -> Path:
        """``output_dir/checkpoints``: one ``step_N`` resume directory per save."""
        return self.output_dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        """``output_dir/final``: the HF-format model written at the end."""
        return self.output_dir / "final"

    @property
    def final_adapter_dir(self) -> Path:
        """``output_dir/final_adapter``: the PEFT adapter written at the end of a LoRA run."""
        return self.output_dir / "final_adapter"

    @property
    def logs_dir(self) -> Path:
        """``output_dir/logs``: metric logs (JSON lines)."""
        return self.output_dir / "logs"


def setup_runtime(
    device: str,
    dtype: str,
    output_dir: str,
    seed: int,
    deterministic: bool = False,
    *,
    cfg: DictConfig | None = None,
    save_config_file: bool = True,
) -> Runtime:
    """Seed everything, resolve device and dtype, create the output directory and save the resolved config there.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``fp32`` or ``bf16`` (fp16 is refused by :func:`kdtune.training.get_dtype`).
        output_dir: the run's output directory.
        seed: the global seed.
        deterministic: whether to force deterministic algorithms.
        cfg: the run's config, saved (resolved) as ``output_dir/config.yaml``.
        save_config_file: set False on non-zero ranks.

    Returns:
        The :class:`Runtime`.
    """
    from kdtune.training import get_device, get_dtype, set_seed

    set_seed(seed, deterministic=deterministic)
    dev = get_device(device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg is not None and save_config_file:
        from kdtune.config import save_config

        save_config(cfg, out / "config.yaml")
    return Runtime(device=dev, dtype=get_dtype(dtype, dev), output_dir=out)


# ------------------------------------------------------------------------------------------------------------ models
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
        from kdtune.training.distributed import init_lora_parameters

        init_lora_parameters(model, lora_seed)
    if activation_checkpointing:
        from kdtune.models import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    if compile:
        for layer in model.layers:
            layer.compile()
    return model, checkpointer


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


# ---------------------------------------------------------------------------------------------------- tokenizer/data
def build_tokenizer(tokenizer_cfg: DictConfig) -> Any:
    """Build the tokenizer ``_component_`` (e.g. ``kdtune.data.load_hf_tokenizer``)."""
    return instantiate(tokenizer_cfg)


def _instantiate_dataset(cfg: DictConfig | ListConfig, tokenizer: Any, **kwargs: Any) -> Dataset:
    if isinstance(cfg, ListConfig | list):
        return ConcatDataset([instantiate(c, tokenizer, **kwargs) for c in cfg])
    return instantiate(cfg, tokenizer, **kwargs)


def build_datasets(
    dataset_cfg: DictConfig | ListConfig,
    tokenizer: Any,
    *,
    val_dataset_cfg: DictConfig | ListConfig | None = None,
    val_split_ratio: float = 0.0,
    seed: int = 0,
) -> tuple[Dataset, Dataset | None]:
    """Build the training dataset and the validation dataset, if any.

    The validation data is, in order of precedence: ``val_dataset_cfg``; a seeded held-out split of the training
    dataset of ``val_split_ratio`` (passed to the dataset builder as ``val_split_ratio``/``val_split_seed`` with
    ``subset="train"|"validation"``); the dataset builder's own split settings (``val_split_ratio`` or ``eval_split``
    in the dataset node); or none.

    Returns:
        ``(train_dataset, val_dataset_or_None)``.
    """
    if not 0.0 <= val_split_ratio < 1.0:
        raise ConfigError(f"val_split_ratio={val_split_ratio} must be in [0, 1); e.g. val_split_ratio=0.05")
    if val_dataset_cfg is not None:
        return _instantiate_dataset(dataset_cfg, tokenizer), _instantiate_dataset(val_dataset_cfg, tokenizer)
    if val_split_ratio > 0:
        if isinstance(dataset_cfg, ListConfig | list):
            raise ConfigError("val_split_ratio with a list of datasets: give val_dataset explicitly instead")
        kw = {"val_split_ratio": val_split_ratio, "val_split_seed": seed}
        return (
            _instantiate_dataset(dataset_cfg, tokenizer, subset="train", **kw),
            _instantiate_dataset(dataset_cfg, tokenizer, subset="validation", **kw),
        )
    if isinstance(dataset_cfg, DictConfig) and (dataset_cfg.get("val_split_ratio") or dataset_cfg.get("eval_split")):
        return (
            _instantiate_dataset(dataset_cfg, tokenizer, subset="train"),
            _instantiate_dataset(dataset_cfg, tokenizer, subset="validation"),
        )
    return _instantiate_dataset(dataset_cfg, tokenizer), None


class ResumableSampler(Sampler[int]):
    """A sampler whose order depends only on ``(seed, epoch)`` and that can start part-way through an epoch.

    Each epoch is a permutation (``shuffle=True``) seeded with ``seed + epoch`` — independent of any global RNG, so a
    resumed run sees exactly the data order of an uninterrupted one. With ``world_size > 1`` every rank takes a
    disjoint strided slice of the same permutation (the tail that does not divide evenly is dropped).

    Args:
        num_samples: length of the dataset.
        shuffle: permute each epoch.
        seed: base seed of the permutation.
        rank: this process's rank.
        world_size: number of data-parallel processes.
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select ``epoch``'s order and skip its first ``start`` samples (of this rank)."""
        self.epoch, self.start = epoch, start

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full index order for ``epoch`` (before skipping)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.num_samples // self.world_size
        return order[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        yield from self.epoch_indices(self.epoch)[self.start :]

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start


@dataclass
class DataPosition:
    """Where training is: the next optimizer step (1-based count of steps done) and where in which epoch.

    Attributes:
        epoch: the current epoch (0-based).
        step_in_epoch: optimizer steps already done in ``epoch``.
        global_step: optimizer steps done in total.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def state_dict(self) -> dict[str, int]:
        """Plain dict for the resume checkpoint."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}

    @classmethod
    def from_state_dict(cls, state: dict[str, int]) -> DataPosition:
        """Inverse of :meth:`state_dict`."""
        return cls(int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"]))


@dataclass
class TrainData:
    """The training data, its resumable order and the step arithmetic derived from it.

    Attributes:
        loader: the training DataLoader (micro-batches of ``batch_size``; last partial batch dropped).
        sampler: its :class:`ResumableSampler`.
        val_loader: validation DataLoader, or None.
        batch_size: micro-batch size.
        grad_accum: micro-batches per optimizer step.
        steps_per_epoch: optimizer steps per epoch (after ``max_steps_per_epoch``).
        total_steps: optimizer steps of the whole run (after ``epochs`` and ``max_steps``).
        epochs: number of epochs.
    """

    loader: DataLoader
    sampler: ResumableSampler
    val_loader: DataLoader | None
    batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    position: DataPosition = field(default_factory=DataPosition)

    def steps(self) -> Iterator[tuple[DataPosition, list[dict[str, torch.Tensor]]]]:
        """Yield ``(position, micro_batches)`` for each remaining optimizer step, from ``self.position`` on.

        ``position`` is the position *after* the step (what a checkpoint saved right after it must record), and
        ``micro_batches`` the ``grad_accum`` collated micro-batches (on CPU) of the step.
        """
        pos = self.position
        while pos.epoch < self.epochs and pos.global_step < self.total_steps:
            if pos.step_in_epoch >= self.steps_per_epoch:
                pos = DataPosition(pos.epoch + 1, 0, pos.global_step)
                continue
            self.sampler.set_epoch(pos.epoch, start=pos.step_in_epoch * self.grad_accum * self.batch_size)
            batches = iter(self.loader)
            while pos.step_in_epoch < self.steps_per_epoch and pos.global_step < self.total_steps:
                micro = [next(batches) for _ in range(self.grad_accum)]
                pos = DataPosition(pos.epoch, pos.step_in_epoch + 1, pos.global_step + 1)
                self.position = pos
                yield pos, micro
            # an epoch ends after its last step; the next position is the next epoch's start
            if pos.step_in_epoch >= self.steps_per_epoch:
                pos = DataPosition(pos.epoch + 1, 0, pos.global_step)
                self.position = pos

    def is_epoch_end(self, pos: DataPosition) -> bool:
        """Whether ``pos`` (as yielded by :meth:`steps`) is the last step of its epoch."""
        return pos.step_in_epoch >= self.steps_per_epoch


def build_train_data(
    train_ds: Dataset,
    val_ds: Dataset | None,
    *,
    pad_id: int,
    batch_size: int,
    gradient_accumulation_steps: int,
    epochs: int,
    max_steps_per_epoch: int | None = None,
    max_steps: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Any = None,
) -> TrainData:
    """Wrap datasets into DataLoaders with a resumable order and compute the run's step counts.

    Args:
        train_ds: the training dataset (items ``{"tokens", "labels"}`` (+ packed fields)).
        val_ds: the validation dataset or None.
        pad_id: the tokenizer's pad id (token padding; labels are padded with -100).
        batch_size: micro-batch size (per rank).
        gradient_accumulation_steps: micro-batches per optimizer step.
        epochs: number of epochs.
        max_steps_per_epoch: cap on optimizer steps per epoch.
        max_steps: cap on total optimizer steps.
        shuffle: permute each epoch.
        seed: seed of the data order.
        num_workers: DataLoader workers.
        rank: data-parallel rank.
        world_size: data-parallel world size.
        collate_fn: override of the default ``kdtune.data.padded_collate``.

    Returns:
        The :class:`TrainData`.
    """
    for name, value in (("batch_size", batch_size), ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be >= 1")
    if epochs < 1:
        raise ConfigError(f"epochs={epochs} must be >= 1")
    if collate_fn is None:
        from kdtune.data import padded_collate

        collate_fn = partial(padded_collate, pad_id=pad_id, ignore_index=IGNORE_INDEX)
    sampler = ResumableSampler(len(train_ds), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    # the loader's own generator: creating an iterator must not draw from the global RNG (dropout), or a resumed run
    # (which creates its iterator at another point of the RNG stream) would diverge from an uninterrupted one
    loader = DataLoader(
        train_ds,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    micro_per_epoch = (len(train_ds) // world_size) // batch_size
    steps_per_epoch = micro_per_epoch // gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"dataset: {len(train_ds)} examples are fewer than one optimizer step needs (batch_size={batch_size} x "
            f"gradient_accumulation_steps={gradient_accumulation_steps} x {world_size} rank(s)); lower them or add data"
        )
    if max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    total_steps = steps_per_epoch * epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    val_loader = None
    if val_ds is not None and len(val_ds) > 0:
        val_sampler = ResumableSampler(len(val_ds), shuffle=False, rank=rank, world_size=world_size)
        val_loader = DataLoader(
            val_ds,
            batch_size=batch_size,
            sampler=val_sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
    return TrainData(
        loader=loader,
        sampler=sampler,
        val_loader=val_loader,
        batch_size=batch_size,
        grad_accum=gradient_accumulation_steps,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=epochs,
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move every tensor of a collated batch to ``device``."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``TransformerDecoder.forward`` present in a batch (packed fields included)."""
    return {k: batch[k] for k in ("input_pos", "document_ids") if k in batch}


def count_valid_tokens(batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """Valid (trained) tokens of the micro-batches of one step: shifted labels that are not ``-100``."""
    return int(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum().item() for b in batches))


# -------------------------------------------------------------------------------------------- optimizer/sched/logger
def build_optimizer(optimizer_cfg: DictConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Build the optimizer ``_component_`` with ``params`` as its first argument."""
    return instantiate(optimizer_cfg, params)


def build_lr_scheduler(
    scheduler_cfg: DictConfig | None, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Build the LR schedule ``_component_`` as ``component(optimizer, num_training_steps=total_steps, ...)``.

    Returns None (constant LR) when ``scheduler_cfg`` is None.
    """
    if scheduler_cfg is None:
        return None
    return instantiate(scheduler_cfg, optimizer, num_training_steps=total_steps)


def build_metric_logger(logger_cfg: DictConfig | None, runtime: Runtime) -> Any:
    """Build the metric logger ``_component_``; None = ``kdtune.training.DiskLogger`` writing ``logs/``."""
    if logger_cfg is None:
        from kdtune.training import DiskLogger

        return DiskLogger(log_dir=str(runtime.logs_dir))
    return instantiate(logger_cfg)


def build_kd_loss(kd_loss_cfg: DictConfig, temperature: float | None) -> nn.Module:
    """Build the KD loss ``_component_``; a top-level ``temperature`` overrides the loss's own."""
    if temperature is not None:
        if temperature <= 0:
            raise ConfigError(f"temperature={temperature} must be > 0")
        return instantiate(kd_loss_cfg, temperature=temperature)
    return instantiate(kd_loss_cfg)


def build_data(settings: Any, tokenizer: Any, *, rank: int = 0, world_size: int = 1) -> TrainData:
    """Datasets + validation split + resumable loaders from a recipe's settings (see :class:`FinetuneSettings`)."""
    train_ds, val_ds = build_datasets(
        settings.dataset,
        tokenizer,
        val_dataset_cfg=settings.val_dataset,
        val_split_ratio=settings.val_split_ratio,
        seed=settings.seed,
    )
    return build_train_data(
        train_ds,
        val_ds,
        pad_id=tokenizer.pad_id,
        batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        epochs=settings.epochs,
        max_steps_per_epoch=settings.max_steps_per_epoch,
        max_steps=settings.max_steps,
        shuffle=settings.shuffle,
        seed=settings.seed,
        num_workers=settings.num_workers,
        rank=rank,
        world_size=world_size,
    )


# --------------------------------------------------------------------------------------------------- loop pieces
def due(step: int, every: int | None) -> bool:
    """Whether something configured ``every`` N steps is due after optimizer step ``step`` (1-based)."""
    return bool(every) and step % every == 0  # type: ignore[operator]


@dataclass
class StepResult:
    """What one optimizer step measured.

    Attributes:
        loss: optimised loss per valid token.
        class_loss: cross-entropy per valid token.
        kd_loss: KD loss per valid token (nan without KD).
        num_tokens: valid tokens of the step.
        grad_norm: total gradient L2 norm before clipping.
        lr: learning rate used by this step.
    """

    loss: float
    class_loss: float
    kd_loss: float
    num_tokens: int
    grad_norm: float
    lr: float


def optimizer_step(
    accumulator: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    clip_grad_norm: float | None,
    step: int,
    last_checkpoint: str | None = None,
) -> StepResult:
    """Finish a step: normalise gradients by the step's tokens, stop on NaN/inf, clip, update, advance the schedule.

    The NaN/inf check runs *before* the update, so the weights (and the last resume checkpoint on disk) stay those of
    the last good step.

    Args:
        accumulator: the :class:`kdtune.training.StepAccumulator` holding this step's micro-batches.
        model: the trained model.
        optimizer: its optimizer.
        scheduler: LR schedule or None.
        clip_grad_norm: max gradient norm, or None to only measure it.
        step: this step's number (1-based), named in the NaN error.
        last_checkpoint: the last resume checkpoint written, named in the NaN error.

    Returns:
        The :class:`StepResult`.
    """
    from kdtune.training import check_finite
    from kdtune.training import clip_grad_norm as clip

    metrics = accumulator.finish()
    check_finite(metrics.loss, step, "loss", last_checkpoint)
    grad_norm = float(clip(model, clip_grad_norm))
    check_finite(grad_norm, step, "grad_norm", last_checkpoint)
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepResult(metrics.loss, metrics.class_loss, metrics.kd_loss, metrics.num_tokens, grad_norm, lr)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    objective: Any,
    loader: DataLoader,
    device: torch.device,
    kd_ratio: float | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Validation losses per valid token over ``loader`` (at most ``max_batches`` batches).

    Args:
        model: the trained model (put in eval mode during the pass, restored after).
        objective: ``objective(batch) -> ObjectiveOutput`` (the recipe's own loss function).
        loader: validation DataLoader.
        device: where batches go.
        kd_ratio: mixing weight of the KD term in ``val_loss``; None = no KD term (fine-tuning).
        max_batches: cap on batches; None = all.

    Returns:
        ``{"val_loss", "val_class_loss", "val_kd_loss", "val_tokens"}`` (``val_kd_loss`` only with a kd_ratio).
    """
    was_training = model.training
    model.eval()
    class_sum = kd_sum = 0.0
    tokens = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out = objective(to_device(batch, device))
        class_sum += float(out.class_loss_sum)
        kd_sum += float(out.kd_loss_sum)
        tokens += int(out.num_tokens)
    model.train(was_training)
    n = max(tokens, 1)
    result = {"val_class_loss": class_sum / n, "val_tokens": float(tokens)}
    if kd_ratio is None:
        result["val_loss"] = result["val_class_loss"]
    else:
        result["val_kd_loss"] = kd_sum / n
        result["val_loss"] = (1 - kd_ratio) * result["val_class_loss"] + kd_ratio * result["val_kd_loss"]
    return result


def save_final(runtime: Runtime, checkpointer: Any, model: nn.Module, *, adapter_only: bool = False) -> list[Path]:
    """Write the final outputs: ``final/`` (HF dir, LoRA merged) and, for a LoRA model, ``final_adapter/`` (PEFT).

    Args:
        runtime: output layout.
        checkpointer: the model's ``HFCheckpointer`` (copies config/tokenizer files from its checkpoint_dir).
        model: the trained model.
        adapter_only: LoRA only: write only the adapter.

    Returns:
        The directories written.
    """
    written = []
    lora = is_lora_model(model)
    if adapter_only and not lora:
        raise ConfigError("save_adapter_weights_only=true needs a LoRA model (a lora_* builder); set it to false")
    if lora:
        checkpointer.save_adapter(model, runtime.final_adapter_dir)
        written.append(runtime.final_adapter_dir)
    if not adapter_only:
        checkpointer.save_hf(model, runtime.final_dir)
        written.append(runtime.final_dir)
    for d in written:
        log.info("saved %s", d)
    return written


# ------------------------------------------------------------------------------------------------ metrics/progress
@dataclass
class RunSummary:
    """What a recipe run measured, returned by its ``train()`` (tests and notebooks read it).

    Attributes:
        steps: per optimizer step: ``step``, ``epoch``, ``loss``, ``class_loss``, ``kd_loss``, ``lr``, ``grad_norm``,
            ``num_tokens``, ``tokens_per_second`` (+ ``peak_memory_gib``).
        evals: per validation pass: ``step`` + the :func:`evaluate` metrics.
        output_dir: the run's output directory.
    """

    steps: list[dict[str, float]]
    evals: list[dict[str, float]]
    output_dir: Path


class Reporter:
    """Progress bar + metric logger of a recipe: logs every ``log_every_n_steps`` and every evaluation.

    Args:
        runtime: device and output layout.
        settings: the recipe settings (``metric_logger``, ``log_every_n_steps``, ``log_peak_memory_stats``,
            ``progress_bar``).
        data: the training data (total steps, resume position).
        enabled: False on non-zero ranks (no bar, no logging).
    """

    def __init__(self, runtime: Runtime, settings: Any, data: TrainData, *, enabled: bool = True) -> None:
        from kdtune.training import ProgressBar

        self.runtime, self.enabled = runtime, enabled
        self.log_every = max(int(settings.log_every_n_steps), 1)
        self.log_memory = bool(settings.log_peak_memory_stats)
        self.total = data.total_steps
        self.logger = build_metric_logger(settings.metric_logger, runtime) if enabled else None
        if enabled:
            capped = " (capped by max_steps)" if data.total_steps < data.epochs * data.steps_per_epoch else ""
            plan = (
                f"training {data.total_steps} optimizer steps{capped}: {data.epochs} epoch(s) x {data.steps_per_epoch} "
                f"steps, {data.batch_size} sequences x {data.grad_accum} accumulation per step"
            )
            if data.position.global_step:
                plan += f"; resuming after step {data.position.global_step}"
            print(f"{plan}; outputs in {runtime.output_dir}", flush=True)
        self.bar = ProgressBar(
            data.total_steps, data.position.global_step, disable=not (enabled and settings.progress_bar)
        )
        self.steps: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.last_eval_step: int | None = None

    def step(self, pos: DataPosition, result: StepResult) -> dict[str, float]:
        """Record one optimizer step; returns its metrics."""
        tokens_per_second = self.bar.update(result.num_tokens, result.loss, result.kd_loss, result.lr)
        m: dict[str, float] = {"step": pos.global_step, "epoch": pos.epoch, "loss": result.loss}
        if not math.isnan(result.kd_loss):
            m["class_loss"], m["kd_loss"] = result.class_loss, result.kd_loss
        m.update(
            lr=result.lr, grad_norm=result.grad_norm, num_tokens=result.num_tokens, tokens_per_second=tokens_per_second
        )
        if self.log_memory:
            from kdtune.training import peak_memory

            m.update(peak_memory(self.runtime.device))
        self.steps.append(m)
        if self.enabled and (pos.global_step % self.log_every == 0 or pos.global_step == self.total):
            self.logger.log_dict({k: v for k, v in m.items() if k != "step"}, step=pos.global_step)
        return m

    def eval(self, pos: DataPosition, metrics: dict[str, float]) -> None:
        """Record one validation pass."""
        from tqdm.auto import tqdm

        self.evals.append({"step": pos.global_step, **metrics})
        self.last_eval_step = pos.global_step
        if self.enabled:
            self.logger.log_dict(metrics, step=pos.global_step)
            tqdm.write(f"step {pos.global_step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self.bar.reset_timer()  # evaluation time is not training throughput

    def close(self) -> RunSummary:
        """Close the bar and the logger; return the :class:`RunSummary`."""
        self.bar.close()
        if self.logger is not None:
            self.logger.close()
        return RunSummary(self.steps, self.evals, self.runtime.output_dir)


# ------------------------------------------------------------------------------------------------ resume checkpoints
class ResumeCheckpoints:
    """The run's resume checkpoints in ``output_dir/checkpoints/step_N`` (atomic, the newest ``keep_last`` kept).

    Each holds the model (only the adapters of a LoRA model: the base comes from the checkpointer again), the
    optimizer, the LR schedule, the RNG states, the data position and the config — enough to continue exactly.

    Args:
        runtime: output layout.
        settings: recipe settings (``keep_last_n_checkpoints``).
        model: the trained model.
        optimizer: its optimizer.
        scheduler: its LR schedule or None.
        data: the training data (its ``position`` is saved and restored).
        cfg: the run's config (saved with each checkpoint).
    """

    def __init__(
        self,
        runtime: Runtime,
        settings: Any,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        data: TrainData,
        cfg: DictConfig | None = None,
    ) -> None:
        from kdtune.training.resume import ResumeState

        self.state = ResumeState(runtime.output_dir, keep_last=settings.keep_last_n_checkpoints, subdir="checkpoints")
        self.model, self.optimizer, self.scheduler, self.data, self.cfg = model, optimizer, scheduler, data, cfg
        self.trainable_only = is_lora_model(model)
        self.last: str | None = None

    def save(self, pos: DataPosition) -> Path:
        """Write the checkpoint of the step that ended at ``pos``."""
        nxt = pos if not self.data.is_epoch_end(pos) else DataPosition(pos.epoch + 1, 0, pos.global_step)
        path = self.state.save(
            pos.global_step,
            epoch=nxt.epoch,
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            data_state=nxt.state_dict(),
            config=self.cfg,
            trainable_only=self.trainable_only,
        )
        self.last = str(path)
        log.info("saved resume checkpoint %s", path)
        return path

    def resume(self) -> DataPosition:
        """Restore the newest checkpoint into the model, optimizer, schedule, RNG and data position."""
        latest = self.state.find_latest()
        if latest is not None and self.cfg is not None and (latest / "config.yaml").is_file():
            check_same_data_order(self.cfg, OmegaConf.load(latest / "config.yaml"), latest)
        loaded = self.state.load(model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler)
        self.data.position = DataPosition.from_state_dict(loaded.data_state)
        self.last = str(loaded.path)
        log.info("resumed from %s (step %d)", loaded.path, loaded.step)
        return self.data.position


#: settings that define the data order: a resumed run must keep them, or its saved data position means other examples
DATA_ORDER_KEYS = ("seed", "shuffle", "batch_size", "gradient_accumulation_steps", "max_steps_per_epoch")


def check_same_data_order(cfg: DictConfig, saved: DictConfig, where: Path) -> None:
    """Raise ConfigError when a resumed run changes a setting that defines the data order (see ``DATA_ORDER_KEYS``)."""
    for key in DATA_ORDER_KEYS:
        now, before = cfg.get(key), saved.get(key)
        if now != before:
            raise ConfigError(
                f"resume_from_checkpoint: {key} is {now!r} but the checkpoint {where} was trained with {before!r}; "
                f"resume with {key}={before} (or start a new run in another output_dir)"
            )
