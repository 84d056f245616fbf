"""The training data of a recipe: datasets (+ validation split), a resumable data order, and the step arithmetic.

:class:`TrainData` yields each optimizer step's micro-batches from a :class:`DataPosition`, so a resumed run sees
exactly the examples an uninterrupted one would (the order depends only on ``seed`` + epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from kdtune.config import instantiate
from kdtune.data import padded_collate
from kdtune.data.packing import PackedDataset
from kdtune.errors import ConfigError

__all__ = [
    "IGNORE_INDEX",
    "LENGTH_GROUP_BATCHES",
    "DataPosition",
    "ResumableSampler",
    "TrainData",
    "build_data",
    "build_datasets",
    "build_train_data",
    "count_valid_tokens",
    "example_lengths",
    "to_device",
]

IGNORE_INDEX = -100

#: ``group_by_length``: micro-batches (of every rank) per length group; sorted within a group, random between
#: groups (the mega-batch of Hugging Face's ``group_by_length``, 50 batches)
LENGTH_GROUP_BATCHES = 50


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

    With ``lengths`` (``group_by_length``) the permutation is cut into groups of :data:`LENGTH_GROUP_BATCHES`
    micro-batches of every rank, each group sorted longest first: consecutive examples, hence a micro-batch and the
    micro-batches of all ranks at one step, have similar lengths and little padding, while which examples meet in a
    group still changes with every epoch.

    Args:
        num_samples: length of the dataset.
        shuffle: permute each epoch.
        seed: base seed of the permutation.
        rank: this process's rank.
        world_size: number of data-parallel processes.
        lengths: token count of every example, to group by length; None = no grouping.
        batch_size: micro-batch size per rank (sizes the length groups).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.lengths = None if lengths is None else list(lengths)
        self.group_size = LENGTH_GROUP_BATCHES * batch_size * world_size
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
        order = order[: self.num_samples // self.world_size * self.world_size]
        if self.lengths is not None:
            lengths, size = self.lengths, self.group_size
            # stable: equal lengths keep their (seeded) order
            order = [
                i
                for g in range(0, len(order), size)
                for i in sorted(order[g : g + size], key=lengths.__getitem__, reverse=True)
            ]
        return order[self.rank :: self.world_size]

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


def example_lengths(dataset: Dataset) -> list[int]:
    """Token count of every example of a training dataset (a list of datasets: concatenated), for ``group_by_length``.

    Raises:
        ConfigError: the dataset cannot report its lengths (packed rows, lazily tokenized rows, a custom dataset
            without ``lengths()``), saying what to change.
    """
    if isinstance(dataset, ConcatDataset):
        return [n for d in dataset.datasets for n in example_lengths(d)]
    if isinstance(dataset, PackedDataset):
        raise ConfigError(
            "group_by_length=true with a packed dataset: packed rows are all max_seq_len long and train no padding "
            "already; set group_by_length=false (or dataset.packed=false)"
        )
    if getattr(dataset, "lazy", False):
        raise ConfigError(
            f"group_by_length=true needs every example's length up front, but {getattr(dataset, 'source', 'the dataset')}"
            " is tokenized lazily (on access); set dataset.lazy=false (tokenize up front) or group_by_length=false"
        )
    lengths = getattr(dataset, "lengths", None)
    if not callable(lengths):
        raise ConfigError(
            f"group_by_length=true: {type(dataset).__name__} does not report example lengths (a `lengths()` method "
            "returning the token count of every example); use a kdtune dataset builder or set group_by_length=false"
        )
    return [int(n) for n in lengths()]


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
    group_by_length: bool = False,
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
        group_by_length: batch examples of similar length together (see :class:`ResumableSampler`).

    Returns:
        The :class:`TrainData`.

    The counts (``batch_size``, ``epochs``, ...) are the recipe settings' values, checked when they were read.
    """
    if collate_fn is None:
        collate_fn = partial(padded_collate, pad_id=pad_id, ignore_index=IGNORE_INDEX)
    lengths = example_lengths(train_ds) if group_by_length else None
    sampler = ResumableSampler(
        len(train_ds), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, lengths=lengths,
        batch_size=batch_size,
    )  # fmt: skip
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
        group_by_length=settings.group_by_length,
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move every tensor of a collated batch to ``device``."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def count_valid_tokens(batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """Valid (trained) tokens of the micro-batches of one step: shifted labels that are not ``-100``."""
    return int(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum().item() for b in batches))
