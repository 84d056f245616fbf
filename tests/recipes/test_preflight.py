"""The missing-weights error names every missing checkpoint (student and teacher, checked together before either is
loaded) and the command that produces each."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdtune.config import find_config, load_config
from kdtune.errors import CheckpointError
from kdtune.training import preflight, setup_runtime


def test_shipped_kd_config_names_the_download_and_the_teacher_fine_tune(tmp_path: Path) -> None:
    cfg = load_config(find_config("llama3_2/kd"))
    student, teacher = cfg.checkpointer.checkpoint_dir, cfg.teacher_checkpointer.checkpoint_dir
    if Path(student).exists() or Path(teacher).exists():
        pytest.skip("the real checkpoints are on this machine")
    cfg.output_dir = str(tmp_path / "out")
    with pytest.raises(CheckpointError) as info:
        setup_runtime("cpu", "fp32", cfg.output_dir, 0, cfg=cfg)
    msg = str(info.value)
    assert msg.startswith(
        "missing model weights: checkpointer.checkpoint_dir '/tmp/Llama-3.2-1B-Instruct' does not exist"
    )
    assert (
        "(get it with `kdtune download meta-llama/Llama-3.2-1B-Instruct --output-dir /tmp/Llama-3.2-1B-Instruct" in msg
    )
    assert (
        f"teacher_checkpointer.checkpoint_dir '{teacher}' does not exist (get it with "
        "`kdtune run lora_finetune_single_device --config llama3_1/8B_lora_single_device`)"
    ) in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()  # refused before anything was written


def test_tiny_files_come_from_make_tiny_and_present_dirs_pass(tmp_path: Path, monkeypatch, tiny) -> None:
    monkeypatch.setattr(preflight, "DEFAULT_TINY_DIR", str(tmp_path / "tiny"))
    (tmp_path / "empty").mkdir()
    cfg = OmegaConf.create(
        {
            "checkpointer": {"_component_": "kdtune.models.HFCheckpointer", "checkpoint_dir": str(tmp_path / "tiny/s")},
            "teacher_checkpointer": {
                "_component_": "kdtune.models.HFCheckpointer",
                "checkpoint_dir": str(tmp_path / "empty"),
            },
            "other": {"_component_": "x.Y", "checkpoint_dir": "/nowhere"},  # not a checkpointer
        }
    )
    with pytest.raises(CheckpointError) as info:
        preflight.check_checkpoint_dirs(cfg)
    msg = str(info.value)
    assert f"checkpointer.checkpoint_dir '{tmp_path / 'tiny/s'}' does not exist (get it with `kdtune make-tiny`)" in msg
    assert f"teacher_checkpointer.checkpoint_dir '{tmp_path / 'empty'}' has no config.json" in msg
    assert "/nowhere" not in msg
    cfg.checkpointer.checkpoint_dir = str(tiny["student"])
    cfg.teacher_checkpointer.checkpoint_dir = str(tiny["teacher"])
    preflight.check_checkpoint_dirs(cfg)
    cfg.teacher_checkpointer.checkpoint_dir = None  # random init: nothing to check
    preflight.check_checkpoint_dirs(cfg)
