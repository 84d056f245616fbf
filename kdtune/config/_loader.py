"""Load, resolve, print and save YAML configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

from kdtune.config._catalog import EXTENDS_KEY, find_config
from kdtune.errors import ConfigError


def load_config(name_or_path: str | os.PathLike[str], *, _chain: tuple[Path, ...] = ()) -> DictConfig:
    """Load a shipped config by name (``"llama3_2/kd"``) or any YAML file.

    A config may build on another with a top-level ``extends: <name or path>``: the base is loaded first and this
    file's keys are merged over it (so a tutorial's name can be a two-line alias of a shipped config).

    Args:
        name_or_path: a shipped config name (see ``kdtune ls``) or a path to a ``.yaml`` file.

    Returns:
        The config as a ``DictConfig`` (interpolations such as ``${output_dir}`` are left unresolved).

    Raises:
        ConfigError: unknown name, missing file, YAML syntax error (with file, line and column), or a file whose top
            level is not a mapping.
    """
    path = find_config(os.fspath(name_or_path))
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error in {where}: {problem}; fix the YAML at that line") from None
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"cannot read config {path}: {str(e).splitlines()[0]}; check the ${{...}} interpolations in it"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    if isinstance(cfg, ListConfig):
        raise ConfigError(f"config {path} must be a YAML mapping of keys to values at top level, not a list")
    base = cfg.get(EXTENDS_KEY)
    if base is None:
        return cfg
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {EXTENDS_KEY} must name one config (e.g. {EXTENDS_KEY}: llama3_2/kd), got {base!r}")
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"{path}: {EXTENDS_KEY} forms a cycle ({cycle}); remove one of the {EXTENDS_KEY} keys")
    parent = load_config(base, _chain=(*_chain, path))
    own = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != EXTENDS_KEY])
    return OmegaConf.merge(parent, own)


def _dotted(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def check_resolvable(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Every interpolation that does not resolve and every mandatory ``???`` value left unset, as messages.

    Args:
        cfg: the config (or a sub-node).
        prefix: dotted key of ``cfg`` inside the whole config ("" at top level).

    Returns:
        One message per problem, each starting with its dotted key.
    """
    problems: list[str] = []
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else list(cfg.keys())
    for key in keys:
        dotted = _dotted(prefix, key)
        if OmegaConf.is_missing(cfg, key):
            problems.append(f"{dotted}: required value is missing (???); set it with `{dotted}=<value>`")
            continue
        try:
            value = cfg[key]
        except MissingMandatoryValue as e:
            problems.append(f"{dotted}: interpolation refers to a value that is missing (???): {_first_line(e)}")
            continue
        except InterpolationResolutionError as e:
            problems.append(f"{dotted}: interpolation does not resolve: {_first_line(e)}")
            continue
        except OmegaConfBaseException as e:
            problems.append(f"{dotted}: {_first_line(e)}")
            continue
        if isinstance(value, DictConfig | ListConfig):
            problems.extend(check_resolvable(value, dotted))
    return problems


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def to_yaml(cfg: DictConfig, *, resolve: bool = True, sort_keys: bool = False) -> str:
    """The config as YAML text, interpolations resolved.

    Raises:
        ConfigError: an interpolation does not resolve (names the key).
    """
    if resolve:
        problems = [p for p in check_resolvable(cfg) if "interpolation" in p]
        if problems:
            raise ConfigError(problems[0])
    return OmegaConf.to_yaml(cfg, resolve=resolve, sort_keys=sort_keys)


def print_config(cfg: DictConfig, *, file: Any = None) -> None:
    """Print the resolved config, framed, to ``file`` (stdout by default)."""
    out = file or sys.stdout
    print("---- resolved config ----", file=out)
    print(to_yaml(cfg).rstrip("\n"), file=out)
    print("-------------------------", file=out, flush=True)


def save_config(cfg: DictConfig, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config to ``path`` atomically (temporary file, then ``os.replace``).

    Args:
        cfg: the config to save (interpolations are resolved in the file).
        path: destination file, e.g. ``<output_dir>/config.yaml``; parent directories are created.

    Returns:
        The path written.

    Raises:
        ConfigError: the file cannot be written (disk full, not writable, a parent is a file), naming the path.
    """
    from kdtune.fsio import atomic_write_file

    return atomic_write_file(Path(path), to_yaml(cfg), error=ConfigError)
