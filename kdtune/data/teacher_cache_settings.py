"""Typed settings of ``recipes/cache_teacher_logits.py``: every top-level key it reads, its default and its meaning.

The data keys (``tokenizer``, ``dataset``, ``val_dataset``, ``val_split_ratio``, ``seed``) and the teacher keys
(``teacher_model``, ``teacher_checkpointer``) have the names and meaning of the KD recipes' keys, so a KD config's
blocks can be copied as they are (the cache matches the KD run's data by example).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kdtune.config import setting

__all__ = ["CacheTeacherLogitsSettings"]


@dataclass(kw_only=True)
class CacheTeacherLogitsSettings:
    """Every key ``cache_teacher_logits`` reads."""

    output_dir: str = setting(help="The cache directory: manifest.json, index.safetensors, shards/, config.yaml.")
    teacher_model: Any = setting(help="Teacher model `_component_` (as in the KD config).", component=True)
    teacher_checkpointer: Any = setting(
        help="kdtune.models.HFCheckpointer the teacher's weights come from (hashed).", component=True
    )
    tokenizer: Any = setting(
        help="The data's (student's) tokenizer `_component_`, as in the KD config.", component=True
    )
    dataset: Any = setting(
        help="Training dataset `_component_` (or list), exactly as in the KD config.", component=True
    )
    val_dataset: Any = setting(
        None, help="Validation dataset `_component_`, as in the KD config; cached too.", component=True
    )
    val_split_ratio: float = setting(
        0.0, help="Held-out fraction of `dataset`, as in the KD config; cached too.", ge=0.0, lt=1.0
    )
    seed: int = setting(42, help="The KD config's seed (it seeds the validation split).")
    top_k: int = setting(64, help="Teacher entries kept per trained position.", ge=1)
    temperature: float = setting(
        1.0, help="T of the stored log-probs and logZ; the KD run must use the same T.", gt=0.0
    )
    vocab_size: int | None = setting(
        None,
        help="Normalise over the teacher's first N logits (the student's vocab size when the teacher's output is "
        "padded larger); null = the teacher's whole output.",
        ge=1,
    )
    value_kind: Literal["logprobs", "logits"] = setting("logprobs", help="Store top-k log-probs at T, or raw logits.")
    value_dtype: Literal["bf16", "fp32"] = setting(
        "bf16", help="Storage dtype of the values (ids are int32, logZ fp32)."
    )
    batch_size: int = setting(8, help="Dataset items per teacher forward pass.", ge=1)
    items_per_shard: int = setting(1024, help="Dataset items per shard file (the unit of resuming).", ge=1)
    output_chunk_size: int = setting(1024, help="Positions per output-projection chunk (memory at large vocab).", ge=1)
    hash_teacher_weights: bool = setting(True, help="sha256 the teacher's weight files into the manifest.")
    device: str = setting("auto", help="auto, cpu, cuda (under torchrun: cuda = cuda:LOCAL_RANK).")
    dtype: str = setting("bf16", help="Teacher dtype: bf16 or fp32 (the output projection runs in fp32).")
    resume_from_checkpoint: bool = setting(False, help="Continue an interrupted cache in output_dir (same settings).")
