"""Validation: the objective's sums over a validation loader, turned into per-token losses.

The numbers are the training objective's own (cross-entropy, divergence, and their mix by the objective's rule),
so a validation loss is comparable with the training loss of the same run. In a distributed run every rank passes
its share of the data and an ``all_reduce`` that sums over ranks; the division happens after the reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from kdtune.losses import DistillationObjective
from kdtune.training.data import to_device

__all__ = ["evaluate"]


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
