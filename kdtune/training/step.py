"""One optimizer step: exact token-normalised gradient accumulation, then the update with its NaN/inf guard.

A step's loss is the mean over *all* trained tokens of *all* its micro-batches (and all data-parallel ranks):
``L = Σ_micro loss_sum / N_step``. Averaging per-micro-batch means instead would weight a short micro-batch's tokens
more than a long one's, so ``batch 8 × accum 1`` and ``batch 2 × accum 4`` would differ. Because ``N_step`` is known
only after the last micro-batch, each micro-batch back-propagates its *sum* (the objective's ``loss_sum``) and the
gradients are divided by ``N_step`` once at the end (:meth:`StepAccumulator.finish`). Nothing here knows how the sum
was mixed: that is the objective's business.

With fp16 mixed precision (a :class:`~kdtune.training.runtime.Precision` with a loss scaler) each micro-batch's sum is
multiplied by the loss scale before backward, the gradients are unscaled before clipping, and a step whose gradients
overflowed is skipped (no update, no LR-schedule step, the scale backs off) and counted, instead of tripping the
NaN/inf guard.

Typical use::

    acc = StepAccumulator(model, precision=runtime.precision)
    for batch in micro_batches:
        with runtime.precision.autocast():
            out = objective(model, batch)
        acc.backward(out)
    result = optimizer_step(acc, model, optimizer, scheduler, clip_grad_norm, step)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdtune.losses import ObjectiveOutput
from kdtune.training.runtime import Precision, check_finite
from kdtune.training.runtime import clip_grad_norm as clip

__all__ = ["StepAccumulator", "StepMetrics", "StepResult", "due", "optimizer_step", "scale_grads"]


def _params(model_or_params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(model_or_params, nn.Module):
        return [p for p in model_or_params.parameters() if p.requires_grad]
    return [p for p in model_or_params if p.requires_grad]


@torch.no_grad()
def scale_grads(model: nn.Module | Iterable[Tensor], factor: float | Tensor) -> None:
    """Multiply every existing ``.grad`` of ``model``'s trainable parameters in place by ``factor``."""
    for p in _params(model):
        if p.grad is not None:
            f = factor.to(device=p.grad.device, dtype=p.grad.dtype) if isinstance(factor, Tensor) else factor
            p.grad.mul_(f)


@dataclass
class StepMetrics:
    """What one optimizer step measured (token-normalised over all micro-batches and ranks).

    Attributes:
        loss: the optimised loss per valid token.
        class_loss: cross-entropy per valid token (nan if never reported).
        kd_loss: KD loss per valid token (nan if never reported).
        num_tokens: valid tokens of the step (all micro-batches, all ranks).
        num_micro_batches: micro-batches accumulated on this rank.
    """

    loss: float
    class_loss: float
    kd_loss: float
    num_tokens: int
    num_micro_batches: int


class StepAccumulator:
    """Accumulates summed-loss gradients over micro-batches and normalises them by the step's valid-token count.

    Args:
        model: the trained module (or an iterable of its parameters); only trainable parameters are scaled.
        all_reduce: optional function that returns the SUM of a tensor over data-parallel ranks (supplied by
            ``kdtune.training.distributed``); used for the token count and the logged losses.
        grad_average_factor: multiply gradients by this after dividing by the global token count. Use the
            data-parallel world size when the wrapper (DDP / FSDP) *averages* gradients over ranks, so the result is
            the exact per-token mean over all ranks; 1 on a single device.
        precision: the run's precision; with a loss scaler (fp16) every backward is of the scaled loss and
            :func:`optimizer_step` unscales, skips overflowed steps and updates the scale. None = plain backward.
    """

    def __init__(
        self,
        model: nn.Module | Iterable[Tensor],
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        grad_average_factor: float = 1.0,
        *,
        precision: Precision | None = None,
    ) -> None:
        self._params = _params(model)
        self._all_reduce = all_reduce
        self._grad_average_factor = float(grad_average_factor)
        self.precision = precision
        self.reset()

    def reset(self) -> None:
        """Start a new optimizer step (does not touch gradients; call ``optimizer.zero_grad`` yourself)."""
        self._tokens: Tensor | None = None
        self._sums: Tensor | None = None  # [3]: loss, class_loss, kd_loss (detached, fp64 for exact logging)
        self._have = [False, False, False]
        self.num_micro_batches = 0

    def backward(self, out: ObjectiveOutput, *, retain_graph: bool = False) -> None:
        """Back-propagate one micro-batch's summed loss (``out.loss_sum``, × the loss scale under fp16) and record its
        sums and token count."""
        if out.loss_sum.requires_grad:
            loss = self.precision.scale(out.loss_sum) if self.precision is not None else out.loss_sum
            loss.backward(retain_graph=retain_graph)
        self.add(out)

    def add(self, out: ObjectiveOutput) -> None:
        """Record a micro-batch whose backward the caller ran itself (e.g. inside ``no_sync``)."""
        device = out.loss_sum.device
        tokens = torch.as_tensor(out.num_tokens, device=device).detach().to(torch.int64).reshape(())
        parts = [out.loss_sum, out.class_loss_sum, out.kd_loss_sum]
        vals = torch.stack(
            [
                p.detach().to(device=device, dtype=torch.float64).reshape(())
                if p is not None
                else torch.zeros((), dtype=torch.float64, device=device)
                for p in parts
            ]
        )
        for i, p in enumerate(parts):
            self._have[i] = self._have[i] or p is not None
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        self._sums = vals if self._sums is None else self._sums + vals
        self.num_micro_batches += 1

    def finish(self) -> StepMetrics:
        """Divide the accumulated gradients by the step's total valid tokens; return the step's metrics.

        With no valid token at all the gradients are left unscaled (they are zero) and the losses reported as 0.
        """
        if self._tokens is None or self._sums is None:
            raise RuntimeError("StepAccumulator.finish() called before any micro-batch was added")
        tokens, sums = self._tokens.clone(), self._sums.clone()
        if self._all_reduce is not None:
            tokens = self._all_reduce(tokens)
            sums = self._all_reduce(sums)
        n = int(tokens.item())
        if n > 0:
            scale_grads(self._params, self._grad_average_factor / n)
        per_tok = (sums / max(n, 1)).tolist()
        metrics = StepMetrics(
            loss=per_tok[0],
            class_loss=per_tok[1] if self._have[1] else math.nan,
            kd_loss=per_tok[2] if self._have[2] else math.nan,
            num_tokens=n,
            num_micro_batches=self.num_micro_batches,
        )
        self.reset()
        return metrics


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
        grad_norm: total gradient L2 norm before clipping (inf/nan on a skipped fp16 step).
        lr: learning rate used by this step.
        skipped: fp16: the gradients overflowed, so the update (and the LR-schedule step) was skipped.
        skipped_steps: fp16: skipped steps of the whole run so far (resumed runs included); None without loss scaling.
        loss_scale: fp16: the loss scale this step's backward used; None without loss scaling.
    """

    loss: float
    class_loss: float
    kd_loss: float
    num_tokens: int
    grad_norm: float
    lr: float
    skipped: bool = False
    skipped_steps: int | None = None
    loss_scale: float | None = None


def optimizer_step(
    accumulator: StepAccumulator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    clip_grad_norm: float | None,
    step: int,
    last_checkpoint: str | Any | None = None,
) -> StepResult:
    """Finish a step: normalise gradients by the step's tokens, stop on NaN/inf, clip, update, advance the schedule.

    The NaN/inf check runs *before* the update, so the weights (and the last resume checkpoint on disk) stay those of
    the last good step. With fp16 loss scaling (the accumulator's precision has a scaler) the gradients are unscaled
    before clipping; a non-finite gradient is then an overflow of the scaled backward: the update and the LR-schedule
    step are skipped, the scale backs off and the step is counted in ``skipped_steps``. Only an overflow at a scale
    at or below ``Precision.min_scale`` (the gradients are non-finite unscaled) trips the guard.

    Args:
        accumulator: the :class:`kdtune.training.StepAccumulator` holding this step's micro-batches.
        model: the trained model.
        optimizer: its optimizer.
        scheduler: LR schedule or None.
        clip_grad_norm: max gradient norm, or None to only measure it.
        step: this step's number (1-based), named in the NaN error.
        last_checkpoint: the run's checkpoints (:class:`kdtune.training.ResumeCheckpoints` or its distributed twin):
            on a NaN/inf their ``diverged(step)`` sets aside those that would repeat it and names the one to resume
            from; or the path to name, or None.

    Returns:
        The :class:`StepResult`.
    """
    metrics = accumulator.finish()

    def stop_if_non_finite(loss: float, grad_norm: float) -> None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # set aside the checkpoints that would repeat the divergence and name the one to resume from
            where = last_checkpoint.diverged(step) if hasattr(last_checkpoint, "diverged") else last_checkpoint
            check_finite(loss, step, "loss", where)
            check_finite(grad_norm, step, "grad_norm", where)

    precision = accumulator.precision
    scaler = precision.scaler if precision is not None else None
    if scaler is None:
        grad_norm = float(clip(model, clip_grad_norm)) if math.isfinite(metrics.loss) else math.nan
        stop_if_non_finite(metrics.loss, grad_norm)
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return StepResult(metrics.loss, metrics.class_loss, metrics.kd_loss, metrics.num_tokens, grad_norm, lr)
    stop_if_non_finite(metrics.loss, 0.0)
    scaler.unscale_(optimizer)  # true gradients; records whether any is inf/nan (over all ranks for DTensors)
    grad_norm = float(clip(model, clip_grad_norm))
    scale = float(scaler.get_scale())
    lr = float(optimizer.param_groups[0]["lr"])
    scaler.step(optimizer)  # no update when a gradient overflowed
    scaler.update()  # overflow: scale × backoff_factor; else it grows every growth_interval clean steps
    skipped = float(scaler.get_scale()) < scale
    if skipped and scale <= precision.min_scale:
        stop_if_non_finite(metrics.loss, grad_norm if not math.isfinite(grad_norm) else math.inf)
    optimizer.zero_grad(set_to_none=True)
    if skipped:
        precision.skipped_steps += 1
    elif scheduler is not None:
        scheduler.step()
    return StepResult(
        metrics.loss,
        metrics.class_loss,
        metrics.kd_loss,
        metrics.num_tokens,
        grad_norm,
        lr,
        skipped=skipped,
        skipped_steps=precision.skipped_steps,
        loss_scale=scale,
    )
