"""Writing outputs safely: atomic files and directories that follow the umask, and one clear line when the disk is
full, a path is not writable or an output path is a file.

Every kdtune writer of a finished artefact goes through here: :func:`atomic_write_file` (a file, via
``<name>.tmp-<pid>`` + ``os.replace``) and :func:`atomic_directory` (a directory, via ``<name>.tmp-<pid>``). What they
leave is readable as any file the user creates (``0o666 & ~umask``; some writers, e.g. ``safetensors``, create
``0o600`` files), and a failure removes the partial output and raises one line naming the path and the reason
(:func:`os_error_reason`). :func:`prepare_output_dir` checks a run's ``output_dir`` before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from kdtune.errors import CheckpointError, ConfigError, KDTuneError

__all__ = [
    "TMP_MARKER",
    "apply_umask",
    "atomic_directory",
    "atomic_write_file",
    "current_umask",
    "make_dirs",
    "os_error_reason",
    "output_error",
    "prepare_output_dir",
    "remove_empty_dirs",
]

#: what a temporary output's name carries (``step_00000006.tmp-1234``, ``config.yaml.tmp-1234``)
TMP_MARKER = ".tmp-"

_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # Rust I/O errors (safetensors) carry the errno this way
_REASONS = {
    errno.ENOSPC: "no space left on the device: free some space or choose another output_dir",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another output_dir",
    errno.EACCES: "permission denied: choose a directory you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a directory you can write to",
    errno.EROFS: "the file system is read-only: choose a writable output_dir",
    errno.ENOTDIR: "a component of the path is a file, not a directory: choose another path",
    errno.EEXIST: "it exists and is a file, not a directory: choose another path or remove the file",
    errno.EISDIR: "it is a directory, not a file: choose another path",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter output_dir",
}


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike[str], *, recursive: bool = False, umask: int | None = None) -> None:
    """Give ``path`` the mode a freshly created file (``0o666 & ~umask``) or directory (``0o777 & ~umask``) gets.

    Args:
        path: a file or directory.
        recursive: for a directory, also every file and directory under it.
        umask: the umask to apply (default: the process's).
    """
    mask = current_umask() if umask is None else umask
    p = Path(path)
    todo = [p]
    if recursive and p.is_dir():
        todo += list(p.rglob("*"))
    for q in todo:
        if q.is_symlink():
            continue
        os.chmod(q, (0o777 if q.is_dir() else 0o666) & ~mask)


def os_error_reason(e: BaseException) -> str | None:
    """Why an OS-level write failed, in words with the fix (None when ``e`` is not an OS error).

    Understands ``OSError`` (errno) and errors whose text carries ``(os error N)`` (Rust writers such as
    safetensors).
    """
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = _OS_ERROR_IN_TEXT.search(str(e))
        code = int(m.group(1)) if m else None
    if code is None:
        return None
    return _REASONS.get(code) or f"{os.strerror(code).lower()} (errno {code})"


def output_error(
    e: BaseException,
    path: str | os.PathLike[str],
    what: str = "cannot write",
    error: type[KDTuneError] = CheckpointError,
) -> KDTuneError | None:
    """``error("<what> <path>: <reason>")`` for an OS-level failure ``e``; None when ``e`` is something else."""
    reason = os_error_reason(e)
    if reason is None:
        return None
    blocker = _file_in_the_way(Path(path))
    if blocker is not None and getattr(e, "errno", None) in (errno.ENOTDIR, errno.EEXIST):
        reason = f"{blocker} is a file, not a directory: choose another path or remove the file"
    return error(f"{what} {path}: {reason}")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a directory (None when there is none)."""
    for q in path.absolute().parents:
        if q.exists():
            return None if q.is_dir() else q
    return None


def make_dirs(path: str | os.PathLike[str], *, error: type[KDTuneError] = ConfigError, key: str = "") -> list[Path]:
    """``mkdir -p path``; return the directories it created (outermost first) so a failure can remove them.

    Raises:
        ``error``: a component is a file, or it cannot be created (naming the path, ``key`` and why).
    """
    p = Path(path).expanduser().absolute()
    missing: list[Path] = []
    q = p
    while not q.exists():
        missing.insert(0, q)
        if q.parent == q:
            break
        q = q.parent
    where = f"{key} {str(p)!r}" if key else str(p)
    if p.exists() and not p.is_dir():
        raise error(f"{where} is a file, not a directory; choose another path or remove the file")
    blocker = _file_in_the_way(p)
    if blocker is not None:
        raise error(f"cannot create {where}: {blocker} is a file, not a directory; choose another path")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create {where}: {os_error_reason(e)}") from e
    return missing


def remove_empty_dirs(dirs: list[Path], *, ignore: tuple[str, ...] = ()) -> None:
    """Remove the directories ``dirs`` (outermost first, as :func:`make_dirs` returns them), innermost first, each only
    when no file is left under it outside the names in ``ignore`` (e.g. a download's ``.cache``)."""
    for d in reversed(dirs):
        if d.is_dir() and not _holds_files(d, ignore):
            shutil.rmtree(d, ignore_errors=True)


def _holds_files(d: Path, ignore: tuple[str, ...]) -> bool:
    for c in d.rglob("*"):
        if any(part in ignore for part in c.relative_to(d).parts):
            continue
        if c.is_file() or c.is_symlink():
            return True
    return False


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")


def atomic_write_file(
    path: str | os.PathLike[str],
    data: str | bytes | Callable[[IO[bytes]], Any],
    *,
    error: type[KDTuneError] = CheckpointError,
    make_parents: bool = True,
) -> Path:
    """Write a file atomically: ``<name>.tmp-<pid>`` (umask mode), then ``os.replace``; the old file stays intact on
    failure and the temporary file is removed.

    Args:
        path: destination.
        data: text (UTF-8), bytes, or a function writing to a binary file object (e.g. ``lambda f: torch.save(x, f)``).
        error: the KDTuneError class for OS-level failures (disk full, not writable, a parent is a file).
        make_parents: create missing parent directories.

    Returns:
        ``path``.

    Raises:
        ``error``: one line naming the path and why (other exceptions from ``data`` propagate unchanged).
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        translated = output_error(e, path, error=error)
        if translated is not None:
            raise translated from e
        raise
    return path


def _looks_replaceable(path: Path) -> bool:
    """An existing directory we may replace: empty, or a model / adapter / kdtune output directory."""
    from kdtune.models._safetensors_io import WEIGHT_SUFFIXES

    names = {p.name for p in path.iterdir()}
    if not names:
        return True
    markers = ("config.json", "adapter_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return any(m in names for m in markers) or any(n.endswith(WEIGHT_SUFFIXES) for n in names)


@contextlib.contextmanager
def atomic_directory(
    out_dir: str | os.PathLike[str], *, error: type[KDTuneError] = CheckpointError, check_replaceable: bool = True
) -> Iterator[Path]:
    """Yield a fresh temporary directory ``<out_dir>.tmp-<pid>``; on success its files get umask modes and it
    replaces ``out_dir`` (an existing ``out_dir`` is moved aside first and deleted only after the new one is in
    place); on any error it is removed and nothing earlier is touched.

    Args:
        out_dir: the directory to write.
        error: the KDTuneError class for OS-level failures.
        check_replaceable: refuse to replace an existing non-empty directory that does not look like a model,
            adapter or kdtune output directory.

    Raises:
        ``error``: ``out_dir`` (or a parent) is a file, an unrelated non-empty directory, or a write failed at the OS
            level (disk full, permission denied, read-only): one line naming the path and why.
    """
    final = Path(out_dir).expanduser().absolute()
    if final.exists() and not final.is_dir():
        raise error(f"output path {str(final)!r} is a file; choose a directory path.")
    if check_replaceable and final.is_dir() and not _looks_replaceable(final):
        raise error(
            f"output directory {str(final)!r} exists and holds files that are not a model checkpoint; refusing to "
            "replace it. Choose an empty or new directory."
        )
    make_dirs(final.parent, error=error)
    tmp = _tmp_name(final)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise output_error(e, final, error=error) or e from e
    try:
        yield tmp
        apply_umask(tmp, recursive=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        translated = output_error(e, final, error=error)
        if translated is not None:
            raise translated from e
        raise
    old = None
    try:
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        translated = output_error(e, final, error=error)
        if translated is not None:
            raise translated from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_output_dir(output_dir: str | os.PathLike[str] | None, *, key: str = "output_dir") -> Path:
    """Check and create a run's output directory before anything is written into it.

    Refuses an empty value (a run would otherwise write into the current directory and its logs into ``/logs``), a
    path that is a file (or under one), and a directory that cannot be written (checked by creating and removing a
    probe file), each as one line naming ``key``, the path and the fix.

    Returns:
        The absolute directory.

    Raises:
        ConfigError: as above.
    """
    if output_dir is None or not str(output_dir).strip():
        raise ConfigError(f"{key} is empty; set {key}=<directory> (the run writes checkpoints, logs and final/ there)")
    path = Path(str(output_dir)).expanduser().absolute()
    make_dirs(path, error=ConfigError, key=key)
    probe = path / f".kdtune-write-test{TMP_MARKER}{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise ConfigError(f"{key} {str(path)!r} is not writable: {os_error_reason(e)}") from e
    return path
