"""The training objective: one component owns the whole per-token computation of fine-tuning and distillation.

:class:`DistillationObjective` is built from the divergence (``kd_loss``), ``kd_ratio``, ``temperature``, the
chunking and the teacher source, and is called once per micro-batch with the student and the batch::

    out = objective(student, batch)       # ObjectiveOutput(loss_sum, class_loss_sum, kd_loss_sum, num_tokens)
    out.loss_sum.backward()               # = (1 − kd_ratio) · CE_sum + kd_ratio · KD_sum, summed over trained tokens

Everything else (accumulation, evaluation, distributed reductions) only adds and divides its sums; none of it knows
what ``kd_ratio`` is. Without a teacher it is the fine-tuning objective (cross-entropy only).

How a micro-batch is computed:

0. with an on-policy part (:mod:`kdtune.losses.on_policy`), a training micro-batch's completions are first replaced,
   with probability ``lmbda``, by the student's own samples (or the teacher's, ``seq_kd``);
1. the trained positions are ``labels[:, 1:] != ignore_index`` (position t is compared with label t + 1), taken in
   row-major order; the teacher source is asked for its state on those positions (a live teacher runs its body
   without gradients *before* the student, so the RNG stream the student's dropout sees is the same as without KD);
2. the student's final hidden states at those positions are split into chunks of rows (sized by a memory budget, or
   ``num_output_chunks`` of them); per chunk the student's logits (fp32) give the cross-entropy, and both models'
   log-probabilities at temperature T over a shared support give the divergence (× T² when
   ``scale_by_temperature_squared``);
3. fused (the default, :mod:`kdtune.losses.fused`): each chunk's gradient with respect to the student's hidden rows
   (and output weight) is computed right there in the forward pass, so nothing is recomputed in backward and the
   teacher's output layer runs once; where the model has no single output weight (an FSDP-sharded or NF4 output, LoRA
   dropout on it) each chunk is instead recomputed in backward (activation checkpointing). No ``[B, T, V]`` tensor is
   ever held.

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
from kdtune.losses.cached import CachedTeacher
from kdtune.losses.divergences import Divergence, ForwardKLLoss
from kdtune.losses.functional import check_fraction, check_temperature, log_probs, upcast
from kdtune.losses.fused import ce_forward_kl, chunk_slices, fused_linear_loss, fused_output_weight
from kdtune.losses.on_policy import OnPolicy
from kdtune.losses.sparse_fused import ce_sparse_kd

__all__ = ["DistillationObjective", "LiveTeacher", "ObjectiveOutput", "TeacherSource", "check_batch_kind"]


class ObjectiveOutput(NamedTuple):
    """One micro-batch's sums over its trained tokens; divide by the step's token count (all micro-batches, ranks).

    Attributes:
        loss_sum: scalar, the optimised (mixed) loss summed over trained tokens; carries the gradient.
        class_loss_sum: scalar, the student's cross-entropy summed over trained tokens (for logging: detached on the
            fused path).
        kd_loss_sum: scalar, the divergence (× T² if scaled) summed over trained tokens (for logging); None without a
            teacher.
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
        # inference mode skips all autograd bookkeeping for the teacher's body; FSDP-sharded teachers use no_grad, as
        # FSDP's hooks keep state that inference tensors cannot carry (decided once: FSDP swaps parameters in forward)
        self._sharded = any(hasattr(p, "device_mesh") for p in model.parameters())

    def prepare(self, batch: dict[str, Any], mask: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad() if self._sharded else torch.inference_mode():
            hidden = self.model(batch["tokens"], return_hidden=True, **model_inputs(batch))  # [B, T, Dt]
        return (hidden[:, :-1][mask].clone(),)  # [N, Dt]; a normal tensor again (the clone leaves inference mode)

    def logits(self, state: Sequence[Tensor]) -> Tensor:
        """The teacher's fp32 logits ``[n, Vt]`` for one chunk of its state (computed without gradient)."""
        (hidden,) = state
        with torch.no_grad():
            return upcast(self.model.output_logits(hidden))

    def log_probs(self, state: Sequence[Tensor], student_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        teacher_logits = self.logits(state)  # [n, Vt] fp32
        vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
        return log_probs(student_logits[..., :vocab], temperature), log_probs(teacher_logits[..., :vocab], temperature)


def check_batch_kind(model: nn.Module, batch: dict[str, Any]) -> None:
    """Refuse, in one line, a seq2seq batch for a decoder-only model or a causal batch for an encoder-decoder."""
    seq2seq_model, seq2seq_batch = bool(getattr(model, "is_encoder_decoder", False)), "encoder_tokens" in batch
    if seq2seq_model and not seq2seq_batch:
        raise ConfigError(
            "dataset: the model is an encoder-decoder (T5, BART) but the batches have no encoder input; use "
            "kdtune.data.seq2seq_dataset (source/target pairs) for it"
        )
    if seq2seq_batch and not seq2seq_model:
        raise ConfigError(
            "dataset: kdtune.data.seq2seq_dataset makes encoder inputs but the model is decoder-only; use an "
            "encoder-decoder model (T5, BART) or a causal dataset (sft_dataset, text_completion_dataset)"
        )


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
        num_output_chunks: process the trained positions in this many chunks; None = chunks of as many rows as
            ``memory_budget_bytes`` allows (efficient GEMMs, bounded memory at large vocabularies).
        ignore_index: label value of positions that are not trained.
        checkpoint_chunks: unfused path only: recompute each chunk's logits in backward instead of keeping them.
        fused: compute each chunk's gradients in the forward pass (see the module docstring); False = the
            activation-checkpointed path.
        memory_budget_bytes: bytes a chunk's fp32 vocabulary-sized tensors may take when sizing chunks.
        on_policy: an :class:`~kdtune.losses.on_policy.OnPolicy` sampler: training micro-batches (student in train
            mode, gradients enabled) get their completions from the student with probability ``lmbda`` (or from the
            teacher with ``seq_kd``) before they are scored; needs a live teacher. None = the dataset's completions.
        compile_loss: fused path: compute the cross-entropy + forward-KL chunks (and cross-entropy alone) with
            ``torch.compile`` (:func:`kdtune.losses.fused.ce_forward_kl_terms`), as ``compile: true`` does.
    """

    def __init__(
        self,
        kd_loss: Divergence | None = None,
        *,
        teacher: TeacherSource | nn.Module | None = None,
        kd_ratio: float = 0.5,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = True,
        num_output_chunks: int | None = None,
        ignore_index: int = -100,
        checkpoint_chunks: bool = True,
        fused: bool = True,
        memory_budget_bytes: int | None = None,
        on_policy: OnPolicy | None = None,
        compile_loss: bool = False,
    ) -> None:
        if isinstance(teacher, nn.Module):
            teacher = LiveTeacher(teacher)
        if teacher is not None and not isinstance(kd_loss, Divergence):
            raise ConfigError(
                f"kd_loss: {type(kd_loss).__name__} is not a divergence; use a kdtune.losses.Divergence subclass "
                "(ForwardKLLoss, ReverseKLLoss, JSDLoss, ...)"
            )
        if num_output_chunks is not None and (
            isinstance(num_output_chunks, bool) or not isinstance(num_output_chunks, int) or num_output_chunks < 1
        ):
            raise ConfigError(f"num_output_chunks={num_output_chunks!r} is invalid: it must be an integer >= 1 or null")
        self.kd_loss = kd_loss
        self.teacher = teacher
        self.kd_ratio = check_fraction("kd_ratio", kd_ratio) if teacher is not None else 0.0
        self.temperature = check_temperature(temperature)
        self.scale_by_temperature_squared = bool(scale_by_temperature_squared)
        self.num_output_chunks = num_output_chunks
        self.ignore_index = int(ignore_index)
        self.checkpoint_chunks = bool(checkpoint_chunks)
        self.fused = bool(fused)
        self.memory_budget_bytes = memory_budget_bytes
        self.compile_loss = bool(compile_loss)
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
        """The objective's sums for one collated micro-batch (``tokens``, ``labels`` [B, T], packed fields; for an
        encoder-decoder student ``encoder_tokens`` [B, S] and ``encoder_padding_mask``: positions are decoder ones)."""
        if self.on_policy is not None and student.training and torch.is_grad_enabled():
            batch = self.on_policy(batch, student, self.teacher.model)  # type: ignore[union-attr]
        check_batch_kind(student, batch)
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
        n = tgt.shape[0]
        # zero sums attached to the student's graph, so backward works even on an all-masked batch
        zero = hidden[..., :0].sum().float()
        if n == 0:
            return ObjectiveOutput(zero, zero.clone(), zero.clone() if use_teacher else None, num_tokens)

        def chunk_sums(hs: Tensor, y: Tensor, *t_state: Tensor) -> tuple[Tensor, Tensor]:
            ce, kd = self._chunk_terms(upcast(student.output_logits(hs)), y, t_state)
            return ce, kd

        weight = fused_output_weight(student) if self.fused else None
        if weight is not None and weight.dtype == h_s.dtype:
            loss, ce_total, kd_total = self._fused(h_s, weight, tgt, teacher_state if use_teacher else None)
            return ObjectiveOutput(loss, ce_total, kd_total if use_teacher else None, num_tokens)

        recompute = self.checkpoint_chunks and torch.is_grad_enabled() and h_s.requires_grad
        ce_total, kd_total = zero, zero.clone()
        for rows in chunk_slices(
            n,
            student.vocab_size,
            num_output_chunks=self.num_output_chunks,
            memory_budget_bytes=self.memory_budget_bytes,
        ):
            t_chunk = tuple(t[rows] for t in teacher_state) if use_teacher else ()
            args = (h_s[rows], tgt[rows], *t_chunk)
            ce, kd = checkpoint(chunk_sums, *args, use_reentrant=False) if recompute else chunk_sums(*args)
            ce_total = ce_total + ce
            kd_total = kd_total + kd
        if not use_teacher:
            return ObjectiveOutput(ce_total, ce_total, None, num_tokens)
        return ObjectiveOutput(self.mix(ce_total, kd_total), ce_total, kd_total, num_tokens)

    def _chunk_terms(self, s_logits: Tensor, y: Tensor, t_state: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Cross-entropy and KD sums of one chunk from the student's fp32 logits ``[n, V]`` (KD 0 without teacher)."""
        ce = F.cross_entropy(s_logits, y, reduction="sum")
        if not t_state:
            return ce, torch.zeros((), dtype=ce.dtype, device=ce.device)
        s_for_kd = s_logits if self.kd_ratio != 0.0 else s_logits.detach()
        s_logp, t_logp = self.teacher.log_probs(t_state, s_for_kd, self.temperature)
        kd = self.kd_loss.per_token(s_logp, t_logp).sum()
        return ce, kd * self.kd_scale if self.kd_scale != 1.0 else kd

    def _fused(
        self, h_s: Tensor, weight: Tensor, tgt: Tensor, teacher_state: Sequence[Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The fused path: ``(loss_sum, ce_sum, kd_sum)`` with the chunks' gradients computed in the forward pass."""
        # the hand-written gradients hold for the objective's own mixing rule only
        own_mix = type(self).mix is DistillationObjective.mix
        # CE + forward KL against a live teacher
        fast = own_mix and type(self.kd_loss) is ForwardKLLoss and isinstance(self.teacher, LiveTeacher)
        # CE + any divergence against a cached teacher's top-k, through the sparse support
        sparse = own_mix and isinstance(self.teacher, CachedTeacher)

        def chunk_loss(s_logits: Tensor, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
            t_chunk = tuple(t[rows] for t in teacher_state) if teacher_state is not None else ()
            if sparse and t_chunk:
                return ce_sparse_kd(
                    s_logits, *t_chunk, tgt[rows], divergence=self.kd_loss.per_token, tail=self.teacher.tail,
                    kd_ratio=self.kd_ratio, temperature=self.temperature, scale=self.kd_scale, mix=self.mix,
                    overwrite_logits=True,
                )  # fmt: skip
            if teacher_state is None or fast:
                t_logits = self.teacher.logits(t_chunk) if t_chunk else None
                ratio = self.kd_ratio if t_chunk else 0.0
                return ce_forward_kl(
                    s_logits, t_logits, tgt[rows], kd_ratio=ratio, temperature=self.temperature,
                    scale=self.kd_scale, mix=self.mix if t_chunk else (lambda ce, kd: ce), overwrite_logits=True,
                    compiled=self.compile_loss,
                )  # fmt: skip
            ce, kd = self._chunk_terms(s_logits, tgt[rows], t_chunk)
            return self.mix(ce, kd), ce, kd

        loss, parts = fused_linear_loss(
            h_s,
            weight,
            chunk_loss,
            num_output_chunks=self.num_output_chunks,
            memory_budget_bytes=self.memory_budget_bytes,
        )
        return loss, parts.ce_sum, parts.kd_sum

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
