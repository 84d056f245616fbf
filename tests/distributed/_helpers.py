"""Helpers of the distributed tests (loaded by path: pytest runs with --import-mode=importlib)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(paths: dict[str, Path], out: Path, *, teacher: str | None = "teacher") -> list[str]:
    """Overrides pointing a configs/tiny config at the fixture's files."""
    ov = [f"output_dir={out}", f"checkpointer.checkpoint_dir={paths['student']}", f"dataset.data_files={paths['data']}"]
    if teacher is not None:
        ov.append(f"teacher_checkpointer.checkpoint_dir={paths[teacher]}")
    return ov


def run_group(
    cmd: list[str], *, env: dict[str, str], timeout: int, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (torchrun's workers included)."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-8000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_env() -> dict[str, str]:
    """Environment of a child run: the repo importable, one thread per process, no GPU."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script args`` under ``python -m torch.distributed.run --standalone`` on ``nproc`` CPU processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    proc = run_group([*cmd, str(script), *args], env=test_env(), timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_metrics(out: Path) -> list[dict]:
    """The per-step metrics rank 0 logged (DiskLogger JSON lines under ``out/logs``), in step order."""
    rows = []
    for f in sorted((out / "logs").glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows
