"""``kdtune run eleuther_eval`` end to end through the CLI, LoRA adapters, and the one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[2]


def _kdtune(*args: str, pre: str = "") -> subprocess.CompletedProcess:
    """Run the kdtune CLI in a fresh interpreter (``pre``: Python run before it, e.g. to hide a module)."""
    code = f"{pre}\nimport sys\nfrom kdtune.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "KDTUNE_DEBUG": "0"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600, cwd=REPO
    )


def _overrides(model_dir: Path, task_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"checkpointer.checkpoint_dir={model_dir}",
        f"include_path=[{task_dir}]",
        f"output_dir={out}",
        *extra,
    ]


def test_cli_end_to_end(eval_models, task_dir, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    args = _overrides(
        eval_models["qwen2"], task_dir, out, "tasks=[kd_mc,kd_gen,kd_ppl]", "limit=5", "max_seq_len=48",
        "log_samples=true",
    )  # fmt: skip
    proc = _kdtune("run", "eleuther_eval", "--config", "tiny/eval", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in ("kd_mc", "kd_gen", "kd_ppl"):
        assert f"|{task}" in proc.stdout.replace(" ", "")  # lm-eval's table
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"kd_mc", "kd_gen", "kd_ppl"}
    assert 0.0 <= results["results"]["kd_mc"]["acc,none"] <= 1.0
    assert results["results"]["kd_ppl"]["word_perplexity,none"] > 1.0
    assert results["kdtune"]["checkpoint_dir"] == str(eval_models["qwen2"])
    assert len((out / "samples_kd_gen.jsonl").read_text().splitlines()) == 5
    assert (out / "config.yaml").is_file()


def test_lora_adapter_matches_hf_peft(eval_models, task_dir, tmp_path: Path) -> None:
    """A base checkpoint + PEFT adapter dir scores like lm-eval's hf model with ``peft=`` (PEFT applies the adapter)."""
    pytest.importorskip("peft")
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from kdtune.eval.lm import KDTuneLM
    from kdtune.models import HFCheckpointer, hf_model

    base = eval_models["llama3"]
    model = hf_model(base, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8)
    HFCheckpointer(str(base), str(tmp_path)).load_into(model, strict=True)
    torch.manual_seed(3)
    with torch.no_grad():  # non-zero adapters, so the adapter really changes the scores
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    adapter = tmp_path / "adapter"
    HFCheckpointer(str(base), str(tmp_path)).save_adapter(model, adapter)

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    ours = KDTuneLM.from_pretrained(base, adapter=adapter, device="cpu", dtype="fp32", batch_size=4)
    plain = KDTuneLM.from_pretrained(base, device="cpu", dtype="fp32", batch_size=4)
    ref = HFLM(pretrained=str(base), peft=str(adapter), device="cpu", dtype="float32", batch_size=4)
    runs = [
        simple_evaluate(model=lm, tasks=["kd_mc"], task_manager=tm, log_samples=True, bootstrap_iters=0, limit=6)
        for lm in (ours, ref, plain)
    ]
    a, b, c = ([r[0][0] for s in run["samples"]["kd_mc"] for r in s["resps"]] for run in runs)
    assert a == pytest.approx(b, abs=1e-4)
    assert max(abs(x - y) for x, y in zip(a, c)) > 1e-2  # the adapter is applied


def test_unknown_task_is_one_line_with_closest(eval_models, task_dir, tmp_path: Path) -> None:
    proc = _kdtune(
        "run", "eleuther_eval", "--config", "tiny/eval",
        *_overrides(eval_models["qwen2"], task_dir, tmp_path / "e", "tasks=[kd_mcc]"),
    )  # fmt: skip
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("kdtune: error: tasks: lm-eval does not know task 'kd_mcc'")
    assert "closest: kd_mc" in line


def test_missing_lm_eval_names_the_install_command(eval_models, task_dir, tmp_path: Path) -> None:
    hide = "import sys\nsys.modules['lm_eval'] = None  # as if the eval extra were not installed"
    proc = _kdtune(
        "run", "eleuther_eval", "--config", "tiny/eval",
        *_overrides(eval_models["qwen2"], task_dir, tmp_path / "m", "tasks=[kd_mc]"), pre=hide,
    )  # fmt: skip
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and "lm-evaluation-harness" in line and "pip install 'kdtune[eval]'" in line


def test_adapter_without_lora_model_is_one_line(eval_models, task_dir, tmp_path: Path) -> None:
    proc = _kdtune(
        "run", "eleuther_eval", "--config", "tiny/eval",
        *_overrides(eval_models["qwen2"], task_dir, tmp_path / "a", "tasks=[kd_mc]", f"adapter_dir={tmp_path}"),
    )  # fmt: skip
    assert proc.returncode == 1
    assert "has no adapter_config.json" in proc.stderr and "\n" not in proc.stderr.strip()
