"""``kdtune runs <output_dir>``: the resume checkpoints of a run directory, what resume would pick and do.

For each complete checkpoint: its step and epoch, the training loss logged for that step (the newest log row of the
step in ``logs/*.jsonl``), and how its config differs from the directory's ``config.yaml`` (the config of the last run
started there), each key marked as applied or refused on resume. The newest complete checkpoint is the one
``resume_from_checkpoint=true`` continues from; checkpoints set aside after a NaN/inf stop (``*.diverged``) and the
leftovers of a killed save (``*.tmp-*``, removed at the next start) are listed after them, and the run lock's holder
when a live run holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from kdtune.errors import ConfigError

__all__ = ["describe_run_dir", "runs_command"]


def _lock_holder(out: Path) -> str | None:
    """``pid N on HOST, started T`` when a live process holds the run lock of ``out``, else None."""
    import fcntl

    from kdtune.runlock import LOCK_FILE, read_lock_holder

    path = out / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            h = read_lock_holder(out)
            return f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _loss(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    value = row.get("loss")
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{v:.4f}" if math.isfinite(v) else str(v)


def describe_run_dir(output_dir: str | os.PathLike[str]) -> list[str]:
    """The lines ``kdtune runs`` prints for ``output_dir``.

    Raises:
        ConfigError: ``output_dir`` is not a directory.
    """
    from omegaconf import OmegaConf

    from kdtune.training.checkpoints import resume_changes
    from kdtune.training.reporting import logged_steps
    from kdtune.training.runtime import complete_checkpoints

    out = Path(output_dir).expanduser().absolute()
    if not out.is_dir():
        raise ConfigError(f"{out} is not a directory; give the output_dir of a run (`kdtune runs <output_dir>`)")
    current = OmegaConf.load(out / "config.yaml") if (out / "config.yaml").is_file() else None
    log_dir = out / "logs"
    if current is not None:
        with contextlib.suppress(Exception):
            configured = OmegaConf.select(current, "metric_logger.log_dir")
            if configured:
                log_dir = Path(str(configured))
    logged = logged_steps(log_dir)
    root = out / "checkpoints"
    found = complete_checkpoints(root)
    holder = _lock_holder(out)
    lines = [f"run directory {out}" + (f" (in use by {holder})" if holder else "")]
    if not found:
        lines.append("no resume checkpoints: a run here starts fresh (resume_from_checkpoint=false)")
    else:
        compared = "config.yaml" if current is not None else "(no config.yaml to compare with)"
        lines.append(f"{'STEP':>8}  {'EPOCH':>5}  {'LOSS':>9}  CHECKPOINT / CONFIG DIFFERENCES TO {compared}")
    for i, path in enumerate(found):
        state = json.loads((path / "state.json").read_text())
        step = int(state.get("step", -1))
        data_state = state.get("data_state") or (state.get("extra") or {}).get("data_state") or {}
        epoch = data_state.get("epoch", state.get("epoch", "-"))
        newest = i == len(found) - 1
        mark = "   <- resume_from_checkpoint=true continues from here" if newest else ""
        lines.append(f"{step:>8}  {epoch!s:>5}  {_loss(logged.get(step)):>9}  {path.relative_to(out)}{mark}")
        if current is None:
            continue
        saved = OmegaConf.load(path / "config.yaml") if (path / "config.yaml").is_file() else None
        if saved is None:
            lines.append(f"{'':>28}(no config saved with it)")
            continue
        changes = resume_changes(saved, current)
        if not changes:
            lines.append(f"{'':>28}same config")
        for c in changes:
            verdict = "applied on resume" if c.apply else "refused on resume"
            lines.append(f"{'':>28}{c.change}  [{verdict}: {c.note}]")
    if root.is_dir():
        aside = sorted(p.name for p in root.iterdir() if p.name.endswith(".diverged"))
        if aside:
            lines.append(f"set aside after a NaN/inf stop (resume skips them): {', '.join(aside)}")
        partial = sorted(p.name for p in root.iterdir() if ".tmp-" in p.name)
        if partial:
            lines.append(f"left by a killed save (removed at the next start): {', '.join(partial)}")
    return lines


def runs_command(args: argparse.Namespace) -> int:
    """``kdtune runs <output_dir>``."""
    print("\n".join(describe_run_dir(args.output_dir)))
    return 0
