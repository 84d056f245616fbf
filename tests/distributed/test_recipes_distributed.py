"""The distributed recipes end to end on 2 CPU processes (gloo) vs the single-device recipes with the same global batch.

Same global batch: the tiny *_distributed configs use batch_size 2 per process, the single-device ones batch_size 4;
``ResumableSampler`` gives each step the same 4 examples in both cases. Tolerances: losses and gradient norms agree to
1e-5 (float32 sums in a different order: the measured differences are ~3e-7), final weights to 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
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
REPO, tiny_overrides, torchrun = _h.REPO, _h.tiny_overrides, _h.torchrun

pytestmark = pytest.mark.slow
WORKER = Path(__file__).parent / "_recipe_worker.py"
TOL = 1e-5


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(kind: str, paths: dict[str, Path], out: Path, *extra: str):
    teacher = "teacher" if kind.startswith("kd") else None
    cfg = load_config(REPO / "configs" / "tiny" / f"{kind}.yaml")
    return apply_overrides(cfg, [*tiny_overrides(paths, out, teacher=teacher), *extra])


def _run_2proc(recipe: str, kind: str, paths: dict[str, Path], out: Path, *extra: str) -> dict:
    result = out.parent / f"{out.name}.json"
    teacher = "teacher" if kind.startswith("kd") else None
    args = [*tiny_overrides(paths, out, teacher=teacher), *extra]
    torchrun(WORKER, recipe, str(result), "--config", str(REPO / "configs" / "tiny" / f"{kind}.yaml"), *args)
    return json.loads(result.read_text())


def _run_single(recipe: str, kind: str, paths: dict[str, Path], out: Path, *extra: str) -> dict:
    summary = _recipe(recipe).train(_config(kind, paths, out, *extra))
    return {"steps": summary.steps, "evals": summary.evals}


def _assert_same_steps(a: list[dict], b: list[dict], keys=("loss", "class_loss", "kd_loss", "grad_norm")) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        assert ma["num_tokens"] == mb["num_tokens"]  # global token count, not rank 0's
        for k in keys:
            if ma.get(k) is not None and mb.get(k) is not None:
                assert abs(ma[k] - mb[k]) < TOL, (k, ma, mb)


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


# ------------------------------------------------------------------------------------------------ knowledge distillation
@pytest.fixture(scope="module")
def kd_runs(dist_tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("kd")
    dist = _run_2proc("knowledge_distillation_distributed", "kd_distributed", dist_tiny, root / "dist")
    single = _run_single("knowledge_distillation_single_device", "kd", dist_tiny, root / "single")
    return {"root": root, "dist": dist, "single": single}


def test_kd_2proc_equals_single_device(kd_runs: dict) -> None:
    dist, single = kd_runs["dist"], kd_runs["single"]
    assert len(dist["steps"]) == 6
    _assert_same_steps(dist["steps"], single["steps"])
    assert len(dist["evals"]) == len(single["evals"]) == 2
    for ea, eb in zip(dist["evals"], single["evals"]):
        assert ea["val_tokens"] == eb["val_tokens"]  # every validation example once over the 2 ranks
        assert abs(ea["val_loss"] - eb["val_loss"]) < TOL
    root = kd_runs["root"]
    assert _max_weight_diff(root / "dist" / "final", root / "single" / "final") < TOL


def test_kd_resume_is_exact(kd_runs: dict, dist_tiny: dict[str, Path]) -> None:
    root = kd_runs["root"]
    resumed = root / "resumed"
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    shutil.copytree(root / "dist" / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    assert not (resumed / "checkpoints" / "step_3.tmp").exists()
    out = _run_2proc(
        "knowledge_distillation_distributed", "kd_distributed", dist_tiny, resumed, "resume_from_checkpoint=true"
    )
    assert [m["step"] for m in out["steps"]] == [4, 5, 6]
    _assert_same_steps(out["steps"], kd_runs["dist"]["steps"][3:])
    for ma, mb in zip(out["steps"], kd_runs["dist"]["steps"][3:]):
        assert abs(ma["loss"] - mb["loss"]) < 1e-6 and ma["lr"] == mb["lr"]
    assert _max_weight_diff(resumed / "final", root / "dist" / "final") < 1e-6


def test_kd_final_checkpoint_loads_in_transformers(kd_runs: dict) -> None:
    transformers = pytest.importorskip("transformers")
    from kdtune.models import load_hf_model

    final = kd_runs["root"] / "dist" / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final), torch_dtype=torch.float32).eval()
    ours = load_hf_model(final).eval()
    tokens = torch.randint(0, ours.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < 1e-4


def test_kd_vocab_mismatch_is_a_clear_error(dist_tiny: dict[str, Path], tmp_path: Path) -> None:
    """Same rule as single device, checked in a one-process world (no torchrun needed)."""
    from kdtune.errors import KDTuneError

    cfg = _config("kd_distributed", dist_tiny, tmp_path / "out")
    cfg = apply_overrides(cfg, [f"teacher_checkpointer.checkpoint_dir={dist_tiny['other_teacher']}"])
    with pytest.raises(KDTuneError, match="(?i)vocab|tokeniz"):
        _recipe("knowledge_distillation_distributed").train(cfg)


def test_cpu_offload_on_cpu_is_a_clear_error(dist_tiny: dict[str, Path], tmp_path: Path) -> None:
    from kdtune.errors import ConfigError

    cfg = _config("full_distributed", dist_tiny, tmp_path / "out", "fsdp_cpu_offload=true")
    with pytest.raises(ConfigError, match="fsdp_cpu_offload"):
        _recipe("full_finetune_distributed").train(cfg)


# --------------------------------------------------------------------------------------------------- full fine-tuning
def test_full_2proc_via_kdtune_run_equals_single_device(dist_tiny: dict[str, Path], tmp_path: Path) -> None:
    """Launched the way users do: ``kdtune run --nproc_per_node 2 full_finetune_distributed --config ...``."""
    import os
    import subprocess
    import sys

    out = tmp_path / "dist"
    extra = ["max_steps=3", "save_every_n_steps=null", "eval_every_n_steps=null"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "kdtune.cli.main", "run", "--nproc_per_node", "2", "full_finetune_distributed"]
    cmd += ["--config", "tiny/full_distributed", *tiny_overrides(dist_tiny, out, teacher=None), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    logged = [json.loads(line) for f in sorted((out / "logs").glob("*.jsonl")) for line in f.read_text().splitlines()]
    steps = [m for m in logged if "loss" in m]
    single = _run_single("full_finetune_single_device", "full", dist_tiny, tmp_path / "single", *extra)
    _assert_same_steps(steps, single["steps"], keys=("loss", "grad_norm"))
    assert _max_weight_diff(out / "final", tmp_path / "single" / "final") < TOL


# ----------------------------------------------------------------------------------------------------------------- LoRA
def test_lora_2proc_equals_single_device_and_adapter_loads_in_peft(dist_tiny: dict[str, Path], tmp_path: Path) -> None:
    extra = ["max_steps=3", "save_every_n_steps=null", "eval_every_n_steps=null"]
    dist = _run_2proc("lora_finetune_distributed", "lora_distributed", dist_tiny, tmp_path / "dist", *extra)
    single = _run_single("lora_finetune_single_device", "lora", dist_tiny, tmp_path / "single", *extra)
    _assert_same_steps(dist["steps"], single["steps"], keys=("loss", "grad_norm"))
    assert _max_weight_diff(tmp_path / "dist" / "final", tmp_path / "single" / "final") < TOL
    assert _max_weight_diff(tmp_path / "dist" / "final_adapter", tmp_path / "single" / "final_adapter") < TOL

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(dist_tiny["student"]), torch_dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "dist" / "final_adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dist" / "final")).eval()
    tokens = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (with_adapter(tokens).logits - merged(tokens).logits).abs().max().item()
    assert diff < 1e-4
