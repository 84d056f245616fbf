"""The issue's bad inputs through `kdtune run` / `kdtune validate` on the real KD recipe and the tiny models (table):
each is exit code 1 and one line naming the key or file, and nothing an earlier run wrote in the output_dir changes
(its config.yaml, checkpoints, logs and final/). Plus `kdtune runs` on that run directory."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny" / "kd.yaml")
RECIPE = "knowledge_distillation_single_device"


@pytest.fixture(scope="module")
def used(tiny, tmp_path_factory) -> dict:
    """A finished 2-step KD run (checkpoints at steps 1 and 2, logs, final/) and the overrides that point at it."""
    from kdtune.cli.main import main

    root = tmp_path_factory.mktemp("used")
    out = root / "run"
    base = [
        f"output_dir={out}",
        f"checkpointer.checkpoint_dir={tiny['student']}",
        f"teacher_checkpointer.checkpoint_dir={tiny['teacher']}",
        f"dataset.data_files={tiny['data']}",
        "max_steps=2",
        "save_every_n_steps=1",
        "eval_every_n_steps=null",
        "val_split_ratio=0.0",
    ]
    assert main(["run", RECIPE, "--config", CONFIG, *base]) == 0
    (root / "empty.jsonl").write_text("")
    (root / "a_file").write_text("x")
    return {"root": root, "out": out, "base": base}


def snapshot(out: Path) -> dict[str, str]:
    """Every file the run wrote (the lock file aside: it records its last holder), by content hash."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != ".kdtune.lock"
    }


def one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("kdtune: error:")]
    assert len(lines) == 1, err
    return lines[0]


RESUME = "resume_from_checkpoint=true"
CASES = [
    (["kd_ratio=1.5"], "kd_ratio=1.5 is out of range: allowed is >= 0.0 and <= 1.0"),
    (["temperature=0"], "temperature=0.0 is out of range: allowed is > 0.0"),
    (["batch_size=-1"], "batch_size=-1 is out of range: allowed is >= 1"),
    (["save_every_n_steps=0"], "save_every_n_steps=0 is out of range: allowed is >= 1, or null"),
    (["eval_every_n_steps=0"], "eval_every_n_steps=0 is out of range"),
    (["log_every_n_steps=0"], "log_every_n_steps=0 is out of range"),
    (["num_output_chunks=0"], "num_output_chunks=0 is out of range"),
    (["clip_grad_norm=-1.0"], "clip_grad_norm=-1.0 is out of range: allowed is > 0, or null"),
    (["max_steps=0"], "max_steps=0 is out of range"),
    (["max_steps_per_epoch=0"], "max_steps_per_epoch=0 is out of range"),
    (["keep_last_n_checkpoints=0"], "keep_last_n_checkpoints=0 is out of range"),
    (["val_split_ratio=1.0"], "val_split_ratio=1.0 is out of range: allowed is >= 0.0 and < 1.0"),
    (["+num_workers=-1"], "num_workers=-1 is out of range"),
    (["output_dir="], "output_dir='' is empty"),
    (["dtype=int8"], "dtype='int8' is not allowed: use dtype=fp32, dtype=bf16 or dtype=fp16"),
    (["device=gpu0"], "device='gpu0' is not allowed: not a valid device"),
    (["+no_such_key=1"], "unknown config key 'no_such_key'"),
    # the run starts, then refuses at setup, before it writes anything
    ([RESUME, "output_dir={root}/a_file"], "is a file, not a directory"),
    (
        [RESUME, "checkpointer.checkpoint_dir={root}/no_student", "teacher_checkpointer.checkpoint_dir={root}/no_t"],
        "missing model weights: checkpointer.checkpoint_dir '{root}/no_student' does not exist (get it with "
        "`kdtune download <org>/<model> --output-dir {root}/no_student`); teacher_checkpointer.checkpoint_dir "
        "'{root}/no_t' does not exist",
    ),
    ([], "output_dir {out} already holds resume checkpoints of an earlier run (newest: step_00000002)"),
    # ... or while it builds its components / checks the resume
    ([RESUME, "dataset.data_files={root}/empty.jsonl"], "data file {root}/empty.jsonl (key 'data_files') is empty"),
    ([RESUME, "optimizer.lr=-1"], "optimizer: torch.optim.AdamW(lr=-1, weight_decay=0.0) failed: Invalid learning"),
    ([RESUME, "optimizer.lr=abc"], "optimizer: torch.optim.AdamW(lr='abc', weight_decay=0.0) failed"),
    ([RESUME, "batch_size=2"], "resume_from_checkpoint: batch_size is 2 but the checkpoint {out}/checkpoints/step_"),
    ([RESUME, "kd_ratio=0.9"], "resume_from_checkpoint: kd_ratio is 0.9 but the checkpoint"),
    ([RESUME, "max_steps=1"], "is at step 2 but max_steps now end the run after step 1; raise max_steps above 2"),
]


@pytest.mark.parametrize(("extra", "expected"), CASES, ids=[" ".join(c[0]) or "fresh-run" for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(used: dict, capsys, monkeypatch, extra, expected: str) -> None:
    from kdtune.cli.main import main

    monkeypatch.setenv("KDTUNE_DEBUG", "0")
    fill = {"root": used["root"], "out": used["out"]}
    before = snapshot(used["out"])
    capsys.readouterr()
    line = one_line(
        capsys, main(["run", RECIPE, "--config", CONFIG, *used["base"], *(e.format(**fill) for e in extra)])
    )
    assert expected.format(**fill) in line, line
    assert snapshot(used["out"]) == before


def test_validate_reports_the_same_problems(used: dict, capsys) -> None:
    from kdtune.cli.main import main

    assert main(["validate", CONFIG, *used["base"], "kd_ratio=1.5", "temperature=0", "batch_size=-1"]) == 1
    problems = capsys.readouterr().err.splitlines()[1:]
    assert len(problems) == 3 and all(p.strip().startswith(f"settings of recipe {RECIPE}: ") for p in problems)
    assert main(["validate", CONFIG, *used["base"]]) == 0


def test_a_second_live_run_is_refused_naming_the_pid(used: dict, capsys) -> None:
    from kdtune.cli.main import main

    holder = textwrap.dedent(
        """
        import sys, time
        from kdtune.training import setup_runtime
        rt = setup_runtime("cpu", "fp32", sys.argv[1], 0)  # held while rt lives
        print("LOCKED", flush=True)
        time.sleep(120)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(used["out"])], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().startswith("LOCKED")
        before = snapshot(used["out"])
        capsys.readouterr()
        line = one_line(capsys, main(["run", RECIPE, "--config", CONFIG, *used["base"], RESUME]))
        assert f"is in use by another run (pid {proc.pid} on " in line and f"kill {proc.pid}" in line
        assert snapshot(used["out"]) == before
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_kdtune_runs_lists_checkpoints_losses_and_what_resume_picks(used: dict, capsys) -> None:
    import json

    from kdtune.cli.main import main

    assert main(["runs", str(used["out"])]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.strip().split(" ")[0] in ("1", "2")]
    assert len(rows) == 2 and rows[1].endswith("<- resume_from_checkpoint=true continues from here")
    rows_logged = [json.loads(line) for log in (used["out"] / "logs").glob("log_*.jsonl") for line in log.open()]
    losses = {r["step"]: r["loss"] for r in rows_logged if "loss" in r}
    assert f"{losses[1]:.4f}" in rows[0] and f"{losses[2]:.4f}" in rows[1]
    assert out.count(" " * 28 + "same config") == 2


def test_resume_applies_a_new_lr_and_length_and_marks_repeated_log_rows(tiny_cfg, recipe, tmp_path: Path, capsys):
    """A 4-step run resumed from step 2 with optimizer.lr=1e-3 max_steps=6: the resumed steps use exactly the LRs of a
    straight 6-step run at 1e-3 (param groups and schedule both changed); each run logs to its own file with its run
    id, and the rows of steps 3-4 (logged before by the first run) are marked resumed."""
    import json
    import shutil

    kd = recipe(RECIPE)
    common = ["save_every_n_steps=2", "keep_last_n_checkpoints=5", "eval_every_n_steps=null", "val_split_ratio=0.0"]
    straight = kd.train(tiny_cfg("kd", tmp_path / "straight", *common, "optimizer.lr=1e-3", "max_steps=6"))
    out = tmp_path / "run"
    kd.train(tiny_cfg("kd", out, *common, "max_steps=4"))  # the config's lr 3e-3
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    config_before = (out / "config.yaml").read_text()
    capsys.readouterr()
    resumed = kd.train(tiny_cfg("kd", out, *common, "optimizer.lr=1e-3", "max_steps=6", "resume_from_checkpoint=true"))
    printed = capsys.readouterr().out
    assert "resume: max_steps: 4 -> 6 (the run's length changes; the LR schedule is re-planned for it)" in printed
    assert "resume: optimizer.lr: 0.003 -> 0.001" in printed
    assert [s["step"] for s in resumed.steps] == [3, 4, 5, 6]
    assert [s["lr"] for s in resumed.steps] == pytest.approx([s["lr"] for s in straight.steps[2:]], rel=1e-12)
    assert (out / "config.yaml").read_text() != config_before and "lr: 0.001" in (out / "config.yaml").read_text()
    logs = sorted((out / "logs").glob("log_*.jsonl"), key=lambda p: p.stat().st_mtime_ns)
    assert len(logs) == 2
    first, second = ([json.loads(line) for line in p.read_text().splitlines()] for p in logs)
    assert len({r["run_id"] for r in first}) == 1 and len({r["run_id"] for r in second}) == 1
    assert first[0]["run_id"] != second[0]["run_id"]
    step_rows = [r for r in second if "loss" in r]  # (the teacher check logs its own row at the start step)
    assert [(r["step"], r.get("resumed", False)) for r in step_rows] == [(3, True), (4, True), (5, False), (6, False)]
