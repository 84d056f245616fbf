"""The shipped distributed configs: valid, read by their recipe's settings, models buildable (on meta) and compatible."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdtune.config import apply_overrides, instantiate, load_config, read_settings, validate
from kdtune.errors import ConfigError
from kdtune.training import check_vocab_compatibility
from kdtune.training import settings as S

SETTINGS = {
    "knowledge_distillation_distributed": S.KDDistributedSettings,
    "lora_finetune_distributed": S.LoRAFinetuneDistributedSettings,
    "full_finetune_distributed": S.FinetuneDistributedSettings,
}
CONFIGS = {
    "llama3_2/kd_distributed": "knowledge_distillation_distributed",
    "llama3_2/knowledge_distillation_distributed": "knowledge_distillation_distributed",
    "llama3_1/70B_to_8B_kd_distributed": "knowledge_distillation_distributed",
    "qwen2_5/kd_distributed": "knowledge_distillation_distributed",
    "llama2/kd_distributed": "knowledge_distillation_distributed",
    "llama3_1/8B_lora": "lora_finetune_distributed",
    "llama2/7B_full": "full_finetune_distributed",
    "tiny/kd_distributed": "knowledge_distillation_distributed",
    "tiny/lora_distributed": "lora_finetune_distributed",
    "tiny/full_distributed": "full_finetune_distributed",
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_is_valid_and_read_by_its_recipe(name: str) -> None:
    cfg = load_config(name)
    assert cfg.recipe == CONFIGS[name]
    assert validate(cfg) == []
    settings = read_settings(SETTINGS[cfg.recipe], cfg)
    assert settings.fsdp_cpu_offload is False and settings.fsdp_reshard_after_forward is True


def test_misspelt_fsdp_key_is_refused() -> None:
    cfg = apply_overrides(load_config("tiny/kd_distributed"), ["+fsdp_cpu_ofload=true"])
    with pytest.raises(ConfigError, match="fsdp_cpu_ofload"):
        read_settings(S.KDDistributedSettings, cfg)


def test_torchtune_named_alias_loads_the_same_config() -> None:
    a, b = (load_config(n) for n in ("llama3_2/kd_distributed", "llama3_2/knowledge_distillation_distributed"))
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)


@pytest.mark.parametrize("name", [n for n, r in CONFIGS.items() if r.startswith("knowledge") and "tiny" not in n])
def test_kd_config_student_and_teacher_build_on_meta_and_share_a_vocab(name: str) -> None:
    """Builds the real architectures (up to 70B) on the meta device: no memory, but every shape and builder checked."""
    cfg = load_config(name)
    with torch.device("meta"):
        student, teacher = instantiate(cfg.model), instantiate(cfg.teacher_model)
    assert len(student.layers) > 0 and len(teacher.layers) >= len(student.layers)
    common = check_vocab_compatibility(student.vocab_size, teacher.vocab_size, None, None)
    assert common == min(student.vocab_size, teacher.vocab_size)
