"""What every recipe must get right, as small tested helpers shared by all recipes.

Token-normalised gradient accumulation and loss mixing (``accumulation``), teacher setup and vocabulary checks
(``teacher``), LR schedules, precision / device / seed helpers, resume state, metric loggers and progress display.
Distributed helpers live in ``kdtune.training.distributed``.
"""

from kdtune.training.accumulation import StepAccumulator, StepMetrics, check_kd_ratio, mix_losses, scale_grads
from kdtune.training.teacher import assert_frozen, check_vocab_compatibility, param_fingerprint, setup_teacher

__all__ = [
    "StepAccumulator",
    "StepMetrics",
    "assert_frozen",
    "check_kd_ratio",
    "check_vocab_compatibility",
    "mix_losses",
    "param_fingerprint",
    "scale_grads",
    "setup_teacher",
]
