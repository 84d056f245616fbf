"""On-policy KD through the single-device KD recipe: lmbda=0 is supervised KD exactly, resume is exact with sampled
batches (the sampling RNG is in the checkpoint), and full / LoRA / QLoRA students train on their own samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

LORA = ["+model.lora_attn_modules=[q_proj,v_proj]", "+model.lora_rank=4", "+model.lora_alpha=8"]
ON_POLICY = "+on_policy={lmbda: 0.5, max_new_tokens: 6, temperature: 1.0, top_k: 20}"
KEYS = ("loss", "class_loss", "kd_loss", "grad_norm", "num_tokens")


def test_lmbda_zero_equals_supervised_kd(tiny_cfg, recipe, tmp_path: Path) -> None:
    kd = recipe("knowledge_distillation_single_device")
    a = kd.train(tiny_cfg("kd", tmp_path / "a", "max_steps=3"))
    b = kd.train(tiny_cfg("kd", tmp_path / "b", "max_steps=3", "+on_policy={lmbda: 0.0}"))
    for key in KEYS:
        assert [s[key] for s in a.steps] == [s[key] for s in b.steps], key
    assert a.evals == b.evals


@pytest.mark.parametrize("student", ["full", "lora"])
def test_on_policy_resume_is_exact(tiny_cfg, recipe, tmp_path: Path, student: str) -> None:
    """lmbda=0.5 with sampling: resuming from step 2 reproduces steps 3-4 and the final weights bit for bit."""
    kd = recipe("knowledge_distillation_single_device")
    common = [ON_POLICY, "max_steps=4", "save_every_n_steps=2", "keep_last_n_checkpoints=3", "eval_every_n_steps=null",
              *(LORA if student == "lora" else [])]  # fmt: skip
    out = tmp_path / "run"
    straight = kd.train(tiny_cfg("kd", out, *common))
    # the sampled batches differ from the dataset's: token counts are not those of supervised KD
    sup = kd.train(tiny_cfg("kd", tmp_path / "sup", *common[1:]))
    assert [s["num_tokens"] for s in straight.steps] != [s["num_tokens"] for s in sup.steps]
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000004")
    for d in ("final", "final_adapter"):
        shutil.rmtree(resumed_dir / d, ignore_errors=True)
    assert (resumed_dir / "checkpoints" / "step_00000002" / "components.pt").is_file()
    resumed = kd.train(tiny_cfg("kd", resumed_dir, *common, "resume_from_checkpoint=true"))
    assert [s["step"] for s in resumed.steps] == [3, 4]
    for key in KEYS:
        assert [s[key] for s in resumed.steps] == [s[key] for s in straight.steps[2:]], key
    name = "final_adapter/adapter_model.safetensors" if student == "lora" else "final/model.safetensors"
    wa, wb = load_file(out / name), load_file(resumed_dir / name)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_qlora_student_and_seq_kd(tiny, tiny_cfg, recipe, tmp_path: Path) -> None:
    kd = recipe("knowledge_distillation_single_device")
    summary = kd.train(
        tiny_cfg("kd", tmp_path / "q", *LORA, "+model.quantize_base=true", "max_steps=2",
                 "+on_policy={lmbda: 1.0, max_new_tokens: 4, temperature: 0.0}")
    )  # fmt: skip
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in summary.steps)
    summary = kd.train(tiny_cfg("kd", tmp_path / "s", "max_steps=2", "+on_policy={seq_kd: true, max_new_tokens: 4}"))
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in summary.steps)


def test_invalid_on_policy_key_is_refused(tiny_cfg, recipe, tmp_path: Path) -> None:
    from kdtune.errors import ConfigError

    kd = recipe("knowledge_distillation_single_device")
    with pytest.raises(ConfigError, match="on_policy.lmbda"):
        kd.train(tiny_cfg("kd", tmp_path / "x", "max_steps=1", "+on_policy={lmbda: 2.0}"))
    with pytest.raises(ConfigError, match="on_policy.lamda"):
        kd.train(tiny_cfg("kd", tmp_path / "y", "max_steps=1", "+on_policy={lamda: 0.5}"))
