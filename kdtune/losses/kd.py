"""``nn.Module`` wrappers of the KD and CE losses, for use as config ``_component_``s.

Every KD loss module takes ``temperature``, ``scale_by_temperature_squared``, ``ignore_index``, ``reduction``
(``"mean"`` = sum over valid tokens / number of valid tokens, 0 when there are none; ``"sum"``) and
``num_output_chunks``. ``forward(student_logits, teacher_logits, labels)`` accepts ``[B, T, V]`` tensors or lists of
chunk tensors ``[B, T_i, V]`` (the torchtune chunked-output convention, chunks along the sequence dim); ``labels`` is
``[B, T]``, already aligned with the logits (the caller shifts).

When there is more than one chunk and gradients are enabled, each chunk's fp32 upcast, softmaxes and divergence are
recomputed in backward (activation checkpointing), so only one chunk's fp32 intermediates exist at a time.

The training loop uses :meth:`KDLoss.loss_sum` (via :func:`kdtune.losses.distillation_objective`), which returns the
plain sum so the step can be normalised by the valid-token count of all its micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdtune.errors import ConfigError
from kdtune.losses import functional as KF

__all__ = [
    "KDLoss",
    "ForwardKLLoss",
    "ForwardKLWithChunkedOutputLoss",
    "ReverseKLLoss",
    "SymmetricKLLoss",
    "JSDLoss",
    "SkewForwardKLLoss",
    "SkewReverseKLLoss",
    "TVDLoss",
    "CrossEntropyLoss",
    "CEWithChunkedOutputLoss",
]

Logits = Tensor | Sequence[Tensor]


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction={reduction!r} is invalid: use 'mean' or 'sum'")


def _check_chunks(num_output_chunks: int) -> None:
    if not isinstance(num_output_chunks, int) or num_output_chunks < 1:
        raise ConfigError(f"num_output_chunks={num_output_chunks!r} is invalid: it must be an integer >= 1")


def _as_chunks(x: Logits, num_chunks: int) -> list[Tensor]:
    if isinstance(x, Tensor):
        return list(x.chunk(num_chunks, dim=1)) if num_chunks > 1 and x.dim() >= 3 else [x]
    return list(x)


def _split_labels_like(labels: Tensor | None, chunks: list[Tensor]) -> list[Tensor | None]:
    if labels is None:
        return [None] * len(chunks)
    if len(chunks) == 1:
        return [labels]
    sizes = [c.shape[1] for c in chunks]
    if sum(sizes) != labels.shape[1]:
        raise ValueError(f"logit chunks cover {sum(sizes)} positions but labels have {labels.shape[1]}")
    return list(labels.split(sizes, dim=1))


class KDLoss(nn.Module):
    """Base class of the KD losses: temperature, masking, reduction and chunking; subclasses give the divergence.

    Args:
        temperature: T > 0; both models' logits are divided by T before the softmax.
        scale_by_temperature_squared: multiply the loss by T² (on by default) so gradient magnitudes do not shrink
            as 1/T²; with T = 1 it changes nothing.
        ignore_index: label value of positions that do not count.
        reduction: ``"mean"`` (per valid token) or ``"sum"``.
        num_output_chunks: tensors passed to ``forward`` are split into this many chunks along the sequence dim and
            processed one at a time (with recomputation in backward).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = True,
        ignore_index: int = -100,
        reduction: Literal["mean", "sum"] = "mean",
        num_output_chunks: int = 1,
    ) -> None:
        super().__init__()
        KF.check_temperature(temperature)
        _check_reduction(reduction)
        _check_chunks(num_output_chunks)
        self.temperature = float(temperature)
        self.scale_by_temperature_squared = bool(scale_by_temperature_squared)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.num_output_chunks = num_output_chunks

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Divergence at every position ``[...]`` for logits ``[..., V]``, temperature applied, no T² factor."""
        raise NotImplementedError

    @property
    def scale(self) -> float:
        """The factor applied to the summed divergence: T² when ``scale_by_temperature_squared`` else 1."""
        return self.temperature**2 if self.scale_by_temperature_squared else 1.0

    def loss_sum(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        """Sum over valid positions (all positions if ``labels`` is None) of the scaled divergence; one chunk."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
                "slice a padded teacher vocabulary to the student's first (see kdtune.training.check_vocab_compatibility)"
            )
        per_token = self.per_token(student_logits, teacher_logits)
        return KF.reduce_token_losses(per_token, labels, self.ignore_index, self.scale)

    def forward(self, student_logits: Logits, teacher_logits: Logits, labels: Tensor | None = None) -> Tensor:
        """Loss over all chunks, reduced per ``reduction``.

        Args:
            student_logits: ``[B, T, V]`` or a list of ``[B, T_i, V]`` chunks.
            teacher_logits: same layout as ``student_logits``.
            labels: ``[B, T]`` aligned with the logits, or None (every position counts).

        Returns:
            Scalar loss.
        """
        s_chunks = _as_chunks(student_logits, self.num_output_chunks)
        t_chunks = _as_chunks(teacher_logits, self.num_output_chunks)
        if len(s_chunks) != len(t_chunks):
            raise ValueError(f"{len(s_chunks)} student chunks but {len(t_chunks)} teacher chunks")
        l_chunks = _split_labels_like(labels, s_chunks)
        recompute = len(s_chunks) > 1 and torch.is_grad_enabled()
        total: Tensor | None = None
        for s, t, lab in zip(s_chunks, t_chunks, l_chunks):
            if recompute and (s.requires_grad or t.requires_grad):
                part = checkpoint(self.loss_sum, s, t, lab, use_reentrant=False)
            else:
                part = self.loss_sum(s, t, lab)
            total = part if total is None else total + part
        assert total is not None
        if self.reduction == "sum":
            return total
        if labels is None:
            count = sum(c[..., 0].numel() for c in s_chunks)
            return total / max(count, 1)
        count = (labels != self.ignore_index).sum()
        return total / count.clamp(min=1)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, scale_by_temperature_squared={self.scale_by_temperature_squared}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, num_output_chunks={self.num_output_chunks}"
        )


class ForwardKLLoss(KDLoss):
    """Forward KL ``KL(p_t‖p_s) = Σ p_t (log p_t − log p_s)`` — the true KL (``KL(p, p) = 0``).

    Unlike torchtune's ``ForwardKLLoss`` (which returns only the cross-entropy part ``−Σ p_t log p_s``), the teacher
    entropy is included, so the logged value is a KL; the gradient w.r.t. the student is the same.
    """

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return KF.forward_kl_per_token(student_logits, teacher_logits, self.temperature)


class ForwardKLWithChunkedOutputLoss(ForwardKLLoss):
    """:class:`ForwardKLLoss` computed chunk by chunk (torchtune's name and ``num_output_chunks`` kept; default 8)."""

    def __init__(
        self,
        num_output_chunks: int = 8,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = True,
        ignore_index: int = -100,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> None:
        super().__init__(temperature, scale_by_temperature_squared, ignore_index, reduction, num_output_chunks)


class ReverseKLLoss(KDLoss):
    """Reverse KL ``KL(p_s‖p_t)`` (mode-seeking)."""

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return KF.reverse_kl_per_token(student_logits, teacher_logits, self.temperature)


class SymmetricKLLoss(KDLoss):
    """Symmetric (Jeffreys) KL ``KL(p_t‖p_s) + KL(p_s‖p_t)``."""

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return KF.symmetric_kl_per_token(student_logits, teacher_logits, self.temperature)


class JSDLoss(KDLoss):
    """Generalised Jensen-Shannon divergence JSD(β), ``M = β p_t + (1 − β) p_s``.

    ``JSD_β = [β KL(p_t‖M) + (1 − β) KL(p_s‖M)] / (β (1 − β))``; β = 0 is forward KL, β = 1 reverse KL (its limits).
    ``normalize=False`` drops the ``β (1 − β)`` division (TRL's convention) in the interior.

    Args:
        beta: interpolation weight in [0, 1].
        normalize: divide by ``β (1 − β)`` so the family is continuous at β = 0 and β = 1.
        temperature, scale_by_temperature_squared, ignore_index, reduction, num_output_chunks: see :class:`KDLoss`.
    """

    def __init__(
        self,
        beta: float = 0.5,
        normalize: bool = True,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = True,
        ignore_index: int = -100,
        reduction: Literal["mean", "sum"] = "mean",
        num_output_chunks: int = 1,
    ) -> None:
        super().__init__(temperature, scale_by_temperature_squared, ignore_index, reduction, num_output_chunks)
        KF._check_fraction("beta", beta)
        self.beta = float(beta)
        self.normalize = bool(normalize)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, normalize={self.normalize}, " + super().extra_repr()

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return KF.generalized_jsd_per_token(student_logits, teacher_logits, self.beta, self.temperature, self.normalize)


class SkewForwardKLLoss(KDLoss):
    """Skew forward KL ``KL(p_t ‖ α p_t + (1 − α) p_s)``; α in [0, 1), α = 0 is forward KL."""

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = True,
        ignore_index: int = -100,
        reduction: Literal["mean", "sum"] = "mean",
        num_output_chunks: int = 1,
    ) -> None:
        super().__init__(temperature, scale_by_temperature_squared, ignore_index, reduction, num_output_chunks)
        KF._check_fraction("alpha", alpha, allow_one=False)
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return KF.skew_forward_kl_per_token(student_logits, teacher_logits, self.alpha, self.temperature)


class SkewReverseKLLoss(KDLoss):
    """Skew reverse KL ``KL(p_s ‖ α p_s + (1 − α) p_t)``; α in [0, 1), α = 0 is reverse KL."""

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = True,
        ignore_index: int = -100,
        reduction: Literal["mean", "sum"] = "mean",
        num_output_chunks: int = 1,
    ) -> None:
        super().__init__(temperature, scale_by_temperature_squared, ignore_index, reduction, num_output_chunks)
        KF._check_fraction("alpha", alpha, allow_one=False)
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return KF.skew_reverse_kl_per_token(student_logits, teacher_logits, self.alpha, self.temperature)


class TVDLoss(KDLoss):
    """Total variation distance ``½ Σ |p_t − p_s|``."""

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return KF.total_variation_per_token(student_logits, teacher_logits, self.temperature)


class CrossEntropyLoss(nn.Module):
    """Token cross-entropy over valid positions, chunk by chunk; the fine-tuning loss as a ``_component_``.

    Args:
        ignore_index: label value of positions that do not count.
        reduction: ``"mean"`` (per valid token; 0 when none) or ``"sum"``.
        num_output_chunks: tensors are split into this many chunks along the sequence dim (fp32 upcast per chunk).
    """

    def __init__(
        self, ignore_index: int = -100, reduction: Literal["mean", "sum"] = "mean", num_output_chunks: int = 1
    ) -> None:
        super().__init__()
        _check_reduction(reduction)
        _check_chunks(num_output_chunks)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.num_output_chunks = num_output_chunks

    def loss_sum(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Sum of cross-entropies of one chunk: logits ``[..., V]``, labels ``[...]``."""
        return KF.cross_entropy_sum(logits, labels, self.ignore_index)

    def forward(self, logits: Logits, labels: Tensor) -> Tensor:
        """Cross-entropy of ``logits`` (``[B, T, V]`` or list of chunks) against aligned ``labels`` ``[B, T]``."""
        chunks = _as_chunks(logits, self.num_output_chunks)
        l_chunks = _split_labels_like(labels, chunks)
        recompute = len(chunks) > 1 and torch.is_grad_enabled()
        total = None
        for c, lab in zip(chunks, l_chunks):
            part = (
                checkpoint(self.loss_sum, c, lab, use_reentrant=False)
                if recompute and c.requires_grad
                else self.loss_sum(c, lab)
            )
            total = part if total is None else total + part
        if self.reduction == "sum":
            return total
        return total / (labels != self.ignore_index).sum().clamp(min=1)


class CEWithChunkedOutputLoss(CrossEntropyLoss):
    """:class:`CrossEntropyLoss` with torchtune's name and default ``num_output_chunks=8``."""

    def __init__(
        self, num_output_chunks: int = 8, ignore_index: int = -100, reduction: Literal["mean", "sum"] = "mean"
    ) -> None:
        super().__init__(ignore_index, reduction, num_output_chunks)
