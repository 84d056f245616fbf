"""Typed recipe settings: a dataclass declares every top-level key a recipe reads, its default and its meaning."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdtune.errors import ConfigError

T = TypeVar("T")

#: top-level keys every config may carry whatever the recipe's settings are
ALWAYS_ALLOWED = ("recipe",)


@dataclasses.dataclass(frozen=True)
class SettingInfo:
    """One field of a settings dataclass, for ``kdtune validate`` and generated docs."""

    name: str
    type: str
    default: Any  # dataclasses.MISSING when required
    help: str


def describe_settings(cls: type) -> list[SettingInfo]:
    """Name, type, default and one-line meaning (``field(metadata={"help": ...})``) of each field of ``cls``."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default: Any = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out.append(SettingInfo(f.name, _type_name(hints.get(f.name, Any)), default, f.metadata.get("help", "")))
    return out


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations are read as Any
        return {}


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "Any"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently coerce) one value against a type annotation; raise ConfigError naming ``key``."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        if tp is type(None) or _is_optional(tp):
            return None
        raise ConfigError(f"{key}: null is not allowed here (expected {_type_name(tp)}); give it a value")
    if origin in (Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, DictConfig):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return _read(tp, value, prefix=f"{key}.")
    if tp in (DictConfig, ListConfig):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected a {'mapping' if tp is DictConfig else 'list'}, got {value!r}")
        return value
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, ListConfig | list | tuple):
            raise ConfigError(f"{key}: expected a list (write {key.rsplit('.', 1)[-1]}=[a,b]), got {value!r}")
        items = list(value)
        if args and args[-1] is not Ellipsis and origin is not tuple:
            items = [_convert(_plain(v), args[0], f"{key}[{i}]") for i, v in enumerate(items)]
        elif origin is tuple and args and args[-1] is Ellipsis:
            items = [_convert(_plain(v), args[0], f"{key}[{i}]") for i, v in enumerate(items)]
        else:
            items = [_plain(v) for v in items]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, DictConfig | dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _plain(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        if _is_component(value):
            return value
        return OmegaConf.to_container(value, resolve=True)
    return value


def _is_component(value: Any) -> bool:
    return isinstance(value, DictConfig) and "_component_" in value.keys()


def _read(cls: type[T], cfg: DictConfig, prefix: str = "") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = _hints(cls)
    allowed = set(fields) | (set(ALWAYS_ALLOWED) if not prefix else set())
    unknown = [k for k in cfg.keys() if k not in allowed]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(fields), n=2, cutoff=0.6)
            parts.append(
                f"'{prefix}{k}'" + (f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else "")
            )
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(parts)} for {cls.__name__}; "
            f"fix the spelling or remove {'them' if len(unknown) > 1 else 'it'} (`kdtune validate` lists the valid keys)"
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in cfg.keys():
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"required config key '{key}' is missing; add it to the config or pass +{key}=...")
            continue
        if OmegaConf.is_missing(cfg, name):
            raise ConfigError(f"{key}: required value is missing (???); set it with {key}=<value>")
        try:
            value = cfg[name]
        except OmegaConfBaseException as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{key}: cannot resolve the value: {msg}") from None
        tp = hints.get(name, Any)
        if isinstance(value, DictConfig | ListConfig) and (tp is Any or _is_component(value)):
            values[name] = value  # components and free-form nodes stay DictConfig/ListConfig
        else:
            values[name] = _convert(value, tp, key)
    return cls(**values)


def read_settings(cls: type[T], cfg: DictConfig) -> T:
    """Read a recipe's typed settings from its config.

    Every top-level key of ``cfg`` must be a field of ``cls`` (``recipe`` is always allowed). Scalars are checked
    against the field's annotation (``int``, ``float``, ``bool``, ``str``, ``Literal``, ``X | None``, ``list[...]``,
    nested dataclasses); ``_component_`` nodes and fields annotated ``Any`` stay ``DictConfig``/``ListConfig`` so the
    recipe can ``instantiate`` them.

    Args:
        cls: a dataclass whose fields have defaults (fields without one are required), each optionally carrying a
            one-line meaning in ``field(metadata={"help": ...})``.
        cfg: the recipe's config.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: unknown or misspelt keys (all of them, with the closest field names), a missing required key,
            or a value of the wrong type.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"read_settings expects a dataclass type, got {cls!r}")
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    return _read(cls, cfg)
