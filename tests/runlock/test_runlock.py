"""One run per output_dir: the lock against a second real process, a killed holder, stale temporary outputs, run ids."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kdtune.errors import ConfigError
from kdtune.runlock import (
    LOCK_FILE,
    acquire_run_lock,
    cleanup_stale_tmp,
    new_run_id,
    read_lock_holder,
    unique_log_path,
)

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys
from kdtune.runlock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1], run_id="holder-run")
print("LOCKED", flush=True)
sys.stdin.readline()  # hold until told to go (or killed)
lock.release()
print("RELEASED", flush=True)
"""


def start_holder(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "LOCKED"
    return proc


def test_second_live_process_is_refused_and_a_killed_one_leaves_no_stuck_lock(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = start_holder(out)
    try:
        with pytest.raises(ConfigError) as e:
            acquire_run_lock(out)
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith(f"output_dir {out} is in use by another run (pid {holder.pid} on ")
        assert f"stop it (kill {holder.pid}), or choose another output_dir" in msg
        assert read_lock_holder(out)["run_id"] == "holder-run"
        holder.kill()  # kill -9: the kernel releases the flock
        holder.wait(timeout=60)
        assert holder.returncode == -signal.SIGKILL
        assert read_lock_holder(out)["pid"] == holder.pid  # the stale record is still there ...
        with acquire_run_lock(out, run_id="mine") as lock:  # ... but does not block
            assert lock.held and read_lock_holder(out) == lock.info
            assert lock.info["pid"] == os.getpid() and lock.info["run_id"] == "mine"
            with pytest.raises(ConfigError, match=rf"pid {os.getpid()}"):
                acquire_run_lock(out)
        assert not lock.held
        acquire_run_lock(out).release()  # released on exit from the with block
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=60)


def test_holder_that_finishes_releases(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = start_holder(out)
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "RELEASED"
    holder.wait(timeout=60)
    acquire_run_lock(out).release()


def test_lock_refuses_a_file_as_output_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir '.*f' is a file"):
        acquire_run_lock(tmp_path / "f")


def test_cleanup_stale_tmp(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ck = out / "checkpoints"
    (ck / "step_00000004").mkdir(parents=True)
    (ck / "step_00000006.tmp-12345").mkdir()
    (ck / "step_00000006.tmp-12345" / "model.pt").write_bytes(b"partial")
    (out / "final.tmp-999").mkdir()
    (out / "config.yaml.tmp-77").write_text("partial")
    (out / "config.yaml").write_text("good")
    (out / "final_adapter.old-55").mkdir()  # killed between the renames: the previous output comes back
    (out / "final_adapter.old-55" / "adapter_config.json").write_text("{}")
    (out / f"mine.tmp-{os.getpid()}").write_text("a write of this process in flight")
    (out / "notes.tmp-abc").write_text("not ours: no pid")
    (out / "logs").mkdir()
    (out / "logs" / "log_1.jsonl").write_text("{}\n")
    removed = cleanup_stale_tmp(out)
    assert sorted(p.relative_to(out).as_posix() for p in removed) == [
        "checkpoints/step_00000006.tmp-12345",
        "config.yaml.tmp-77",
        "final.tmp-999",
    ]
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == [
        "checkpoints",
        "checkpoints/step_00000004",
        "config.yaml",
        "final_adapter",
        "final_adapter/adapter_config.json",
        "logs",
        "logs/log_1.jsonl",
        f"mine.tmp-{os.getpid()}",
        "notes.tmp-abc",
    ]
    assert cleanup_stale_tmp(tmp_path / "missing") == []


def test_run_ids_and_unique_log_files(tmp_path: Path) -> None:
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", i) for i in ids)
    a = unique_log_path(tmp_path / "logs", "r1")
    b = unique_log_path(tmp_path / "logs", "r1")
    c = unique_log_path(tmp_path / "logs", "r2", prefix="metrics")
    assert [p.name for p in (a, b, c)] == ["log_r1.jsonl", "log_r1-1.jsonl", "metrics_r2.jsonl"]
    assert all(p.is_file() for p in (a, b, c))
    assert (tmp_path / "run" / LOCK_FILE).name == ".kdtune.lock"
