"""Encoder-decoder KD and fp16 mixed precision under FSDP2 on 2 CPU processes (gloo) vs the single-device recipe.

One torchrun launch runs: tiny T5 KD in fp32 (4 steps, global batch 4 = 2 per process), the same in fp16 (4 steps,
checkpoint at step 2) and the fp16 run resumed from its step-2 DCP checkpoint. The fp32 run equals the single-device
run (losses, gradient norms and final weights to 1e-5); the resumed fp16 run equals the straight one, loss scale and
skipped steps included (the scaler's state travels in the sharded checkpoint).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kdtune.config import apply_overrides, load_config


def _load_helpers():
    spec = importlib.util.spec_from_file_location("_kdtune_dist_helpers", Path(__file__).parent / "_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_h = _load_helpers()
REPO, torchrun = _h.REPO, _h.torchrun
pytestmark = pytest.mark.slow
WORKER = Path(__file__).parent / "_recipe_worker.py"
CONFIG = REPO / "configs" / "tiny" / "kd_t5.yaml"
TOL = 1e-5
STEPS = ("max_steps=4", "save_every_n_steps=2", "eval_every_n_steps=2", "val_split_ratio=0.1")
# torch.optim.Adafactor (the tiny config's) cannot step DTensor parameters in torch 2.13 (an in-place pow_ on a partial
# norm): the sharded runs use AdamW, and so does the single-device reference
ADAMW = ("optimizer=torch.optim.AdamW", "optimizer.lr=3e-3", "+optimizer.weight_decay=0.0")


def _overrides(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"checkpointer.checkpoint_dir={assets['t5_student']}",
        f"teacher_checkpointer.checkpoint_dir={assets['t5_teacher']}",
        f"dataset.data_files={assets['seq2seq_data']}",
        *STEPS,
        *ADAMW,
        *extra,
    ]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from kdtune.testing.tiny import make_tiny_assets

    root = tmp_path_factory.mktemp("seq2seq_dist")
    assets = make_tiny_assets(root / "tiny")
    kd = "knowledge_distillation_distributed"
    per_rank = ("batch_size=2",)  # x 2 processes = the single-device batch of 4

    def job(name: str, *extra: str, copy=None) -> dict:
        argv = ["--config", str(CONFIG), *_overrides(assets, root / name, *per_rank, *extra)]
        return {"recipe": kd, "result": str(root / f"{name}.json"), "argv": argv, "copy": copy}

    ckpt = "checkpoints/step_2"
    jobs = [
        job("fp32", "dtype=fp32"),
        job("fp16", "dtype=fp16"),
        job("fp16_resumed", "dtype=fp16", "resume_from_checkpoint=true",
            copy=[str(root / "fp16" / ckpt), str(root / "fp16_resumed" / ckpt)]),
    ]  # fmt: skip
    (root / "jobs.json").write_text(json.dumps(jobs))
    torchrun(WORKER, str(root / "jobs.json"))
    out = {"root": root, **{n: json.loads((root / f"{n}.json").read_text()) for n in ("fp32", "fp16", "fp16_resumed")}}
    spec = importlib.util.spec_from_file_location(
        "_kd_recipe", REPO / "recipes" / "knowledge_distillation_single_device.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = apply_overrides(load_config(CONFIG), _overrides(assets, root / "single", "dtype=fp32", "batch_size=4"))
    summary = recipe.train(cfg)
    out["single"] = {"steps": summary.steps, "evals": summary.evals}
    return out


def test_t5_kd_2proc_equals_single_device(runs: dict) -> None:
    dist, single = runs["fp32"], runs["single"]
    assert [m["step"] for m in dist["steps"]] == [m["step"] for m in single["steps"]] == [1, 2, 3, 4]
    for a, b in zip(dist["steps"], single["steps"]):
        assert a["num_tokens"] == b["num_tokens"]
        for key in ("loss", "class_loss", "kd_loss", "grad_norm"):
            assert abs(a[key] - b[key]) < TOL, (key, a, b)
    for a, b in zip(dist["evals"], single["evals"]):
        assert a["val_tokens"] == b["val_tokens"] and abs(a["val_loss"] - b["val_loss"]) < TOL
    wa, wb = _weights(runs["root"] / "fp32" / "final"), _weights(runs["root"] / "single" / "final")
    assert sorted(wa) == sorted(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < TOL


def test_fp16_sharded_resume_restores_the_scaler(runs: dict) -> None:
    straight, resumed = runs["fp16"]["steps"], runs["fp16_resumed"]["steps"]
    assert straight[0]["skipped_steps"] >= 1  # the scale moved before the checkpoint: a fresh scaler would differ
    assert [m["step"] for m in resumed] == [3, 4]
    for key in ("loss", "class_loss", "kd_loss", "grad_norm", "loss_scale", "skipped_steps", "lr"):
        assert [m[key] for m in resumed] == [m[key] for m in straight[2:]], key
    wa, wb = _weights(runs["root"] / "fp16" / "final"), _weights(runs["root"] / "fp16_resumed" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
