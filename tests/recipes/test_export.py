"""``kdtune export``: a resume checkpoint written as HF (+ PEFT) files equal to the run's final/ at that step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from kdtune.errors import CheckpointError
from kdtune.training.export import export_checkpoint

LORA_STUDENT = ("+model.lora_attn_modules=[q_proj,v_proj]", "+model.lora_rank=8", "+model.lora_alpha=16")


def _same_files(a: Path, b: Path) -> None:
    """Every file of ``a`` equals ``b``'s byte for byte; the model cards differ only in their title."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "README.md":
            meta_a, meta_b = (yaml.safe_load((d / name).read_text().split("---\n")[1]) for d in (a, b))
            assert meta_a == meta_b
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_export_of_last_step_equals_final(tiny, tiny_cfg, recipe, tmp_path: Path) -> None:
    out = tmp_path / "kd"
    recipe("knowledge_distillation_single_device").train(
        tiny_cfg("kd", out, "max_steps=4", "save_every_n_steps=2", "eval_every_n_steps=2")
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    result = export_checkpoint(out / "checkpoints" / "step_00000004", tmp_path / "export")
    assert result.step == 4 and result.written == [tmp_path / "export" / "final"]
    _same_files(out / "final", tmp_path / "export" / "final")
    meta = yaml.safe_load((tmp_path / "export" / "final" / "README.md").read_text().split("---\n")[1])
    assert meta["kdtune"]["steps"] == 4 and "val_loss" in meta["kdtune"]["metrics"]

    # an earlier step by number through the CLI: loads in transformers, with the logits of kdtune's model
    from kdtune.cli.main import main
    from kdtune.models import load_hf_model

    transformers = pytest.importorskip("transformers")
    assert main(["export", str(out / "checkpoints" / "2"), "--output-dir", str(tmp_path / "step2")]) == 0
    final2 = tmp_path / "step2" / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final2), torch_dtype=torch.float32).eval()
    ours = load_hf_model(final2).eval()
    tokens = torch.randint(0, ours.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() < 1e-4
    assert (final2 / "model.safetensors").read_bytes() != (out / "final" / "model.safetensors").read_bytes()


def test_export_of_lora_checkpoint_equals_final_and_adapter(tiny_cfg, recipe, tmp_path: Path) -> None:
    out = tmp_path / "kd_lora"
    recipe("knowledge_distillation_single_device").train(
        tiny_cfg("kd", out, *LORA_STUDENT, "max_steps=2", "save_every_n_steps=2")
    )
    result = export_checkpoint(out / "checkpoints" / "step_00000002", tmp_path / "export")
    assert sorted(p.name for p in result.written) == ["final", "final_adapter"]
    _same_files(out / "final", tmp_path / "export" / "final")
    _same_files(out / "final_adapter", tmp_path / "export" / "final_adapter")


def test_export_errors_are_one_clear_line(tiny_cfg, recipe, tmp_path: Path) -> None:
    out = tmp_path / "full"
    recipe("full_finetune_single_device").train(tiny_cfg("full", out, "max_steps=2", "save_every_n_steps=1"))
    ckpts = out / "checkpoints"
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 7 in .*available: step_00000001, step_00000002"):
        export_checkpoint(ckpts / "step_00000007", tmp_path / "x")
    with pytest.raises(CheckpointError, match=r"is a run directory: name one of its checkpoints.*step_00000002"):
        export_checkpoint(out, tmp_path / "x")
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: pass <run_dir>/checkpoints/step_N"):
        export_checkpoint(out / "final", tmp_path / "x")
    bare = tmp_path / "no_ckpts"
    recipe("full_finetune_single_device").train(tiny_cfg("full", bare, "max_steps=1", "save_every_n_steps=null"))
    shutil.rmtree(bare / "checkpoints", ignore_errors=True)  # an epoch end would have saved one
    for path in (bare, bare / "checkpoints" / "step_00000001"):
        with pytest.raises(CheckpointError, match="(without|has no) checkpoints"):
            export_checkpoint(path, tmp_path / "x")
    from kdtune.cli.main import main

    assert main(["export", str(ckpts / "9"), "--output-dir", str(tmp_path / "x")]) == 1
