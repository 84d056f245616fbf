"""The training objective: one component owns the whole per-token computation of fine-tuning and distillation.

:class:`DistillationObjective` is built from the divergence (``kd_loss``), ``kd_ratio``, ``temperature``, the
chunking and the teacher source, and is called once per micro-batch with the student and the batch::

    out = objective(student, batch)       # ObjectiveOutput(loss_sum, class_loss_sum, kd_loss_sum, num_tokens)
    out.loss_sum.backward()               # = (1 − kd_ratio) · CE_sum + kd_ratio · KD_sum, summed over trained tokens

Everything else (accumulation, evaluation, distributed reductions) only adds and divides its sums; none of it knows
what ``kd_ratio`` is. Without a teacher it is the fine-tuning objective (cross-entropy only).

How a micro-batch is computed:

1. the trained positions are ``labels[:, 1:] != ignore_index`` (position t is compared with label t + 1), taken in
   row-major order; the teacher source is asked for its state on those positions (a live teacher runs its body
   without gradients *before* the student, so the RNG stream the student's dropout sees is the same as without KD);
2. the student's final hidden states at those positions are split into ``num_output_chunks`` chunks; per chunk the
   student's logits (fp32) give the cross-entropy, and both models' log-probabilities at temperature T over a shared
   support give the divergence (× T² when ``scale_by_temperature_squared``);
3. each chunk's logits are recomputed in backward (activation checkpointing), so no ``[B, T, V]`` tensor is held.

A teacher source (:class:`LiveTeacher` here; a cached teacher plugs in the same way) has two methods:
``prepare(batch, mask) -> tuple of [N, ...] tensors`` (its per-position state) and
``log_probs(state_chunk, student_logits [n, V], temperature) -> (student_logp [n, K], teacher_logp [n, K])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdtune.data.collate import model_inputs
from kdtune.errors import ConfigError
from kdtune.losses.divergences import Divergence
from kdtune.losses.functional import check_fraction, check_temperature, log_probs, upcast
from kdtune.losses.on_policy import OnPolicy

__all__ = ["DistillationObjective", "LiveTeacher", "ObjectiveOutput", "TeacherSource"]


class ObjectiveOutput(NamedTuple):
    """One micro-batch's sums over its trained tokens; divide by the step's token count (all micro-batches, ranks).

    Attributes:
        loss_sum: scalar, the optimised (mixed) loss summed over trained tokens; carries the gradient.
        class_loss_sum: scalar, the student's cross-entropy summed over trained tokens.
        kd_loss_sum: scalar, the divergence (× T² if scaled) summed over trained tokens; None without a teacher.
        num_tokens: int64 scalar, the number of trained (shifted-label) positions.
    """

    loss_sum: Tensor
    class_loss_sum: Tensor
    kd_loss_sum: Tensor | None
    num_tokens: Tensor


@runtime_checkable
class TeacherSource(Protocol):
    """Where the teacher's distribution comes from (a live model, a cache of its top-k logits, ...)."""

    def prepare(self, batch: dict[str, Any], mask: Tensor) -> tuple[Tensor, ...]:
        """The teacher's per-position state for the batch's trained positions ``mask`` [B, T-1] (row-major)."""
        ...

    def log_probs(self, state: Sequence[Tensor], student_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """``(student_logp [n, K], teacher_logp [n, K])`` over a shared support for one chunk of positions."""
        ...


class LiveTeacher:
    """A frozen teacher model run alongside the student.

    Its body runs once per micro-batch under ``no_grad``; its output projection runs per chunk of positions. A
    teacher whose vocabulary is only padded larger than the student's is compared on the student's first V rows.

    Args:
        model: the teacher, with ``forward(tokens, return_hidden=True, ...)`` and ``output_logits(hidden)``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def prepare(self, batch: dict[str, Any], mask: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            hidden = self.model(batch["tokens"], return_hidden=True, **model_inputs(batch))  # [B, T, Dt]
        return (hidden[:, :-1][mask].detach(),)  # [N, Dt]

    def log_probs(self, state: Sequence[Tensor], student_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        (hidden,) = state
        with torch.no_grad():
            teacher_logits = upcast(self.model.output_logits(hidden))  # [n, Vt] fp32
        vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
        return log_probs(student_logits[..., :vocab], temperature), log_probs(teacher_logits[..., :vocab], temperature)


class DistillationObjective:
    """``(1 − kd_ratio) · cross-entropy + kd_ratio · T² · divergence``, summed over the trained tokens of a batch.

    Args:
        kd_loss: the divergence (a :class:`kdtune.losses.Divergence`, e.g. ``ForwardKLLoss``); None without teacher.
        teacher: the teacher source: a :class:`TeacherSource`, or a model (wrapped in :class:`LiveTeacher`); None =
            fine-tuning (cross-entropy only; ``kd_ratio`` is then ignored).
        kd_ratio: weight of the KD term in [0, 1]. At 0 the divergence is still computed for logging (so ablations
            log comparable ``kd_loss`` curves) but carries no gradient; at 0 and 1 the unused term is dropped, not
            multiplied by 0, so a non-finite unused term cannot leak.
        temperature: T > 0; both distributions are ``softmax(logits / T)``.
        scale_by_temperature_squared: multiply the divergence by T² (Hinton et al. 2015) so its gradient does not
            shrink as 1/T².
        num_output_chunks: the trained positions are processed in this many chunks (memory at large vocabularies).
        ignore_index: label value of positions that are not trained.
        checkpoint_chunks: recompute each chunk's logits in backward instead of keeping them.
        on_policy: an :class:`~kdtune.losses.on_policy.OnPolicy` sampler: training micro-batches (student in train
            mode, gradients enabled) get their completions from the student with probability ``lmbda`` (or from the
            teacher with ``seq_kd``) before they are scored; needs a live teacher. None = the dataset's completions.
    """

    def __init__(
        self,
        kd_loss: Divergence | None = None,
        *,
        teacher: TeacherSource | nn.Module | None = None,
        kd_ratio: float = 0.5,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = True,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        checkpoint_chunks: bool = True,
        on_policy: OnPolicy | None = None,
    ) -> None:
        if isinstance(teacher, nn.Module):
            teacher = LiveTeacher(teacher)
        if teacher is not None and not isinstance(kd_loss, Divergence):
            raise ConfigError(
                f"kd_loss: {type(kd_loss).__name__} is not a divergence; use a kdtune.losses.Divergence subclass "
                "(ForwardKLLoss, ReverseKLLoss, JSDLoss, ...)"
            )
        if isinstance(num_output_chunks, bool) or not isinstance(num_output_chunks, int) or num_output_chunks < 1:
            raise ConfigError(f"num_output_chunks={num_output_chunks!r} is invalid: it must be an integer >= 1")
        self.kd_loss = kd_loss
        self.teacher = teacher
        self.kd_ratio = check_fraction("kd_ratio", kd_ratio) if teacher is not None else 0.0
        self.temperature = check_temperature(temperature)
        self.scale_by_temperature_squared = bool(scale_by_temperature_squared)
        self.num_output_chunks = num_output_chunks
        self.ignore_index = int(ignore_index)
        self.checkpoint_chunks = bool(checkpoint_chunks)
        if on_policy is not None and on_policy.active and not isinstance(teacher, LiveTeacher):
            source = "no teacher" if teacher is None else f"a {type(teacher).__name__} (teacher_logits)"
            raise ConfigError(
                f"on_policy: sampled completions must be scored by a live teacher, but the run has {source}; use "
                "teacher_model + teacher_checkpointer, or set on_policy.lmbda=0 and on_policy.seq_kd=false"
            )
        self.on_policy = on_policy if on_policy is not None and on_policy.active else None

    @property
    def kd_scale(self) -> float:
        """The factor on the summed divergence: T² when ``scale_by_temperature_squared``, else 1."""
        return self.temperature**2 if self.scale_by_temperature_squared else 1.0

    def mix(self, class_loss: Any, kd_loss: Any) -> Any:
        """The mixing rule, on sums or per-token means alike (tensors or floats) over the same tokens."""
        if self.teacher is None or self.kd_ratio == 0.0:
            return class_loss
        if self.kd_ratio == 1.0:
            return kd_loss
        return (1.0 - self.kd_ratio) * class_loss + self.kd_ratio * kd_loss

    def __call__(self, student: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        """The objective's sums for one collated micro-batch (``tokens``, ``labels`` [B, T], packed fields)."""
        if self.on_policy is not None and student.training and torch.is_grad_enabled():
            batch = self.on_policy(batch, student, self.teacher.model)  # type: ignore[union-attr]
        mask = batch["labels"][:, 1:] != self.ignore_index  # [B, T-1]
        teacher_state = self.teacher.prepare(batch, mask) if self.teacher is not None else None
        hidden = student(batch["tokens"], return_hidden=True, **model_inputs(batch))  # [B, T, D]
        return self.from_hidden(student, hidden, batch["labels"], teacher_state)

    def from_hidden(
        self,
        student: nn.Module,
        hidden: Tensor,
        labels: Tensor,
        teacher_state: Sequence[Tensor] | None = None,
    ) -> ObjectiveOutput:
        """The objective's sums from the student's final hidden states ``[B, T, D]`` and aligned ``labels`` [B, T].

        ``teacher_state`` is the teacher source's ``prepare`` result for the same positions (None = no KD term).
        """
        targets = labels[:, 1:]  # [B, T-1]
        mask = targets != self.ignore_index
        num_tokens = mask.sum()
        h_s = hidden[:, :-1][mask]  # [N, D]
        tgt = targets[mask]  # [N]
        use_teacher = teacher_state is not None and self.teacher is not None
        kd_grad = self.kd_ratio != 0.0
        n = tgt.shape[0]
        # zero sums attached to the student's graph, so backward works even on an all-masked batch
        zero = hidden[..., :0].sum().float()
        if n == 0:
            return ObjectiveOutput(zero, zero.clone(), zero.clone() if use_teacher else None, num_tokens)

        def chunk_sums(hs: Tensor, y: Tensor, *t_state: Tensor) -> tuple[Tensor, Tensor]:
            s_logits = upcast(student.output_logits(hs))  # [n_i, V] fp32
            ce = F.cross_entropy(s_logits, y, reduction="sum")
            if not t_state:
                return ce, torch.zeros((), dtype=ce.dtype, device=ce.device)
            s_for_kd = s_logits if kd_grad else s_logits.detach()
            s_logp, t_logp = self.teacher.log_probs(t_state, s_for_kd, self.temperature)
            kd = self.kd_loss.per_token(s_logp, t_logp).sum()
            return ce, kd * self.kd_scale if self.kd_scale != 1.0 else kd

        recompute = self.checkpoint_chunks and torch.is_grad_enabled() and h_s.requires_grad
        ce_total, kd_total = zero, zero.clone()
        k = min(self.num_output_chunks, n)
        for i in range(k):
            start, end = (i * n) // k, ((i + 1) * n) // k
            t_chunk = tuple(t[start:end] for t in teacher_state) if use_teacher else ()
            args = (h_s[start:end], tgt[start:end], *t_chunk)
            ce, kd = checkpoint(chunk_sums, *args, use_reentrant=False) if recompute else chunk_sums(*args)
            ce_total = ce_total + ce
            kd_total = kd_total + kd
        if not use_teacher:
            return ObjectiveOutput(ce_total, ce_total, None, num_tokens)
        return ObjectiveOutput(self.mix(ce_total, kd_total), ce_total, kd_total, num_tokens)

    def state_dict(self) -> dict[str, Any]:
        """The objective's own state for resume checkpoints (the on-policy sampling RNG); {} when it has none."""
        return {"on_policy": self.on_policy.state_dict()} if self.on_policy is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a checkpoint without on-policy state leaves the samplers as seeded)."""
        if self.on_policy is not None and state.get("on_policy") is not None:
            self.on_policy.load_state_dict(state["on_policy"])

    def __repr__(self) -> str:
        return (
            f"DistillationObjective(kd_loss={self.kd_loss!r}, teacher={type(self.teacher).__name__ if self.teacher else None}, "
            f"kd_ratio={self.kd_ratio}, temperature={self.temperature}, "
            f"scale_by_temperature_squared={self.scale_by_temperature_squared}, "
            f"num_output_chunks={self.num_output_chunks}"
            + (f", on_policy={self.on_policy!r})" if self.on_policy is not None else ")")
        )
