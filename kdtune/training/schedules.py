"""Learning-rate schedules with warmup, as config ``_component_``s returning a resumable ``LambdaLR``.

A recipe instantiates them with the optimizer and the total number of optimizer steps::

    lr_scheduler:
      _component_: kdtune.training.get_cosine_schedule_with_warmup
      num_warmup_steps: 100        # or: warmup_ratio: 0.03 (fraction of num_training_steps)

    scheduler = config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)

Warmup is linear from 0 (step 0 → factor 0) to 1 at ``num_warmup_steps``. The multiplier at step ``s`` is applied to
the optimizer's initial learning rate. ``scheduler.state_dict()`` / ``load_state_dict`` restore the position *and*
re-apply the current learning rate to the optimizer, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from kdtune.errors import ConfigError

__all__ = [
    "ScheduleFactor",
    "get_cosine_schedule_with_warmup",
    "get_linear_schedule_with_warmup",
    "get_constant_schedule_with_warmup",
    "resolve_warmup_steps",
]


def resolve_warmup_steps(num_training_steps: int, num_warmup_steps: int | None, warmup_ratio: float | None) -> int:
    """Warmup length in steps from either ``num_warmup_steps`` or ``warmup_ratio`` (fraction of training steps)."""
    if num_warmup_steps is not None and warmup_ratio is not None:
        raise ConfigError(
            "lr_scheduler: both num_warmup_steps and warmup_ratio are set; keep one (e.g. remove lr_scheduler.warmup_ratio)"
        )
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ConfigError(f"lr_scheduler.warmup_ratio={warmup_ratio!r} is invalid: it must lie in [0, 1]")
        return int(math.ceil(warmup_ratio * num_training_steps))
    steps = 0 if num_warmup_steps is None else num_warmup_steps
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"lr_scheduler.num_warmup_steps={num_warmup_steps!r} is invalid: use an integer >= 0")
    return steps


class ScheduleFactor:
    """The LR multiplier as a picklable callable (so ``LambdaLR.state_dict`` records its settings).

    Args:
        kind: ``"cosine"``, ``"linear"`` or ``"constant"``.
        num_warmup_steps: linear warmup length.
        num_training_steps: total optimizer steps (decay ends here).
        num_cycles: cosine waves over the decay (0.5 = one half-wave from 1 down to the floor).
        min_lr_ratio: floor of the decay, as a fraction of the initial LR.
    """

    def __init__(
        self,
        kind: str,
        num_warmup_steps: int,
        num_training_steps: int,
        num_cycles: float = 0.5,
        min_lr_ratio: float = 0.0,
    ) -> None:
        self.kind = kind
        self.num_warmup_steps = num_warmup_steps
        self.num_training_steps = num_training_steps
        self.num_cycles = num_cycles
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.num_warmup_steps:
            return step / max(1, self.num_warmup_steps)
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.num_training_steps - self.num_warmup_steps)
        progress = min(1.0, (step - self.num_warmup_steps) / decay_steps)
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * self.num_cycles * progress)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


class _ResumableLambdaLR(LambdaLR):
    """``LambdaLR`` whose ``load_state_dict`` also sets the optimizer's LR for the restored step."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = lrs


def _build(
    kind: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int | None,
    num_training_steps: int | None,
    warmup_ratio: float | None,
    num_cycles: float,
    min_lr_ratio: float,
    last_epoch: int,
) -> LambdaLR:
    if kind != "constant" or warmup_ratio is not None:
        if num_training_steps is None or num_training_steps < 1:
            raise ConfigError(
                f"lr_scheduler: num_training_steps={num_training_steps!r} is invalid: the recipe passes the total number "
                "of optimizer steps; it must be >= 1"
            )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.min_lr_ratio={min_lr_ratio!r} is invalid: it must lie in [0, 1]")
    warmup = resolve_warmup_steps(num_training_steps or 0, num_warmup_steps, warmup_ratio)
    factor = ScheduleFactor(kind, warmup, num_training_steps or 0, num_cycles, min_lr_ratio)
    return _ResumableLambdaLR(optimizer, factor, last_epoch=last_epoch)


def get_cosine_schedule_with_warmup(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
    *,
    warmup_ratio: float | None = None,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` × the initial LR at ``num_training_steps``.

    Args:
        optimizer: the optimizer whose LR is scheduled.
        num_warmup_steps: warmup steps (mutually exclusive with ``warmup_ratio``; default 0).
        num_training_steps: total optimizer steps.
        num_cycles: number of cosine waves over the decay (0.5 = one half-wave from 1 down to the floor).
        last_epoch: index of the last step (-1 to start fresh).
        warmup_ratio: warmup as a fraction of ``num_training_steps`` (rounded up).
        min_lr_ratio: LR floor as a fraction of the initial LR.
    """
    return _build(
        "cosine", optimizer, num_warmup_steps, num_training_steps, warmup_ratio, num_cycles, min_lr_ratio, last_epoch
    )


def get_linear_schedule_with_warmup(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    last_epoch: int = -1,
    *,
    warmup_ratio: float | None = None,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then linear decay to ``min_lr_ratio`` × the initial LR at ``num_training_steps``."""
    return _build(
        "linear", optimizer, num_warmup_steps, num_training_steps, warmup_ratio, 0.5, min_lr_ratio, last_epoch
    )


def get_constant_schedule_with_warmup(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    last_epoch: int = -1,
    *,
    warmup_ratio: float | None = None,
) -> LambdaLR:
    """Linear warmup, then the initial LR for the rest of training (``num_training_steps`` only for ``warmup_ratio``)."""
    return _build("constant", optimizer, num_warmup_steps, num_training_steps, warmup_ratio, 0.5, 0.0, last_epoch)
