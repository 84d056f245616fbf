"""The distributed recipes end to end on 2 CPU processes (gloo) vs the single-device recipes with the same global batch.

Same global batch: the tiny *_distributed configs use batch_size 2 per process, the single-device ones batch_size 4;
``ResumableSampler`` gives each step the same 4 examples in both cases. Tolerances: losses and gradient norms agree to
1e-5 (float32 sums in a different order: the measured differences are ~3e-7), final weights to 1e-5.
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
REPO, tiny_overrides, torchrun = _h.REPO, _h.tiny_overrides, _h.torchrun

pytestmark = pytest.mark.slow
WORKER = Path(__file__).parent / "_recipe_worker.py"
TOL = 1e-5
KD_STEPS = ("max_steps=4", "save_every_n_steps=2", "eval_every_n_steps=2")  # resume from step 2, eval twice
SHORT = ("max_steps=2", "save_every_n_steps=null", "eval_every_n_steps=null")
LORA_EXTRA = ("enable_activation_checkpointing=true",)  # recompute per layer under FSDP (and on one device)


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(kind: str, paths: dict[str, Path], out: Path, *extra: str):
    teacher = "teacher" if kind.startswith("kd") else None
    cfg = load_config(REPO / "configs" / "tiny" / f"{kind}.yaml")
    return apply_overrides(cfg, [*tiny_overrides(paths, out, teacher=teacher), *extra])


def _job(recipe: str, kind: str, paths: dict[str, Path], out: Path, *extra: str, copy=None) -> dict:
    teacher = "teacher" if kind.startswith("kd") else None
    argv = ["--config", str(REPO / "configs" / "tiny" / f"{kind}.yaml"), *tiny_overrides(paths, out, teacher=teacher)]
    result = out.parent / f"{out.name}.json"
    return {"recipe": recipe, "result": str(result), "argv": [*argv, *extra], "copy": copy}


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


# ------------------------------------------------------------------------------------------------ one torchrun launch
@pytest.fixture(scope="module")
def runs(dist_tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-process launch running: KD (4 steps), KD resumed from its step-2 checkpoint, LoRA (2 steps)."""
    root = tmp_path_factory.mktemp("runs")
    kd = "knowledge_distillation_distributed"
    jobs = [
        _job(kd, "kd_distributed", dist_tiny, root / "kd", *KD_STEPS),
        _job(kd, "kd_distributed", dist_tiny, root / "kd_resumed", *KD_STEPS, "resume_from_checkpoint=true",
             copy=[str(root / "kd" / "checkpoints" / "step_2"), str(root / "kd_resumed" / "checkpoints" / "step_2")]),
        _job("lora_finetune_distributed", "lora_distributed", dist_tiny, root / "lora", *SHORT, *LORA_EXTRA,
             "save_every_n_steps=2"),  # a sharded adapter checkpoint for `kdtune export`
        _job("full_finetune_distributed", "full_distributed", dist_tiny, root / "full", *SHORT),
    ]  # fmt: skip
    (root / "jobs.json").write_text(json.dumps(jobs))
    torchrun(WORKER, str(root / "jobs.json"))
    out = {"root": root}
    for name in ("kd", "kd_resumed", "lora", "full"):
        out[name] = json.loads((root / f"{name}.json").read_text())
    out["kd_single"] = _run_single(
        "knowledge_distillation_single_device", "kd", dist_tiny, root / "kd_single", *KD_STEPS
    )
    out["lora_single"] = _run_single(
        "lora_finetune_single_device",
        "lora",
        dist_tiny,
        root / "lora_single",
        *SHORT,
        "enable_activation_checkpointing=true",
    )
    return out


# ------------------------------------------------------------------------------------------------ golden figures
def _golden_module():
    spec = importlib.util.spec_from_file_location("_kdtune_golden", REPO / "tests" / "golden" / "_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distributed_runs_match_golden(runs: dict) -> None:
    """The 2-process KD, LoRA and full runs reproduce tests/golden/golden_distributed.json (a refactor changes no
    number). ``KDTUNE_GOLDEN_RECORD=1`` rewrites the file; ``KDTUNE_GOLDEN_EXACT=1`` also compares weight SHA-256s."""
    import os

    G = _golden_module()
    got = {
        name: G.summarise(runs[name]["steps"], runs[name]["evals"], runs["root"] / name)
        for name in ("kd", "lora", "full")
    }
    if os.environ.get("KDTUNE_GOLDEN_RECORD") == "1":
        G.GOLDEN_DISTRIBUTED.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(G.GOLDEN_DISTRIBUTED.read_text())
    assert sorted(want) == sorted(got)
    for name in got:
        G.assert_matches(
            got[name], want[name], f"distributed {name}", exact=os.environ.get("KDTUNE_GOLDEN_EXACT") == "1"
        )


# ------------------------------------------------------------------------------------------------ knowledge distillation
def test_kd_2proc_equals_single_device(runs: dict) -> None:
    dist, single = runs["kd"], runs["kd_single"]
    assert len(dist["steps"]) == 4
    _assert_same_steps(dist["steps"], single["steps"])
    assert len(dist["evals"]) == len(single["evals"]) == 2
    for ea, eb in zip(dist["evals"], single["evals"]):
        assert ea["val_tokens"] == eb["val_tokens"]  # every validation example once over the 2 ranks
        assert abs(ea["val_loss"] - eb["val_loss"]) < TOL
    root = runs["root"]
    assert _max_weight_diff(root / "kd" / "final", root / "kd_single" / "final") < TOL


def test_kd_resume_is_exact(runs: dict) -> None:
    root = runs["root"]
    assert sorted(p.name for p in (root / "kd" / "checkpoints").iterdir()) == ["step_2", "step_4"]  # no .tmp left
    resumed, full = runs["kd_resumed"]["steps"], runs["kd"]["steps"][2:]
    assert [m["step"] for m in resumed] == [3, 4]
    _assert_same_steps(resumed, full)
    for ma, mb in zip(resumed, full):
        assert abs(ma["loss"] - mb["loss"]) < 1e-6 and ma["lr"] == mb["lr"]
    assert _max_weight_diff(root / "kd_resumed" / "final", root / "kd" / "final") < 1e-6


def test_kd_final_checkpoint_loads_in_transformers(runs: dict) -> None:
    transformers = pytest.importorskip("transformers")
    from kdtune.models import load_hf_model

    final = runs["root"] / "kd" / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final), torch_dtype=torch.float32).eval()
    ours = load_hf_model(final).eval()
    tokens = torch.randint(0, ours.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < 1e-4


def test_teacher_check_2proc_equals_single_device(runs: dict) -> None:
    """The teacher check of the sharded run sees every validation token once: the single-device figures."""
    root = runs["root"]
    checks = [
        next(r for r in _h.read_metrics(root / name) if "teacher_check/teacher_loss" in r)
        for name in ("kd", "kd_single")
    ]
    assert checks[0]["step"] == 0 and checks[0]["teacher_check/tokens"] == checks[1]["teacher_check/tokens"] > 0
    for key in ("teacher_loss", "teacher_accuracy", "student_loss", "student_accuracy"):
        assert abs(checks[0][f"teacher_check/{key}"] - checks[1][f"teacher_check/{key}"]) < TOL, key


def test_export_of_sharded_checkpoints_equals_final(runs: dict, tmp_path: Path) -> None:
    """`kdtune export` of the 2-process DCP checkpoints of the last step: final/ (and final_adapter/) bit for bit."""
    import yaml

    from kdtune.training.export import export_checkpoint

    root = runs["root"]
    for run, step, dirs in (("kd", 4, ["final"]), ("lora", 2, ["final", "final_adapter"])):
        result = export_checkpoint(root / run / "checkpoints" / str(step), tmp_path / run)
        assert result.step == step and sorted(p.name for p in result.written) == dirs
        for d in dirs:
            a, b = root / run / d, tmp_path / run / d
            assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
            for f in a.iterdir():
                if f.name == "README.md":  # same facts; the title is the directory's name
                    meta = [yaml.safe_load((x / f.name).read_text().split("---\n")[1]) for x in (a, b)]
                    assert meta[0] == meta[1]
                else:
                    assert f.read_bytes() == (b / f.name).read_bytes(), (run, d, f.name)


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
    import sys

    out = tmp_path / "dist"
    extra = list(SHORT)
    dist_only = ["fsdp_reshard_after_forward=false"]  # the ZeRO-2-like path: same numbers
    cmd = [sys.executable, "-m", "kdtune.cli.main", "run", "--nproc_per_node", "2", "full_finetune_distributed"]
    cmd += ["--config", "tiny/full_distributed", *tiny_overrides(dist_tiny, out, teacher=None), *extra, *dist_only]
    proc = _h.run_group(cmd, env=_h.test_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    logged = [json.loads(line) for f in sorted((out / "logs").glob("*.jsonl")) for line in f.read_text().splitlines()]
    steps = [m for m in logged if "loss" in m]
    single = _run_single("full_finetune_single_device", "full", dist_tiny, tmp_path / "single", *extra)
    _assert_same_steps(steps, single["steps"], keys=("loss", "grad_norm"))
    assert _max_weight_diff(out / "final", tmp_path / "single" / "final") < TOL


# ----------------------------------------------------------------------------------------------------------------- LoRA
def test_lora_2proc_equals_single_device_and_adapter_loads_in_peft(runs: dict, dist_tiny: dict[str, Path]) -> None:
    """LoRA with activation checkpointing on both sides; adapters start from the same seed-only init."""
    root = runs["root"]
    _assert_same_steps(runs["lora"]["steps"], runs["lora_single"]["steps"], keys=("loss", "grad_norm"))
    assert _max_weight_diff(root / "lora" / "final", root / "lora_single" / "final") < TOL
    assert _max_weight_diff(root / "lora" / "final_adapter", root / "lora_single" / "final_adapter") < TOL

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(dist_tiny["student"]), torch_dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(root / "lora" / "final_adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(root / "lora" / "final")).eval()
    tokens = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (with_adapter(tokens).logits - merged(tokens).logits).abs().max().item()
    assert diff < 1e-4
