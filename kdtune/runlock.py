"""One run per output directory: a lock that a killed run does not leave stuck, removal of the temporary outputs a
killed save left behind, and a per-run id with a unique log file name.

The lock is ``fcntl.flock`` on ``<output_dir>/.kdtune.lock``: the kernel releases it when the holding process ends,
however it ends (``kill -9`` included), so a stale lock never blocks the next run. The file records the holder (pid,
host, start time, run id, command) so a second run can say who holds it. Take it on one process per run (rank 0 of a
distributed run), before anything is written into the directory.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from kdtune.errors import ConfigError

__all__ = [
    "LOCK_FILE",
    "RunLock",
    "acquire_run_lock",
    "cleanup_stale_tmp",
    "new_run_id",
    "read_lock_holder",
    "unique_log_path",
]

#: the lock file inside an output directory
LOCK_FILE = ".kdtune.lock"

#: ``<name>.tmp-<pid>`` (kdtune.fsio.TMP_MARKER, what every atomic writer uses) and ``<name>.old-<pid>``
_TMP_RE = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def new_run_id() -> str:
    """A new run id: UTC start time plus random hex, e.g. ``20250114T093012Z-3f9a1c`` (sorts by start time)."""
    return f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def unique_log_path(
    log_dir: str | os.PathLike[str], run_id: str, *, prefix: str = "log", suffix: str = ".jsonl"
) -> Path:
    """``<log_dir>/<prefix>_<run_id><suffix>``, with ``-1``, ``-2``, ... added if that name is taken (never reused).

    Args:
        log_dir: the logs directory (created if missing).
        run_id: from :func:`new_run_id` (the same id goes into every row the run logs).
        prefix: file name prefix.
        suffix: file name suffix.
    """
    d = Path(log_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}_{run_id}"
    path = d / f"{stem}{suffix}"
    n = 0
    while True:
        try:  # O_EXCL: two runs (or ranks) can never be handed the same file
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            n += 1
            path = d / f"{stem}-{n}{suffix}"
            continue
        os.close(fd)
        return path


def read_lock_holder(output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What the lock file of ``output_dir`` says about its last holder ({} when absent or unreadable)."""
    try:
        data = json.loads((Path(output_dir) / LOCK_FILE).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """A held run lock (see :func:`acquire_run_lock`); release it with :meth:`release` or use it as a context manager.

    Attributes:
        output_dir: the locked directory.
        path: the lock file.
        info: what was written into the lock file (pid, host, started, run_id, command).
    """

    def __init__(self, output_dir: Path, fd: int, info: dict[str, Any]) -> None:
        self.output_dir = output_dir
        self.path = output_dir / LOCK_FILE
        self.info = info
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent). The file stays: removing it would let two runs lock different files."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock is released with its object, as the kernel would at exit
        with contextlib.suppress(Exception):
            self.release()


def acquire_run_lock(output_dir: str | os.PathLike[str], *, run_id: str | None = None) -> RunLock:
    """Lock ``output_dir`` for this run, or refuse because a live run holds it.

    Args:
        output_dir: the run's output directory (created if missing).
        run_id: recorded in the lock file (default: a new :func:`new_run_id`).

    Returns:
        The held :class:`RunLock`.

    Raises:
        ConfigError: another live process holds the lock (naming its pid, host and start time, and how to proceed),
            or the lock file cannot be created (naming the path and why).
    """
    import fcntl

    from kdtune.fsio import make_dirs, os_error_reason

    out = Path(output_dir).expanduser().absolute()
    make_dirs(out, key="output_dir")
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ConfigError(f"cannot create the run lock {path}: {os_error_reason(e)}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"cannot lock {path}: {os_error_reason(e)}") from e
        holder = read_lock_holder(out)
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
        raise ConfigError(
            f"output_dir {out} is in use by another run ({who}); wait for it to finish, stop it "
            f"(kill {holder.get('pid', '<pid>')}), or choose another output_dir"
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_id": run_id or new_run_id(),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    return RunLock(out, fd, info)


def cleanup_stale_tmp(output_dir: str | os.PathLike[str], *, max_depth: int = 3) -> list[Path]:
    """Remove the temporary outputs (``<name>.tmp-<pid>``) a killed save left in ``output_dir``; return them.

    Call it while holding the run lock, before the run writes anything (no live writer can then own such a file).
    A ``<name>.old-<pid>`` directory (the previous output, moved aside during an atomic replace) is put back when
    ``<name>`` is missing, otherwise removed.

    Args:
        output_dir: the run's output directory.
        max_depth: how deep to look (``output_dir/checkpoints/step_N.tmp-<pid>`` is depth 2).
    """
    root = Path(output_dir)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    level = [root]
    for _ in range(max_depth):
        below: list[Path] = []
        for d in level:
            try:
                entries = sorted(d.iterdir())
            except OSError:
                continue
            for p in entries:
                m = _TMP_RE.match(p.name)
                if m is None or int(m.group("pid")) == os.getpid():
                    if p.is_dir() and not p.is_symlink():
                        below.append(p)
                    continue
                original = p.with_name(m.group("name"))
                if m.group("kind") == "old" and not original.exists():
                    os.replace(p, original)  # killed between the two renames: the old output is the good one
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                removed.append(p)
        level = below
    return removed
