"""Every constrained field of the recipe settings refuses a bad value where the settings are read (one line naming the
key, the value and what is allowed), and `kdtune validate`'s check finds the same problems."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kdtune.config import check_settings, read_settings
from kdtune.data.teacher_cache_settings import CacheTeacherLogitsSettings
from kdtune.errors import ConfigError
from kdtune.training.settings import GenerateSettings, KDDistributedSettings, KDSettings

COMPONENT = {"_component_": "x.y"}
KD_BASE = {
    **{k: COMPONENT for k in ("model", "tokenizer", "checkpointer", "dataset", "optimizer", "kd_loss")},
    "output_dir": "/tmp/out",
}
GEN_BASE = {
    **{k: COMPONENT for k in ("model", "tokenizer", "checkpointer")},
    "prompts": {"source": "json"},
    "output_dir": "/tmp/out",
}

KD_BAD = [
    ("batch_size", 0, "allowed is >= 1"),
    ("gradient_accumulation_steps", 0, "allowed is >= 1"),
    ("epochs", 0, "allowed is >= 1"),
    ("log_every_n_steps", 0, "allowed is >= 1"),
    ("keep_last_n_checkpoints", 0, "allowed is >= 1"),
    ("max_steps", 0, "allowed is >= 1, or null"),
    ("max_steps", -3, "allowed is >= 1, or null"),
    ("max_steps_per_epoch", 0, "allowed is >= 1, or null"),
    ("eval_every_n_steps", 0, "allowed is >= 1, or null"),
    ("save_every_n_steps", 0, "allowed is >= 1, or null"),
    ("max_eval_batches", 0, "allowed is >= 1, or null"),
    ("num_output_chunks", 0, "allowed is >= 1"),
    ("clip_grad_norm", -1.0, "allowed is > 0, or null"),
    ("clip_grad_norm", 0, "allowed is > 0, or null"),
    ("val_split_ratio", 1.0, "allowed is >= 0.0 and < 1.0"),
    ("val_split_ratio", -0.1, "allowed is >= 0.0 and < 1.0"),
    ("num_workers", -1, "allowed is >= 0"),
    ("seed", -1, "allowed is >= 0"),
    ("output_dir", "", "is empty"),
    ("output_dir", "  ", "is empty"),
    ("dtype", "int8", "use dtype=fp32, dtype=bf16 or dtype=fp16 (mixed precision)"),
    ("device", "gpu0", "not a valid device"),
    ("kd_ratio", 1.5, "allowed is >= 0.0 and <= 1.0"),
    ("kd_ratio", -0.1, "allowed is >= 0.0 and <= 1.0"),
    ("temperature", 0, "allowed is > 0.0"),
    ("temperature", -2.0, "allowed is > 0.0"),
]


@pytest.mark.parametrize("settings_cls", [KDSettings, KDDistributedSettings])
@pytest.mark.parametrize(("key", "value", "allowed"), KD_BAD)
def test_training_settings_refuse_bad_values(settings_cls, key: str, value, allowed: str) -> None:
    cfg = OmegaConf.create({**KD_BASE, key: value})
    with pytest.raises(ConfigError, match=f"^{key}=") as info:
        read_settings(settings_cls, cfg)
    assert allowed in str(info.value) and "\n" not in str(info.value)
    assert len(check_settings(settings_cls, cfg)) == 1


GEN_BAD = [
    ("num_generations", 0, ">= 1"),
    ("max_prompt_tokens", 0, ">= 1"),
    ("max_new_tokens", 0, ">= 1"),
    ("temperature", -0.5, ">= 0.0"),
    ("top_k", 0, ">= 1, or null"),
    ("batch_size", 0, ">= 1"),
    ("seed", -1, ">= 0"),
    ("output_dir", "", "is empty"),
    ("dtype", "fp16", "fp16 is mixed precision (fp32 weights, fp16 autocast, loss scaling) of the training recipes"),
    ("device", "tpu:x", "not a valid device"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), GEN_BAD)
def test_generate_settings_refuse_bad_values(key: str, value, allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}=") as info:
        read_settings(GenerateSettings, OmegaConf.create({**GEN_BASE, key: value}))
    assert allowed in str(info.value)
    with pytest.raises(ConfigError, match=r"^prompts\.max_prompts=0 is out of range"):
        read_settings(GenerateSettings, OmegaConf.create({**GEN_BASE, "prompts": {"source": "json", "max_prompts": 0}}))


CACHE_BASE = {
    **{k: COMPONENT for k in ("teacher_model", "teacher_checkpointer", "tokenizer", "dataset")},
    "output_dir": "/tmp/cache",
}
CACHE_BAD = [
    ("top_k", 0, ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("items_per_shard", 0, ">= 1"),
    ("output_chunk_size", 0, ">= 1"),
    ("vocab_size", 0, ">= 1, or null"),
    ("temperature", 0, "> 0.0"),
    ("val_split_ratio", 1.0, ">= 0.0 and < 1.0"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), CACHE_BAD)
def test_cache_settings_refuse_bad_values(key: str, value, allowed: str) -> None:
    """cache_teacher_logits: refused where the settings are read, so `kdtune run` refuses before torchrun starts."""
    with pytest.raises(ConfigError, match=f"^{key}=") as info:
        read_settings(CacheTeacherLogitsSettings, OmegaConf.create({**CACHE_BASE, key: value}))
    assert allowed in str(info.value)


def test_null_switches_features_off_and_defaults_pass() -> None:
    nulls = {k: None for k in ("max_steps", "max_steps_per_epoch", "eval_every_n_steps", "save_every_n_steps")}
    s = read_settings(
        KDSettings, OmegaConf.create({**KD_BASE, **nulls, "clip_grad_norm": None, "max_eval_batches": None})
    )
    assert s.max_steps is None and s.clip_grad_norm is None
    assert read_settings(KDSettings, OmegaConf.create({**KD_BASE, "kd_ratio": 1, "temperature": 0.5})).kd_ratio == 1.0
    for device in ("auto", "cpu", "cuda", "cuda:1"):  # a syntax check only: availability is the run's business
        assert read_settings(KDSettings, OmegaConf.create({**KD_BASE, "device": device})).device == device
    read_settings(GenerateSettings, OmegaConf.create(GEN_BASE))
