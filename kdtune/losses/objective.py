"""The distillation objective computed from final hidden states, one chunk of positions at a time.

Neither the student's nor the teacher's full ``[B, T, V]`` logits are ever materialised: positions with a valid
(shifted) label are gathered, split into ``num_output_chunks`` chunks, and for each chunk the logits are produced by
``model.output_logits``, upcast to fp32, turned into the cross-entropy and KD sums, and dropped; in backward each
chunk's logits are recomputed (activation checkpointing per chunk).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdtune.losses.functional import upcast
from kdtune.losses.kd import KDLoss

__all__ = ["ObjectiveOutput", "cross_entropy_objective", "distillation_objective"]


class ObjectiveOutput(NamedTuple):
    """Per-micro-batch sums; divide by the step's total valid-token count (see ``kdtune.training.StepAccumulator``).

    Attributes:
        class_loss_sum: scalar, cross-entropy of the student summed over valid tokens.
        kd_loss_sum: scalar, KD divergence (× T² if the loss scales) summed over valid tokens; 0 without a teacher.
        num_tokens: int64 scalar, number of valid (shifted) label positions.
    """

    class_loss_sum: Tensor
    kd_loss_sum: Tensor
    num_tokens: Tensor

    def mixed_sum(self, kd_ratio: float) -> Tensor:
        """``(1 − kd_ratio) · class_loss_sum + kd_ratio · kd_loss_sum``."""
        return (1.0 - kd_ratio) * self.class_loss_sum + kd_ratio * self.kd_loss_sum


def distillation_objective(
    student_hidden: Tensor,
    teacher_hidden: Tensor | None,
    student: nn.Module,
    teacher: nn.Module | None,
    labels: Tensor,
    kd_loss: KDLoss | None,
    kd_ratio: float = 0.5,
    num_output_chunks: int = 8,
    *,
    ignore_index: int | None = None,
    checkpoint_chunks: bool = True,
) -> ObjectiveOutput:
    """Cross-entropy and KD sums of one micro-batch from final hidden states.

    Args:
        student_hidden: ``[B, T, D]`` final (normed) hidden states of the student (``return_hidden=True``).
        teacher_hidden: ``[B, T, Dt]`` teacher hidden states (computed under ``no_grad``), or None when no KD term is
            wanted (then the teacher is not evaluated and ``kd_loss_sum`` is 0; this also serves plain fine-tuning).
        student: module with ``output_logits(hidden [..., D]) -> [..., V_s]``.
        teacher: module with ``output_logits(hidden [..., Dt]) -> [..., V_t]``; None when ``teacher_hidden`` is None.
        labels: ``[B, T]`` aligned with the tokens (not shifted); the objective compares position t with label t + 1.
        kd_loss: a :class:`~kdtune.losses.KDLoss` (its temperature / T² / ignore_index are used; its own chunking is
            not: this function chunks). None when there is no teacher.
        kd_ratio: mixing weight. With ``kd_ratio == 0`` the KD sum is still computed for logging (so ablations over
            ``kd_ratio`` log comparable ``kd_loss`` curves) but carries no gradient.
        num_output_chunks: number of chunks the valid positions are split into.
        ignore_index: label value to skip; defaults to ``kd_loss.ignore_index`` or -100.
        checkpoint_chunks: recompute each chunk's logits in backward instead of keeping them (on by default).

    Returns:
        :class:`ObjectiveOutput` of scalar sums and the valid-token count. The KD term uses the first
        ``min(V_s, V_t)`` logits of both models (a teacher padded to a larger vocab is sliced to the student's).
    """
    if ignore_index is None:
        ignore_index = kd_loss.ignore_index if kd_loss is not None else -100
    if num_output_chunks < 1:
        raise ValueError(f"num_output_chunks must be >= 1, got {num_output_chunks}")
    use_teacher = teacher_hidden is not None
    kd_grad = kd_ratio != 0.0
    if use_teacher and (teacher is None or kd_loss is None):
        raise ValueError("teacher_hidden was given but teacher or kd_loss is None")

    targets = labels[:, 1:]  # [B, T-1]
    mask = targets != ignore_index  # [B, T-1]
    num_tokens = mask.sum()
    h_s = student_hidden[:, :-1][mask]  # [N, D]
    tgt = targets[mask]  # [N]
    h_t = teacher_hidden[:, :-1][mask].detach() if use_teacher else None  # [N, Dt]

    n = tgt.shape[0]
    # Zero sums that stay attached to the student's graph, so backward works even on an all-masked batch.
    zero = student_hidden[..., :0].sum().float()
    if n == 0:
        return ObjectiveOutput(zero, zero.clone(), num_tokens)

    def chunk_sums(hs: Tensor, ht: Tensor | None, y: Tensor) -> tuple[Tensor, Tensor]:
        s_logits = upcast(student.output_logits(hs))  # [n_i, V_s] fp32
        ce = F.cross_entropy(s_logits, y, reduction="sum")
        if ht is None:
            return ce, torch.zeros((), dtype=ce.dtype, device=ce.device)
        with torch.no_grad():
            t_logits = upcast(teacher.output_logits(ht))  # [n_i, V_t] fp32
        vocab = min(s_logits.shape[-1], t_logits.shape[-1])
        s_kd = s_logits[..., :vocab] if kd_grad else s_logits[..., :vocab].detach()
        kd = kd_loss.loss_sum(s_kd, t_logits[..., :vocab])
        return ce, kd

    recompute = checkpoint_chunks and torch.is_grad_enabled() and h_s.requires_grad
    ce_total, kd_total = zero, zero.clone()
    k = min(num_output_chunks, n)
    for i in range(k):
        start, end = (i * n) // k, ((i + 1) * n) // k
        hs, y = h_s[start:end], tgt[start:end]
        ht = h_t[start:end] if h_t is not None else None
        if recompute:
            ce, kd = checkpoint(chunk_sums, hs, ht, y, use_reentrant=False)
        else:
            ce, kd = chunk_sums(hs, ht, y)
        ce_total = ce_total + ce
        kd_total = kd_total + kd
    return ObjectiveOutput(ce_total, kd_total, num_tokens)


def cross_entropy_objective(
    hidden: Tensor,
    model: nn.Module,
    labels: Tensor,
    num_output_chunks: int = 8,
    *,
    ignore_index: int = -100,
    checkpoint_chunks: bool = True,
) -> ObjectiveOutput:
    """Fine-tuning objective: the student-only case of :func:`distillation_objective` (``kd_loss_sum`` is 0).

    Args:
        hidden: ``[B, T, D]`` final hidden states (``return_hidden=True``).
        model: module with ``output_logits``.
        labels: ``[B, T]`` aligned with the tokens (the objective shifts).
        num_output_chunks: chunks of valid positions processed one at a time.
        ignore_index: label value to skip.
        checkpoint_chunks: recompute each chunk's logits in backward.
    """
    return distillation_objective(
        hidden,
        None,
        model,
        None,
        labels,
        None,
        0.0,
        num_output_chunks,
        ignore_index=ignore_index,
        checkpoint_chunks=checkpoint_chunks,
    )
