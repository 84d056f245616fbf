"""setup_runtime claims the output directory for one run: a lock that a second live process is refused by (naming the
pid) and that a killed process does not leave stuck, stale ``*.tmp-*`` removal, a run id, and config.yaml written only
when the run starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdtune.errors import ConfigError
from kdtune.training import setup_runtime

ROOT = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent(
    """
    import sys, time
    from kdtune.training import setup_runtime
    rt = setup_runtime("cpu", "fp32", sys.argv[1], 0)
    print("LOCKED", rt.run_id, flush=True)
    time.sleep(120)
    """
)


def _start_holder(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("LOCKED"), line
    return proc


def test_a_second_live_run_is_refused_and_a_killed_one_leaves_no_lock(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start_holder(out)
    try:
        with pytest.raises(ConfigError, match=rf"output_dir {out} is in use by another run \(pid {proc.pid} on "):
            setup_runtime("cpu", "fp32", str(out), 0)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    rt = setup_runtime("cpu", "fp32", str(out), 0)  # the kernel dropped the killed run's lock
    assert rt.lock is not None and rt.lock.held
    rt.close()
    assert rt.lock is None


def test_the_lock_is_released_at_the_end_and_taken_over_after_an_error_in_this_process(tmp_path: Path) -> None:
    first = setup_runtime("cpu", "fp32", str(tmp_path), 0)  # e.g. a run of this process that raised: never closed
    second = setup_runtime("cpu", "fp32", str(tmp_path), 0)
    assert not first.lock.held and second.lock.held and first.run_id != second.run_id
    second.close()
    proc = _start_holder(tmp_path)  # released: another process can take it
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_stale_temporaries_are_removed_and_config_is_written_at_start(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000003.tmp-999999").mkdir(parents=True)
    (out / "checkpoints" / "step_00000003.tmp-999999" / "model.pt").write_bytes(b"partial")
    (out / "config.yaml.tmp-999999").write_text("partial")
    (out / "config.yaml").write_text("previous: run\n")
    cfg = OmegaConf.create({"output_dir": str(out), "lr": 1.0})
    rt = setup_runtime("cpu", "fp32", str(out), 0, cfg=cfg)
    assert sorted(p.name for p in out.rglob("*") if ".tmp-" in p.name) == []
    assert (out / "config.yaml").read_text() == "previous: run\n"  # not yet: the run has not started
    assert rt.save_config() == out / "config.yaml" and "lr: 1.0" in (out / "config.yaml").read_text()
    rt.close()


def test_a_fresh_run_in_a_directory_with_checkpoints_is_refused(tmp_path: Path) -> None:
    step = tmp_path / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    cfg = OmegaConf.create({"resume_from_checkpoint": False})
    with pytest.raises(
        ConfigError, match=r"already holds resume checkpoints of an earlier run \(newest: step_00000004"
    ):
        setup_runtime("cpu", "fp32", str(tmp_path), 0, cfg=cfg)
    setup_runtime("cpu", "fp32", str(tmp_path), 0, cfg=OmegaConf.create({"resume_from_checkpoint": True})).close()


@pytest.mark.parametrize("bad", ["", "file"])
def test_bad_output_dirs(tmp_path: Path, bad: str) -> None:
    path = "" if bad == "" else str(tmp_path / "f")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="output_dir"):
        setup_runtime("cpu", "fp32", path, 0)


def test_a_disk_full_save_is_one_line_and_leaves_the_older_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import errno

    import torch

    from kdtune.errors import CheckpointError
    from kdtune.training import ResumeState

    model = torch.nn.Linear(2, 2)
    state = ResumeState(tmp_path, keep_last=1)
    state.save(1, model=model)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*step_00000002: no space left on the device"):
        state.save(2, model=model)
    assert [p.name for p in (tmp_path / "resume").iterdir()] == ["step_00000001"]  # partial removed, older intact
