"""Build ``_component_`` nodes (``instantiate``) and check them without building anything (``validate``)."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdtune.config._loader import check_resolvable
from kdtune.errors import ConfigError, KDTuneError

COMPONENT_KEY = "_component_"


def node_key(node: DictConfig | ListConfig) -> str:
    """The dotted key of a node inside its root config (``""`` for the root itself), e.g. ``loss.fns[1]``."""
    parts: list[Any] = []
    current: Any = node
    while current is not None and current._get_parent() is not None:
        parts.insert(0, current._key())
        current = current._get_parent()
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _where(key: str) -> str:
    return f"{key}._component_" if key else "_component_"


def import_component(path: str, key: str = "") -> Callable[..., Any]:
    """Import the object a ``_component_`` dotted path names (``torch.optim.SGD``).

    Args:
        path: dotted path, module part then attributes.
        key: dotted config key of the node, used in error messages.

    Raises:
        ConfigError: naming the key, the dotted path and why it does not import.
    """
    where = _where(key)
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"{where}: '{path}' is not a dotted import path; write e.g. torch.optim.AdamW")
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise ConfigError(f"{where}: cannot import '{path}': importing {module_name} failed: {e}") from None
        except Exception as e:  # noqa: BLE001 - any failure while importing the user's module is reported
            raise ConfigError(
                f"{where}: cannot import '{path}': importing {module_name} raised {type(e).__name__}: {e}"
            ) from None
        obj: Any = module
        for j, attr in enumerate(parts[i:]):
            if not hasattr(obj, attr):
                owner = ".".join(parts[: i + j])
                names = [n for n in dir(obj) if not n.startswith("_")]
                close = difflib.get_close_matches(attr, names, n=3, cutoff=0.6)
                raise ConfigError(
                    f"{where}: cannot import '{path}': '{owner}' has no attribute '{attr}' "
                    f"(closest: {', '.join(owner + '.' + c for c in close) if close else 'none'})"
                )
            obj = getattr(obj, attr)
        if not callable(obj):
            raise ConfigError(f"{where}: '{path}' is not callable (it is a {type(obj).__name__})")
        return obj
    raise ConfigError(f"{where}: cannot import '{path}': no module named '{parts[0]}'; check the spelling")


def _signature(target: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def binding_problems(target: Callable[..., Any], names: list[str], key: str, path: str) -> list[str]:
    """Config arguments that cannot bind to ``target``'s signature (positional arguments come from the recipe).

    Unknown argument names are problems (unless the target takes ``**kwargs``); so are required keyword-only
    arguments that are missing, since a recipe can pass extra arguments only positionally.
    """
    sig = _signature(target)
    if sig is None:
        return []
    params = sig.parameters
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    problems = []
    for name in names:
        param = params.get(name)
        if param is not None and param.kind is param.POSITIONAL_ONLY:
            problems.append(f"{key}.{name}: {path} takes '{name}' only positionally; remove it from the config")
        elif param is None and not takes_var_kw:
            close = difflib.get_close_matches(name, named, n=3, cutoff=0.5)
            problems.append(
                f"{key}.{name}: {path} has no argument '{name}' (closest: {', '.join(close) if close else 'none'}; "
                f"it takes: {', '.join(named) if named else 'no named arguments'})"
            )
    for name, p in params.items():
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty and name not in names:
            problems.append(f"{key}.{name}: required argument '{name}' of {path} is missing; add it under '{key}'")
    return problems


def _to_node(node: Any) -> Any:
    if isinstance(node, dict | list):
        return OmegaConf.create(node)
    return node


def _build(value: Any) -> Any:
    """Recursively build a config value: nested components are instantiated, containers become plain."""
    if isinstance(value, DictConfig):
        if value._is_none():
            return None
        if COMPONENT_KEY in value.keys():
            return instantiate(value)
        return {k: _build(_get(value, k)) for k in value.keys()}
    if isinstance(value, ListConfig):
        if value._is_none():
            return None
        return [_build(_get(value, i)) for i in range(len(value))]
    return value


def _get(node: DictConfig | ListConfig, k: Any) -> Any:
    try:
        return node[k]
    except OmegaConfBaseException as e:
        base = node_key(node)
        key = (f"{base}[{k}]" if isinstance(k, int) else f"{base}.{k}") if base else str(k)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot resolve the value: {msg}") from None


#: an example ``_component_`` for a config key, by a word in its last part (error messages only)
_COMPONENT_EXAMPLES = (
    ("teacher_logits", "kdtune.losses.CachedTeacher"),
    ("dataset", "kdtune.data.sft_dataset"),
    ("tokenizer", "kdtune.data.load_hf_tokenizer"),
    ("checkpointer", "kdtune.models.HFCheckpointer"),
    ("model", "kdtune.models.hf_model"),
    ("scheduler", "kdtune.training.get_cosine_schedule_with_warmup"),
    ("loss", "kdtune.losses.ForwardKLLoss"),
    ("logger", "kdtune.training.DiskLogger"),
    ("optimizer", "torch.optim.AdamW"),
)


def _component_example(key: str) -> str:
    """A plausible ``_component_`` for ``key`` (``val_dataset`` -> a dataset builder), else a placeholder."""
    last = key.rsplit(".", 1)[-1].lower()
    return next((path for word, path in _COMPONENT_EXAMPLES if word in last), "<package.module.callable>")


def missing_component_message(key: str, value: Any = None) -> str:
    """The one-line error for a component slot ``key`` that is not a ``_component_`` mapping (``value``: what is
    there instead, when it is not a mapping)."""
    example = _component_example(key)
    if value is not None and not isinstance(value, DictConfig | dict):
        if isinstance(value, str) and "." in value and " " not in value:
            example = value  # a dotted path given where its mapping belongs
        return (
            f"{key}={value!r} is not a `_component_` mapping; write e.g. '{key}={{_component_: {example}}}' "
            "on the command line (+ when the config has no such key)"
        )
    return (
        f"{key}: has no '_component_' key (the dotted path of what to build); add one, e.g. "
        f"'+{key}._component_={example}' on the command line"
    )


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the object a ``_component_`` node describes, building nested components first.

    Args:
        node: a ``DictConfig`` (or plain dict) with a ``_component_`` dotted path and its keyword arguments; None
            returns None.
        *args: positional arguments from the recipe, passed first (``instantiate(cfg.optimizer, model.parameters())``).
        **kwargs: keyword arguments that override or add to the config's.

    Returns:
        ``target(*args, **config_kwargs, **kwargs)``.

    Raises:
        ConfigError: no ``_component_``, the path does not import, the arguments do not bind, or building it raised
            (any exception other than a KDTuneError, which passes through), each naming the config key.
    """
    node = _to_node(node)
    if node is None or (isinstance(node, DictConfig) and node._is_none()):
        return None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"cannot instantiate a {type(node).__name__}: expected a mapping with a '_component_' key")
    key = node_key(node) or "<config>"
    if COMPONENT_KEY not in node.keys():
        raise ConfigError(missing_component_message(key))
    path = _get(node, COMPONENT_KEY)
    target = import_component(path, node_key(node))
    names = [k for k in node.keys() if k != COMPONENT_KEY and k not in kwargs]
    sig = _signature(target)
    if sig is not None:
        try:
            sig.bind(*args, **{n: None for n in names}, **kwargs)
        except TypeError as e:
            problems = binding_problems(target, [*names, *kwargs], key, path)
            detail = problems[0] if problems else f"{key}: arguments do not bind to {path}: {e}"
            raise ConfigError(detail) from None
    built = {k: _build(_get(node, k)) for k in names}
    built.update(kwargs)
    try:
        return target(*args, **built)
    except KDTuneError:
        raise  # already one clear line
    except Exception as e:  # noqa: BLE001 - whatever the component raises becomes one line naming the key
        raise ConfigError(f"{key}: {_call_repr(path, node, names, kwargs)} failed: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _short_repr(value: Any) -> str:
    if isinstance(value, DictConfig) and not value._is_none() and COMPONENT_KEY in value.keys():
        try:
            return f"{value[COMPONENT_KEY]}(...)"
        except OmegaConfBaseException:
            return "<component>"
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _call_repr(path: str, node: DictConfig, names: list[str], kwargs: dict[str, Any]) -> str:
    """``torch.optim.AdamW(lr=-1.0, ...)``: the config's arguments of a call, for an error message."""
    parts = []
    for name in names:
        try:
            parts.append(f"{name}={_short_repr(node[name])}")
        except OmegaConfBaseException:
            parts.append(f"{name}=<unresolved>")
    parts += [f"{name}=<from the recipe>" for name in kwargs]
    return f"{path}({', '.join(parts)})"


def validate(cfg: DictConfig) -> list[str]:
    """Check a config without building anything.

    Every ``_component_`` (nested ones and those inside lists included) must import and its config arguments must
    bind to its signature; every interpolation must resolve and no ``???`` value may be left unset.

    Args:
        cfg: the config.

    Returns:
        Every problem found, each one line starting with its dotted key (empty when the config is valid).
    """
    problems = check_resolvable(cfg)
    _validate_node(cfg, "", problems)
    return problems


def _validate_node(node: DictConfig | ListConfig, key: str, problems: list[str]) -> None:
    if isinstance(node, ListConfig):
        items = [(f"{key}[{i}]", node._get_node(i)) for i in range(len(node))]
    else:
        if COMPONENT_KEY in node.keys():
            try:
                path = node[COMPONENT_KEY]
            except OmegaConfBaseException:
                path = None  # reported by check_resolvable
            if path is not None:
                try:
                    target = import_component(path, key)
                except ConfigError as e:
                    problems.append(str(e))
                else:
                    names = [k for k in node.keys() if k != COMPONENT_KEY]
                    problems.extend(binding_problems(target, names, key or "<config>", path))
        items = [(f"{key}.{k}" if key else str(k), node._get_node(k)) for k in node.keys()]
    for child_key, child in items:
        if isinstance(child, DictConfig | ListConfig) and not child._is_none() and not child._is_missing():
            if child._is_interpolation():
                continue
            _validate_node(child, child_key, problems)
