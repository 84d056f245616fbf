"""Validation: the objective's sums over a validation loader, turned into per-token losses, and the teacher check.

The numbers are the training objective's own (cross-entropy, divergence, and their mix by the objective's rule),
so a validation loss is comparable with the training loss of the same run. In a distributed run every rank passes
its share of the data and an ``all_reduce`` that sums over ranks; the division happens after the reduction.

:func:`check_teacher` runs before KD training: the teacher's and the student's cross-entropy and next-token accuracy
on the transfer set, with a warning when the teacher is not better there (the wrong teacher dir, an un-fine-tuned
teacher: KD would then pull the student towards a worse model).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader

from kdtune.data.collate import model_inputs
from kdtune.losses import DistillationObjective, LiveTeacher, TeacherSource
from kdtune.losses.fused import chunk_slices
from kdtune.losses.objective import check_batch_kind
from kdtune.training.data import IGNORE_INDEX, ResumableSampler, TrainData, to_device
from kdtune.training.runtime import is_rank_zero

__all__ = ["TEACHER_CHECK_TRAIN_BATCHES", "check_teacher", "evaluate", "loss_and_accuracy"]

#: training batches the teacher check reads when the run has no validation split
TEACHER_CHECK_TRAIN_BATCHES = 4


@torch.no_grad()
def evaluate(
    objective: DistillationObjective,
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    max_batches: int | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    *,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, float]:
    """Validation losses per trained token over ``loader`` (at most ``max_batches`` batches).

    Args:
        objective: the run's objective (called as ``objective(model, batch)``).
        model: the trained model (put in eval mode during the pass, restored after).
        loader: validation batches.
        device: where batches go.
        max_batches: cap on batches; None = all.
        all_reduce: sums a float64 tensor over data-parallel ranks (distributed runs); None on one device.
        autocast: the context the objective runs in (the run's ``Precision.autocast``, as in training); None = none.

    Returns:
        ``{"val_loss", "val_class_loss", "val_tokens"}`` plus ``"val_kd_loss"`` when the objective has a teacher.
    """
    was_training = model.training
    model.eval()
    class_sum = kd_sum = 0.0
    tokens = 0
    has_kd = False
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with (autocast or nullcontext)():
            out = objective(model, to_device(batch, device))
        class_sum += float(out.class_loss_sum)
        if out.kd_loss_sum is not None:
            has_kd = True
            kd_sum += float(out.kd_loss_sum)
        tokens += int(out.num_tokens)
    model.train(was_training)
    if all_reduce is not None:
        class_sum, kd_sum, tokens = all_reduce(torch.tensor([class_sum, kd_sum, float(tokens)], dtype=torch.float64))
        class_sum, kd_sum, tokens = float(class_sum), float(kd_sum), float(tokens)
    n = max(tokens, 1)
    result = {"val_class_loss": class_sum / n, "val_tokens": float(tokens)}
    if has_kd or objective.teacher is not None:
        result["val_kd_loss"] = kd_sum / n
        result["val_loss"] = objective.mix(result["val_class_loss"], result["val_kd_loss"])
    else:
        result["val_loss"] = result["val_class_loss"]
    return result


@torch.no_grad()
def loss_and_accuracy(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    num_output_chunks: int | None = None,
) -> Tensor:
    """Summed next-token cross-entropy, correct argmax predictions and trained tokens of ``model`` over ``batches``.

    Position t is scored against label t + 1 where that label is trained (not ``-100``), as in training; the output
    projection runs over ``num_output_chunks`` chunks of those positions (no ``[B, T, V]`` logits).

    Returns:
        float64 ``[3]``: ``(cross-entropy sum, correct predictions, tokens)`` (sums, so ranks can add them).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        batch = to_device(batch, device)
        check_batch_kind(model, batch)
        targets = batch["labels"][:, 1:]  # [B, T-1]
        mask = targets != IGNORE_INDEX
        hidden = model(batch["tokens"], return_hidden=True, **model_inputs(batch))[:, :-1][mask]  # [N, D]
        tgt = targets[mask]  # [N]
        n = tgt.shape[0]
        for rows in chunk_slices(n, getattr(model, "vocab_size", 0), num_output_chunks=num_output_chunks):
            logits = model.output_logits(hidden[rows]).float()  # [n_i, V]
            sums[0] += float(F.cross_entropy(logits, tgt[rows], reduction="sum"))
            sums[1] += float((logits.argmax(-1) == tgt[rows]).sum())
        sums[2] += n
    model.train(was_training)
    for module in model.modules():  # a sharded (FSDP2) model: free what the forward gathered, as before it
        if isinstance(module, FSDPModule):
            module.reshard()
    return sums


def _first_training_batches(data: TrainData) -> DataLoader:
    """The first training examples in file order (this rank's share), batched like training; no state is touched."""
    sampler = ResumableSampler(
        len(data.loader.dataset), shuffle=False, rank=data.sampler.rank, world_size=data.sampler.world_size
    )
    return DataLoader(
        data.loader.dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        collate_fn=data.loader.collate_fn,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),  # the global RNG is not drawn from
    )


def check_teacher(
    settings: Any,
    student: nn.Module,
    teacher: TeacherSource,
    data: TrainData,
    device: torch.device,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """The teacher check of a KD run: teacher vs student on the transfer set before training; warns when the teacher
    is not better (lower cross-entropy) there.

    Reads at most ``max_eval_batches`` batches of the validation split, or the first
    :data:`TEACHER_CHECK_TRAIN_BATCHES` training batches when there is none; prints one line (rank 0) and, when the
    teacher's loss is not below the student's, a ``kdtune: warning`` line on stderr. Skipped (empty result) when
    ``teacher_check`` is false or the teacher is a cache rather than a live model. Neither model's mode or weights,
    the data order nor the global RNG change.

    Args:
        settings: the KD settings (``teacher_check``, ``max_eval_batches``, ``num_output_chunks``).
        student: the student.
        teacher: the run's teacher source (a :class:`~kdtune.losses.LiveTeacher` is checked).
        data: the training data (its validation loader, or its training dataset).
        device: where batches go.
        all_reduce: sums a float64 tensor over data-parallel ranks (distributed runs); None on one device.

    Returns:
        ``{"teacher_check/teacher_loss", "teacher_check/teacher_accuracy", "teacher_check/student_loss",
        "teacher_check/student_accuracy", "teacher_check/tokens"}``, or ``{}`` when skipped.
    """
    if not settings.teacher_check or not isinstance(teacher, LiveTeacher):
        return {}
    if data.val_loader is not None:
        loader, where, cap = data.val_loader, "validation", settings.max_eval_batches
    else:
        loader, where, cap = _first_training_batches(data), "training", TEACHER_CHECK_TRAIN_BATCHES
    chunks = settings.num_output_chunks
    teacher_sums = loss_and_accuracy(teacher.model, islice(loader, cap), device, chunks)
    student_sums = loss_and_accuracy(student, islice(loader, cap), device, chunks)
    sums = torch.cat([teacher_sums, student_sums])
    if all_reduce is not None:
        sums = all_reduce(sums)
    t_ce, t_ok, tokens, s_ce, s_ok, _ = (float(x) for x in sums)
    n = max(tokens, 1.0)
    result = {
        "teacher_check/teacher_loss": t_ce / n,
        "teacher_check/teacher_accuracy": t_ok / n,
        "teacher_check/student_loss": s_ce / n,
        "teacher_check/student_accuracy": s_ok / n,
        "teacher_check/tokens": tokens,
    }
    if is_rank_zero():
        print(
            f"teacher check on {int(tokens)} {where} tokens: teacher loss {t_ce / n:.4f}, accuracy {t_ok / n:.2%} | "
            f"student loss {s_ce / n:.4f}, accuracy {s_ok / n:.2%}",
            flush=True,
        )
        if tokens and not t_ce < s_ce:
            print(
                f"kdtune: warning: the teacher is not better than the student on the {where} data (loss "
                f"{t_ce / n:.4f} vs {s_ce / n:.4f}): distilling it will not help; check teacher_checkpointer (the "
                "wrong checkpoint dir, or a teacher not fine-tuned for this task?) or skip this check: "
                "+teacher_check=false",
                file=sys.stderr,
                flush=True,
            )
    return result
