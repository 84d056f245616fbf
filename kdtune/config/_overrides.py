"""Command-line overrides: ``key=value``, ``+new.key=value``, ``~key`` and component swaps.

Values are parsed with a small, explicit grammar (not YAML 1.1, which turns ``1e-3`` into a string and ``007`` into
an octal number):

* ``null`` / ``None`` / ``~`` -> None; ``true`` / ``false`` (any case) -> bool;
* integers without leading zeros (``42``, ``-3``) -> int; ``007`` stays the string ``"007"``;
* decimals and exponents (``0.25``, ``1e-3``, ``.5``, ``inf``, ``nan``) -> float;
* ``[a, b]`` -> list and ``{k: v}`` -> dict, parsed recursively; ``'...'`` / ``"..."`` -> the quoted string;
* anything else, including ``${interpolations}`` and text containing ``=``, -> the string as written.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Collection
from typing import Any

from omegaconf import DictConfig, ListConfig

from kdtune.errors import ConfigError

_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(
    r"[-+]?((0|[1-9][0-9]*)?\.[0-9]+([eE][-+]?[0-9]+)?|(0|[1-9][0-9]*)\.[0-9]*([eE][-+]?[0-9]+)?|(0|[1-9][0-9]*)[eE][-+]?[0-9]+)"
)
_SPECIAL_FLOATS = {"inf": float("inf"), "+inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
_KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split ``text`` on ``sep`` where it is not inside brackets, braces, ``${...}`` or quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if quote or depth != 0:
        raise ValueError(f"unbalanced brackets or quotes in {text!r}")
    parts.append(text[start:])
    return parts


def parse_value(text: str) -> Any:
    """Parse one override value (see the module docstring for the grammar).

    Args:
        text: the text after the first ``=`` of an override.

    Returns:
        None, bool, int, float, str, list or dict.

    Raises:
        ValueError: unbalanced brackets or quotes.
    """
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    if s.startswith("${"):
        return s
    if s.startswith("[") and s.endswith("]"):
        inner = s[1:-1].strip()
        return [] if not inner else [parse_value(p) for p in _split_top_level(inner, ",")]
    if s.startswith("{") and s.endswith("}"):
        inner = s[1:-1].strip()
        out: dict[str, Any] = {}
        for item in _split_top_level(inner, ",") if inner else []:
            kv = _split_top_level(item, ":")
            if len(kv) < 2:
                raise ValueError(f"dict item {item.strip()!r} has no ':'")
            out[str(parse_value(kv[0]))] = parse_value(":".join(kv[1:]))
        return out
    if s.startswith(("[", "{")):
        raise ValueError(f"unbalanced brackets in {s!r}")
    if s in ("null", "None", "NULL", "~"):
        return None
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    if _INT.fullmatch(s):
        return int(s)
    if _FLOAT.fullmatch(s):
        return float(s)
    if s.lower() in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[s.lower()]
    return s


def parse_key(key: str, override: str) -> list[str | int]:
    """Split a dotted key (``a.b[0].c`` or ``a.b.0.c``) into parts; list indices become ints."""
    parts: list[str | int] = []
    for piece in key.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[[0-9]+\])*)", piece)
        if m is None or (not m.group(1) and not m.group(2)):
            raise ConfigError(f"override '{override}': malformed key '{key}'; write dotted keys like optimizer.lr=1e-3")
        name, indices = m.group(1), m.group(2)
        if name:
            if name.isdigit():
                parts.append(int(name))
            elif _KEY_PART.fullmatch(name):
                parts.append(name)
            else:
                raise ConfigError(f"override '{override}': '{name}' is not a valid key name in '{key}'")
        parts.extend(int(i) for i in re.findall(r"\[([0-9]+)\]", indices))
    return parts


def _fmt(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def flat_keys(node: DictConfig | ListConfig, prefix: list[str | int] | None = None) -> list[str]:
    """Every dotted key of a config (containers and leaves), e.g. ``["optimizer", "optimizer.lr", ...]``."""
    prefix = prefix or []
    out: list[str] = []
    if isinstance(node, ListConfig):
        children = [(i, node._get_node(i)) for i in range(len(node))]
    else:
        children = [(k, node._get_node(k)) for k in node.keys()]
    for k, child in children:
        parts = [*prefix, k]
        out.append(_fmt(parts))
        if isinstance(child, DictConfig | ListConfig) and not child._is_missing() and not child._is_none():
            out.extend(flat_keys(child, parts))
    return out


def closest_keys(cfg: DictConfig, key: str, n: int = 3, extra: Collection[str] = ()) -> str:
    """The existing dotted keys (and ``extra`` ones) closest to ``key``, comma-separated ("none" if nothing is close)."""
    keys = flat_keys(cfg)
    keys += [k for k in extra if k not in keys]
    close = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if difflib.SequenceMatcher(None, leaf, k.rsplit(".", 1)[-1]).ratio() >= 0.75][:n]
    return ", ".join(close) if close else "none"


def _has(container: DictConfig | ListConfig, part: str | int) -> bool:
    if isinstance(container, ListConfig):
        return isinstance(part, int) and 0 <= part < len(container)
    return isinstance(part, str) and part in container.keys()


def _missing_key_error(
    cfg: DictConfig, override: str, parts: list[str | int], add_hint: bool, declared: Collection[str] = ()
) -> ConfigError:
    key = _fmt(parts)
    msg = f"override '{override}': '{key}' is not in the config (closest: {closest_keys(cfg, key, extra=declared)})"
    if add_hint:
        msg += f"; to add a new key write '+{override.lstrip('+')}'"
    return ConfigError(msg)


def _navigate(
    cfg: DictConfig, parts: list[str | int], override: str, create: bool, declared: Collection[str] = ()
) -> DictConfig | ListConfig:
    """The container holding ``parts[-1]``; with ``create``, missing intermediate mappings are created."""
    node: DictConfig | ListConfig = cfg
    for i, part in enumerate(parts[:-1]):
        if not _has(node, part):
            if isinstance(node, ListConfig):
                raise ConfigError(
                    f"override '{override}': index {part} is out of range for '{_fmt(parts[:i])}' (length {len(node)})"
                )
            if create and isinstance(node, DictConfig) and isinstance(part, str):
                node[part] = {}
            else:
                raise _missing_key_error(cfg, override, parts[: i + 1], add_hint=not create, declared=declared)
        child = node._get_node(part)
        if not isinstance(child, DictConfig | ListConfig) or child._is_none() or child._is_missing():
            if create and isinstance(node, DictConfig):
                node[part] = {}
                child = node._get_node(part)
            else:
                raise ConfigError(
                    f"override '{override}': '{_fmt(parts[: i + 1])}' is a value, not a mapping, so "
                    f"'{_fmt(parts)}' cannot be set; set '{_fmt(parts[: i + 1])}' itself"
                )
        node = child  # type: ignore[assignment]
    return node


def settings_keys(settings: type | None) -> tuple[str, ...]:
    """The top-level keys a recipe's settings dataclass reads (its field names, plus ``recipe``); () for None."""
    if settings is None:
        return ()
    return ("recipe", *(f.name for f in dataclasses.fields(settings)))


def explicit_adds(cfg: DictConfig, overrides: list[str], settings: type | None) -> list[str]:
    """``overrides`` with each plain ``key=value`` that sets a setting absent from ``cfg`` written ``+key=value``.

    The same effect under :func:`apply_overrides` with ``settings``, and also without it: ``kdtune run`` hands the
    recipe these, so a recipe (or a copy of one) that parses its command line without its settings runs them too.
    """
    declared = settings_keys(settings)
    out = []
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" in override and not key.startswith(("+", "~")) and key:
            top = re.split(r"[.\[]", key, maxsplit=1)[0]
            if top in declared and not _has(cfg, top):
                override = "+" + override
        out.append(override)
    return out


def apply_overrides(cfg: DictConfig, overrides: list[str], *, settings: type | None = None) -> DictConfig:
    """Apply command-line overrides to a copy of ``cfg``.

    Forms:
        ``a.b=value`` set an existing key (an unknown key is an error naming the closest existing keys);
        ``+a.b=value`` add a key (intermediate mappings are created); ``~a.b`` delete a key;
        ``optimizer=torch.optim.SGD`` on a ``_component_`` node swaps the component and keeps its other arguments.

    Args:
        cfg: the loaded config (not modified).
        overrides: override strings, applied in order.
        settings: the recipe's settings dataclass (what :func:`kdtune.config.read_settings` reads). A plain
            ``key=value`` may then also set a top-level setting the config leaves out (at its default), e.g.
            ``group_by_length=true`` or ``on_policy.lmbda=0.5``, as ``+key=value`` does; and a key that is neither in
            the config nor a setting is matched against both for the error's suggestions.

    Returns:
        A new ``DictConfig`` with the overrides applied.

    Raises:
        ConfigError: an override without ``=``, a malformed key or value, or a key that is not in the config.
    """
    cfg = copy.deepcopy(cfg)
    declared = settings_keys(settings)
    for override in overrides:
        if override.startswith("~"):
            key = override[1:].split("=", 1)[0]
            parts = parse_key(key, override)
            container = _navigate(cfg, parts, override, create=False)
            if not _has(container, parts[-1]):
                raise ConfigError(
                    f"override '{override}': cannot delete '{key}', it is not in the config "
                    f"(closest: {closest_keys(cfg, key)})"
                )
            del container[parts[-1]]
            continue
        if "=" not in override:
            raise ConfigError(
                f"override '{override}' has no '=': write key=value (e.g. optimizer.lr=1e-3), +new_key=value to add "
                "a key, or ~key to delete one"
            )
        key, raw = override.split("=", 1)
        add = key.startswith("+")
        key = key.lstrip("+")
        if not key:
            raise ConfigError(f"override '{override}' has no key before '='; write key=value")
        parts = parse_key(key, override)
        try:
            value = parse_value(raw)
        except ValueError as e:
            raise ConfigError(
                f"override '{override}': cannot parse the value: {e}; quote it to pass a string"
            ) from None
        # a setting the config leaves at its default: set like a new key (read_settings then checks its value)
        add = add or (parts[0] in declared and not _has(cfg, parts[0]))
        container = _navigate(cfg, parts, override, create=add, declared=declared)
        last = parts[-1]
        if isinstance(container, ListConfig):
            if not isinstance(last, int):
                raise ConfigError(f"override '{override}': '{_fmt(parts[:-1])}' is a list; index it like {key}[0]")
            if add and last == len(container):
                container.append(value)
                continue
            if not _has(container, last):
                raise ConfigError(
                    f"override '{override}': index {last} is out of range for '{_fmt(parts[:-1])}' "
                    f"(length {len(container)})"
                )
        elif not _has(container, last):
            if not add:
                raise _missing_key_error(cfg, override, parts, add_hint=True, declared=declared)
            if isinstance(last, int):
                raise ConfigError(f"override '{override}': '{_fmt(parts[:-1])}' is a mapping, not a list")
        existing = container._get_node(last) if _has(container, last) else None
        if (
            isinstance(existing, DictConfig)
            and not existing._is_none()
            and "_component_" in existing.keys()
            and isinstance(value, str)
            and not value.startswith("${")
        ):
            existing["_component_"] = value  # swap the component, keep its other arguments
        else:
            container[last] = value
    return cfg
