"""Checks of a run's inputs that need no model: every model checkpoint the config reads is on disk, and when some are
not, one line names all of them (student and teacher together) with the command that produces each.

The command comes from what kdtune ships: the tiny configs' files are written by ``kdtune make-tiny``; a directory that
is the ``final/`` of a shipped config's run (a fine-tuned teacher) is written by ``kdtune run <recipe> --config
<name>``; a directory that a shipped config's header downloads (``kdtune download <repo> --output-dir <dir>``) comes
from that command; anything else from ``kdtune download <repo> --output-dir <dir>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdtune.config import list_configs, load_config
from kdtune.errors import CheckpointError, KDTuneError
from kdtune.models._safetensors_io import resolve_weight_files
from kdtune.testing.tiny import DEFAULT_TINY_DIR

__all__ = ["check_checkpoint_dirs", "missing_checkpoint_dirs", "producing_command"]

_DOWNLOAD_LINE = re.compile(r"^#\s*(kdtune download (\S+)\b.*--output-dir\s+(\S+).*)$")


def _checkpoint_nodes(cfg: DictConfig) -> list[tuple[str, Any]]:
    """``(key, node)`` of every top-level checkpointer component (a ``_component_`` ending in ``Checkpointer``)."""
    out = []
    for key in cfg.keys():
        try:
            node = cfg[key]
        except OmegaConfBaseException:
            continue
        if isinstance(node, DictConfig) and str(node.get("_component_", "")).endswith("Checkpointer"):
            out.append((str(key), node))
    return out


def _why_missing(directory: Path, checkpoint_files: Any) -> str | None:
    """Why ``directory`` is not a loadable HF model directory (None when it is, as far as files go)."""
    if not directory.exists():
        return "does not exist"
    if not directory.is_dir():
        return "is a file, not a directory"
    if not (directory / "config.json").is_file():
        return "has no config.json"
    try:
        resolve_weight_files(directory, checkpoint_files)
    except KDTuneError:
        return "holds no (or not all) weight files"
    return None


def missing_checkpoint_dirs(cfg: DictConfig) -> list[tuple[str, Path, str]]:
    """``(config key, directory, why)`` of every checkpointer ``checkpoint_dir`` of ``cfg`` that is not on disk.

    A node whose ``checkpoint_dir`` is null or does not resolve is left to the component to report.
    """
    missing = []
    for key, node in _checkpoint_nodes(cfg):
        try:
            directory = node.get("checkpoint_dir")
            files = node.get("checkpoint_files")
            files = OmegaConf.to_container(files, resolve=True) if OmegaConf.is_config(files) else files
        except OmegaConfBaseException:
            continue
        if directory is None or not str(directory).strip():
            continue
        path = Path(str(directory)).expanduser()
        why = _why_missing(path, files)
        if why is not None:
            missing.append((f"{key}.checkpoint_dir", path, why))
    return missing


def _same(a: Any, b: Path) -> bool:
    try:
        return Path(str(a)).expanduser().absolute() == b.absolute()
    except (TypeError, ValueError):
        return False


def producing_command(directory: Path) -> str:
    """The command that writes ``directory``: ``kdtune make-tiny``, the fine-tune run whose ``final/`` it is, the
    download a shipped config names for it, or a generic ``kdtune download``."""
    directory = Path(directory).expanduser()
    tiny = Path(DEFAULT_TINY_DIR)
    if directory.absolute() == tiny or tiny in directory.absolute().parents:
        return "kdtune make-tiny"
    download = None
    for info in list_configs():
        try:
            text = info.path.read_text(encoding="utf-8")
        except OSError:
            continue
        if directory.name in ("final", "final_adapter"):
            try:
                out = load_config(info.path).get("output_dir")
            except (KDTuneError, OmegaConfBaseException, OSError):
                out = None
            if out is not None and _same(out, directory.parent) and info.recipe:
                return f"kdtune run {info.recipe} --config {info.name}"
        for line in text.splitlines():
            m = _DOWNLOAD_LINE.match(line.strip())
            if m and download is None and _same(m.group(3), directory):
                download = m.group(1).strip()
    return download or f"kdtune download <org>/<model> --output-dir {directory}"


def check_checkpoint_dirs(cfg: DictConfig) -> None:
    """Refuse a run whose model checkpoints are not all on disk, naming every missing one and how to produce it.

    Raises:
        CheckpointError: one line listing each missing ``checkpoint_dir`` (key, path, why, command).
    """
    missing = missing_checkpoint_dirs(cfg)
    if not missing:
        return
    parts = [f"{key} {str(path)!r} {why} (get it with `{producing_command(path)}`)" for key, path, why in missing]
    raise CheckpointError(f"missing model weights: {'; '.join(parts)}")
