"""Typed recipe settings: a dataclass declares every top-level key a recipe reads, its default, its meaning and the
values it allows.

A field's ``metadata`` may carry, next to ``help``, the constraint its value must meet (see :data:`CONSTRAINT_KEYS`):
``ge``/``gt``/``le``/``lt`` (numeric bounds), ``choices`` (allowed values), ``non_empty`` (a string or list that must
not be empty) and ``check`` (a callable returning None when the value is fine, else a short description of the
problem). :func:`read_settings` enforces them, naming the key, the value and what is allowed; ``null`` on an
``X | None`` field switches the feature off and is never checked. :func:`setting` builds such a field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdtune.config._instantiate import COMPONENT_KEY, missing_component_message
from kdtune.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "ALWAYS_ALLOWED",
    "CONSTRAINT_KEYS",
    "SettingInfo",
    "check_settings",
    "describe_allowed",
    "describe_settings",
    "read_settings",
    "setting",
]

#: metadata keys of a settings field that constrain its value (``help`` is the one-line meaning)
CONSTRAINT_KEYS = ("ge", "gt", "le", "lt", "choices", "non_empty", "check", "component")

#: top-level keys every config may carry whatever the recipe's settings are
ALWAYS_ALLOWED = ("recipe",)


@dataclasses.dataclass(frozen=True)
class SettingInfo:
    """One field of a settings dataclass, for ``kdtune validate`` and generated docs."""

    name: str
    type: str
    default: Any  # dataclasses.MISSING when required
    help: str
    allowed: str = ""  # the constraint in words ("an integer >= 1, or null"), "" when any value of the type is fine


def setting(default: Any = dataclasses.MISSING, *, help: str = "", **constraints: Any) -> Any:
    """A settings dataclass field with a one-line ``help`` and an optional constraint on its value.

    Args:
        default: the default value (omit for a required field; a list/dict default is copied per instance).
        help: the one-line meaning, shown by ``kdtune validate`` and the generated docs.
        **constraints: any of :data:`CONSTRAINT_KEYS`: ``ge``, ``gt``, ``le``, ``lt`` (bounds), ``choices`` (a
            sequence of allowed values), ``non_empty=True``, ``check`` (``value -> None | str``: None when fine,
            else what is wrong, e.g. ``"must be a power of two"``), ``component=True`` (a ``_component_`` mapping,
            or a list of them: what :func:`kdtune.config.instantiate` builds).

    Returns:
        A ``dataclasses.field``.

    Raises:
        TypeError: an unknown constraint name (a typo would otherwise check nothing).
    """
    unknown = sorted(set(constraints) - set(CONSTRAINT_KEYS))
    if unknown:
        raise TypeError(f"unknown setting constraint(s) {unknown}; use {', '.join(CONSTRAINT_KEYS)}")
    if "check" in constraints and not callable(constraints["check"]):
        raise TypeError("setting(check=...) must be a callable returning None or a problem description")
    metadata = {"help": help, **constraints}
    if isinstance(default, list | dict | set):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def describe_allowed(metadata: Any, tp: Any = Any) -> str:
    """The constraint a field's metadata declares, in words (``"an integer >= 1, or null"``); "" when none."""
    parts = []
    for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if name in metadata:
            parts.append(f"{op} {metadata[name]!r}")
    if "choices" in metadata:
        parts.append("one of " + ", ".join(repr(c) for c in metadata["choices"]))
    if metadata.get("non_empty"):
        parts.append("not empty")
    if "check" in metadata:
        doc = (getattr(metadata["check"], "__doc__", None) or "").strip().splitlines()
        parts.append(doc[0].rstrip(".") if doc else f"accepted by {getattr(metadata['check'], '__name__', 'check')}")
    if not parts:
        return ""
    text = " and ".join(parts)
    if _is_optional(tp):
        text += ", or null"  # what null means is in the help (off, no cap, auto, ...)
    return text


def describe_settings(cls: type) -> list[SettingInfo]:
    """Name, type, default, one-line meaning (``field(metadata={"help": ...})``) and constraint of each field."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default: Any = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        tp = hints.get(f.name, Any)
        out.append(
            SettingInfo(f.name, _type_name(tp), default, f.metadata.get("help", ""), describe_allowed(f.metadata, tp))
        )
    return out


def _check_constraints(value: Any, metadata: Any, tp: Any, key: str) -> None:
    """Raise ConfigError naming ``key``, ``value`` and what is allowed when ``value`` breaks the field's constraint."""
    if value is None or not any(k in metadata for k in CONSTRAINT_KEYS):
        return  # null switches a feature off (the type check already refused null where it is not allowed)
    problem = None
    bounds = (
        ("ge", lambda v, b: v >= b),
        ("gt", lambda v, b: v > b),
        ("le", lambda v, b: v <= b),
        ("lt", lambda v, b: v < b),
    )
    for name, ok in bounds:
        if name in metadata:
            try:
                fine = ok(value, metadata[name])
            except TypeError:
                fine = False
            if not fine:
                problem = "out of range"
                break
    if problem is None and "choices" in metadata and value not in tuple(metadata["choices"]):
        problem = "not allowed"
    if (
        problem is None
        and metadata.get("non_empty")
        and ((isinstance(value, str) and not value.strip()) or (hasattr(value, "__len__") and len(value) == 0))
    ):
        problem = "empty"
    if problem is None and "check" in metadata:
        try:
            result = metadata["check"](value)
        except (TypeError, ValueError) as e:
            result = str(e) or type(e).__name__
        if result is False:
            problem = "not allowed"
        elif isinstance(result, str) and result:
            raise ConfigError(f"{key}={value!r} is not allowed: {result}; set {key} to a valid value")
    if problem is not None:
        shown = "''" if value == "" else repr(value)
        raise ConfigError(f"{key}={shown} is {problem}: allowed is {describe_allowed(metadata, tp)}; set {key}=<value>")


def _check_component(value: Any, key: str) -> None:
    """Raise ConfigError when a component slot holds neither a ``_component_`` mapping nor a list of them."""
    items = list(enumerate(value)) if isinstance(value, ListConfig | list) else [(None, value)]
    for i, item in items:
        item_key = key if i is None else f"{key}[{i}]"
        if not isinstance(item, DictConfig | dict):
            raise ConfigError(missing_component_message(item_key, item))
        if COMPONENT_KEY not in item.keys():
            raise ConfigError(missing_component_message(item_key))


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
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]) and isinstance(value, DictConfig):
            return _convert(value, options[0], key)  # `X | None` of a mapping: X's own error names the inner key
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


def _read(cls: type[T], cfg: DictConfig, prefix: str = "", problems: list[str] | None = None) -> T | None:
    """Read ``cls`` from ``cfg``; with ``problems`` given, every problem is appended there (None is returned when
    there are any) instead of raising the first."""
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
        error = ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(parts)} for {cls.__name__}; "
            f"fix the spelling or remove {'them' if len(unknown) > 1 else 'it'} (`kdtune validate` lists the valid keys)"
        )
        if problems is None:
            raise error
        problems.append(str(error))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        try:
            _read_field(cfg, name, f, hints, prefix, values, problems)
        except ConfigError as e:
            if problems is None:
                raise
            problems.append(str(e))
    if problems:
        return None
    return cls(**values)


def _read_field(
    cfg: DictConfig,
    name: str,
    f: dataclasses.Field,
    hints: dict[str, Any],
    prefix: str,
    values: dict[str, Any],
    problems: list[str] | None,
) -> None:
    """Read, type-check and constraint-check one field into ``values`` (absent optional fields are skipped)."""
    key = f"{prefix}{name}"
    if name not in cfg.keys():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"required config key '{key}' is missing; add it to the config or pass +{key}=...")
        return
    if OmegaConf.is_missing(cfg, name):
        raise ConfigError(f"{key}: required value is missing (???); set it with {key}=<value>")
    try:
        value = cfg[name]
    except OmegaConfBaseException as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot resolve the value: {msg}") from None
    tp = hints.get(name, Any)
    if value is not None and f.metadata.get("component"):
        _check_component(value, key)
    if isinstance(value, DictConfig | ListConfig) and (tp is Any or _is_component(value)):
        values[name] = value  # components and free-form nodes stay DictConfig/ListConfig
        return
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, DictConfig):
        nested = _read(tp, value, prefix=f"{key}.", problems=problems)
        if nested is None:  # its problems are recorded already
            return
        values[name] = nested
        return
    values[name] = _convert(value, tp, key)
    _check_constraints(values[name], f.metadata, tp, key)


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
            a value of the wrong type, or a value its field's constraint refuses (see :func:`setting`).
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"read_settings expects a dataclass type, got {cls!r}")
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    out = _read(cls, cfg)
    assert out is not None
    return out


def check_settings(cls: type, cfg: DictConfig) -> list[str]:
    """Every problem :func:`read_settings` would find in ``cfg`` (it raises only the first), one line each.

    Used by ``kdtune validate`` so it checks keys, types and values exactly as a run does.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"check_settings expects a dataclass type, got {cls!r}")
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    problems: list[str] = []
    _read(cls, cfg, problems=problems)
    return problems
