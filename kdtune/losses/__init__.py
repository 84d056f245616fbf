"""The training objective and its divergences.

* :class:`DistillationObjective` (``objective``): the one component that owns the per-token computation — teacher
  source, divergence, temperature, ``kd_ratio``, chunking — and returns the mixed sum and its parts.
* ``divergences``: one small class per divergence (``per_token`` on tempered log-probabilities), named by configs as
  ``kd_loss``.
* ``functional``: the same divergences as plain functions, and the one logits → tempered log-probs conversion.
* :class:`CachedTeacher` (``cached``) + ``sparse``: the teacher's top-k from a cache, as a teacher source.

See ``docs/losses.md`` for the formulas and ``docs/adding_a_loss.md`` to add a divergence.
"""

from kdtune.losses.cached import CachedTeacher
from kdtune.losses.divergences import (
    Divergence,
    ForwardKLLoss,
    ForwardKLWithChunkedOutputLoss,
    JSDLoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    SymmetricKLLoss,
    TVDLoss,
)
from kdtune.losses.objective import DistillationObjective, LiveTeacher, ObjectiveOutput, TeacherSource
from kdtune.losses.on_policy import OnPolicy

__all__ = [
    "CachedTeacher",
    "DistillationObjective",
    "Divergence",
    "ForwardKLLoss",
    "ForwardKLWithChunkedOutputLoss",
    "JSDLoss",
    "LiveTeacher",
    "ObjectiveOutput",
    "OnPolicy",
    "ReverseKLLoss",
    "SkewForwardKLLoss",
    "SkewReverseKLLoss",
    "SymmetricKLLoss",
    "TVDLoss",
    "TeacherSource",
]
