"""A cached teacher: the teacher source that reads the teacher's top-k log-probabilities from disk.

The cache is written once by ``kdtune run cache_teacher_logits`` (see :mod:`kdtune.data.teacher_cache`); a KD run then
names it instead of a teacher model (``teacher_logits: {_component_: kdtune.losses.CachedTeacher, path: ...}``) and no
teacher is built. Per micro-batch the examples are looked up by content (a hash of their tokens and trained
positions), so shuffling, packing and resume need nothing special. The divergence is then computed over the teacher's
top-k support (``tail="bucket"``: plus one bucket holding the rest of both distributions' mass; ``"renormalize"``:
both renormalised over the top-k) by the same divergence classes as the live teacher's (see
:mod:`kdtune.losses.sparse`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from kdtune.data.teacher_cache import TeacherLogitsCache, dataset_max_seq_len
from kdtune.errors import ConfigError
from kdtune.losses.functional import log_probs
from kdtune.losses.sparse import TAIL_MODES, sparse_support

__all__ = ["CachedTeacher"]


class CachedTeacher:
    """Teacher source backed by a teacher-logits cache directory.

    Args:
        path: the cache directory (the ``output_dir`` of ``cache_teacher_logits``).
        tail: ``"bucket"`` (top-k + one bucket for the remaining mass; the default) or ``"renormalize"``.
    """

    def __init__(self, path: str, tail: str = "bucket") -> None:
        if tail not in TAIL_MODES:
            raise ConfigError(f"teacher_logits.tail={tail!r} is invalid: use one of {', '.join(TAIL_MODES)}")
        self.cache = TeacherLogitsCache(path)
        self.tail = tail

    def check_run(
        self, *, tokenizer: Any, temperature: float, student_vocab_size: int, datasets: Sequence[Any]
    ) -> None:
        """Refuse (one error naming every difference) a cache built for other data, tokenizer, length or temperature."""
        present = [d for d in datasets if d is not None]
        lengths = [n for n in (dataset_max_seq_len(d, tokenizer) for d in present) if n is not None]
        self.cache.check_run(
            tokenizer=tokenizer,
            max_seq_len=max(lengths) if lengths else None,
            temperature=temperature,
            student_vocab_size=student_vocab_size,
        )
        self.cache.check_dataset(present)

    def prepare(self, batch: dict[str, Any], mask: Tensor) -> tuple[Tensor, ...]:
        ids, logp = self.cache.lookup(batch, device=mask.device)  # [N, k] int64, [N, k] fp32
        return ids, logp

    def log_probs(self, state: Sequence[Tensor], student_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        ids, teacher_logp = state
        return sparse_support(log_probs(student_logits, temperature), ids, teacher_logp, self.tail)

    def __repr__(self) -> str:
        return f"CachedTeacher(path={str(self.cache.path)!r}, tail={self.tail!r}, k={self.cache.k})"
