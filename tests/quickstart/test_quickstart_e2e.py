"""The CI version of `kdtune quickstart`: every step end to end on tiny sizes; outputs exist, load, and are cached."""

import json
import subprocess
import sys

import pytest
import torch

from kdtune.models import load_hf_model


@pytest.mark.slow
def test_quickstart_ci_preset_runs_every_step(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "kdtune", "quickstart", "--preset", "ci", "--seeds", "0", "--output-dir", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # the real commands are shown to the user, and every step wrote an HF model that loads and runs
    arms = ("sft", "kd", "seq_kd", "logit_kd", "on_policy")
    for step in ("teacher", *(f"{a}_seed0" for a in arms)):
        assert (out / "runs" / step / "config.yaml").is_file()
        model = load_hf_model(out / "runs" / step / "final")
        logits = model(torch.tensor([[1, 2, 3]]))
        assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()
    for config in ("teacher_answers", *(f"student_{a}" for a in arms)):
        assert f"--config quickstart/{config} " in first.stdout
    # the unlabelled pool holds prompts only; the teacher answered every one of them
    pool = [json.loads(line) for line in (out / "data" / "pool.jsonl").read_text().splitlines()]
    assert all([m["role"] for m in row["messages"]] == ["user"] for row in pool)
    assert (out / "runs" / "teacher_answers" / "teacher_answers.jsonl").is_file()
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"teacher", *(f"{a}_seed0" for a in arms)}
    for r in results["runs"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0
    assert set(results["summary"]["on_policy"]["gain_over_sft"]) == {"per_seed", "mean", "std", "significant"}
    assert "Held-out test results" in first.stdout and "significant gains over SFT" in first.stdout
    assert (out / "quickstart.png").stat().st_size > 1000

    # a second run reuses every trained step
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("[cached]") == 2 + len(arms)  # teacher, teacher answers, one run per arm


def test_parallel_runs_share_the_cores_unless_the_user_chose_threads():
    from kdtune.perf import physical_cpu_cores
    from kdtune.quickstart.pipeline import share_cores

    env: dict[str, str] = {}
    assert share_cores(2, env) == str(max(1, physical_cpu_cores() // 2)) == env["OMP_NUM_THREADS"]
    assert share_cores(1, {}) == str(physical_cpu_cores())
    assert share_cores(10_000, {}) == "1"  # never zero threads
    assert share_cores(2, {"OMP_NUM_THREADS": "3"}) == "3"  # the user's choice is kept


def test_jobs_below_one_is_refused_with_the_reason(capsys):
    import pytest

    from kdtune.quickstart.pipeline import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--jobs", "0"])
    assert "--jobs: 0 is not a positive integer" in capsys.readouterr().err
