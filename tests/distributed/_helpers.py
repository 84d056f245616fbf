"""Helpers of the distributed tests (loaded by path: pytest runs with --import-mode=importlib)."""

from __future__ import annotations

import json
import os
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


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script args`` under ``python -m torch.distributed.run --standalone`` on ``nproc`` CPU processes."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    proc = subprocess.run([*cmd, str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_metrics(out: Path) -> list[dict]:
    """The per-step metrics rank 0 logged (DiskLogger JSON lines under ``out/logs``), in step order."""
    rows = []
    for f in sorted((out / "logs").glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows
