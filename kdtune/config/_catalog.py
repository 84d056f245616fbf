"""Find shipped recipes and configs by scanning directories (no hand-written registry).

Search roots, in order of precedence:

1. ``KDTUNE_RECIPES_DIR`` / ``KDTUNE_CONFIGS_DIR`` (one or more directories joined with ``os.pathsep``);
2. the repository checkout the ``kdtune`` package was imported from (``<repo>/recipes``, ``<repo>/configs``);
3. the installed package data ``kdtune._recipes`` / ``kdtune._configs`` (non-editable ``pip install``).

A recipe is ``<root>/<name>.py`` (files starting with ``_`` are skipped). It declares at module top level
``RECIPE_DISTRIBUTED = True | False`` and optionally ``RECIPE_SETTINGS = "dotted.path.SettingsClass"``; both are read
with :mod:`ast`, without importing the recipe. A config is ``<root>/<dir>/<name>.yaml`` and is named by its path
relative to the root without the suffix (``llama3_2/kd``); it names its recipe with a top-level ``recipe:`` key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdtune.errors import ConfigError

_CONFIG_SUFFIXES = (".yaml", ".yml")
#: top-level key naming the config a config builds on: ``extends: llama3_2/kd`` (its keys override the base's)
EXTENDS_KEY = "extends"


@dataclass(frozen=True)
class RecipeInfo:
    """A recipe found on disk.

    Attributes:
        name: recipe name (the file stem), e.g. ``"kd_single_device"``.
        path: the ``.py`` file.
        distributed: the file's ``RECIPE_DISTRIBUTED`` value (False when absent).
        settings: the file's ``RECIPE_SETTINGS`` dotted path, or None.
        summary: first line of the module docstring ("" when absent).
    """

    name: str
    path: Path
    distributed: bool
    settings: str | None
    summary: str

    def settings_class(self) -> type | None:
        """The ``RECIPE_SETTINGS`` dataclass, imported (None when the recipe declares none).

        Raises:
            ConfigError: the dotted path does not import.
        """
        if not self.settings:
            return None
        from kdtune.config._instantiate import import_component

        return import_component(self.settings, "RECIPE_SETTINGS")  # type: ignore[return-value]


@dataclass(frozen=True)
class ConfigInfo:
    """A config found on disk: its name (``"llama3_2/kd"``), file and the recipe its ``recipe:`` key names."""

    name: str
    path: Path
    recipe: str | None


def _repo_root() -> Path | None:
    """The repository checkout containing the imported ``kdtune`` package, if it is one."""
    import kdtune

    root = Path(kdtune.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "kdtune"' in pyproject.read_text(encoding="utf-8", errors="replace"):
        return root
    return None


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _roots(env_var: str, repo_subdir: str, package: str) -> list[Path]:
    env = os.environ.get(env_var)
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    repo = _repo_root()
    if repo is not None and (repo / repo_subdir).is_dir():
        return [repo / repo_subdir]
    pkg = _package_dir(package)
    return [pkg] if pkg is not None else []


def recipe_roots() -> list[Path]:
    """Directories searched for recipes (see the module docstring)."""
    return _roots("KDTUNE_RECIPES_DIR", "recipes", "kdtune._recipes")


def config_roots() -> list[Path]:
    """Directories searched for configs (see the module docstring)."""
    return _roots("KDTUNE_CONFIGS_DIR", "configs", "kdtune._configs")


def _read_recipe_header(path: Path) -> tuple[bool, str | None, str]:
    """``RECIPE_DISTRIBUTED``, ``RECIPE_SETTINGS`` and the docstring's first line, read without importing."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"recipe {path} has a syntax error at line {e.lineno}: {e.msg}") from None
    distributed, settings = False, None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            targets = [node.target.id]
        else:
            continue
        value = node.value
        if "RECIPE_DISTRIBUTED" in targets and isinstance(value, ast.Constant):
            distributed = bool(value.value)
        if "RECIPE_SETTINGS" in targets and isinstance(value, ast.Constant) and isinstance(value.value, str):
            settings = value.value
    doc = ast.get_docstring(tree) or ""
    summary = doc.strip().splitlines()[0].strip() if doc.strip() else ""
    return distributed, settings, summary


def list_recipes() -> list[RecipeInfo]:
    """Every recipe under the recipe roots, sorted by name (earlier roots win on duplicate names)."""
    found: dict[str, RecipeInfo] = {}
    for root in recipe_roots():
        if not root.is_dir():
            continue
        for path in sorted(root.glob("*.py")):
            if path.name.startswith("_") or path.stem in found:
                continue
            distributed, settings, summary = _read_recipe_header(path)
            found[path.stem] = RecipeInfo(path.stem, path, distributed, settings, summary)
    return [found[k] for k in sorted(found)]


def _read_recipe_key(path: Path) -> tuple[str | None, str | None]:
    """``(recipe, extends)``: the top-level ``recipe:`` and ``extends:`` values of a YAML file (None if absent)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    recipe, base = data.get("recipe"), data.get(EXTENDS_KEY)
    return (recipe if isinstance(recipe, str) else None), (base if isinstance(base, str) else None)


def list_configs() -> list[ConfigInfo]:
    """Every config under the config roots, sorted by name (earlier roots win on duplicate names)."""
    found: dict[str, ConfigInfo] = {}
    for root in config_roots():
        if not root.is_dir():
            continue
        for path in sorted(p for suffix in _CONFIG_SUFFIXES for p in root.rglob(f"*{suffix}")):
            name = path.relative_to(root).with_suffix("").as_posix()
            if name in found or any(part.startswith((".", "_")) for part in path.relative_to(root).parts):
                continue
            found[name] = ConfigInfo(name, path, None)
    # the recipe a config names, or the one of the config it extends (followed by name, cycles ignored)
    headers = {name: _read_recipe_key(info.path) for name, info in found.items()}
    for name, info in found.items():
        recipe, base, seen = *headers[name], {name}
        while recipe is None and base in headers and base not in seen:
            seen.add(base)
            recipe, base = headers[base]
        found[name] = ConfigInfo(name, info.path, recipe)
    return [found[k] for k in sorted(found)]


def _closest(name: str, candidates: list[str], n: int = 3) -> str:
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not close:
        # also try matching the last path component (``kd`` -> ``llama3_2/kd``)
        close = [c for c in candidates if c.rsplit("/", 1)[-1] == name.rsplit("/", 1)[-1]][:n]
    return ", ".join(close) if close else "none"


def find_recipe(name_or_path: str) -> RecipeInfo:
    """Resolve a recipe name (``kd_single_device``) or a path to a ``.py`` file.

    Raises:
        ConfigError: no such recipe (names the closest ones) or the file is missing.
    """
    path = Path(name_or_path).expanduser()
    looks_like_path = name_or_path.endswith(".py") or os.sep in name_or_path or "/" in name_or_path
    if looks_like_path:
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path} does not exist; run `kdtune ls` to see shipped recipes")
        distributed, settings, summary = _read_recipe_header(path)
        return RecipeInfo(path.stem, path.resolve(), distributed, settings, summary)
    recipes = list_recipes()
    for r in recipes:
        if r.name == name_or_path:
            return r
    names = [r.name for r in recipes]
    raise ConfigError(
        f"unknown recipe '{name_or_path}' (closest: {_closest(name_or_path, names)}); "
        "run `kdtune ls` to see all recipes, or pass a path to a .py file"
    )


def find_config(name_or_path: str) -> Path:
    """Resolve a shipped config name (``llama3_2/kd``) or a path to a YAML file to an existing file.

    A unique file stem (``kd`` when only one ``*/kd.yaml`` exists) is accepted as a name too.

    Raises:
        ConfigError: the file is missing, or no shipped config has that name (names the closest ones).
    """
    path = Path(name_or_path).expanduser()
    if path.suffix in _CONFIG_SUFFIXES or path.is_file():
        if not path.is_file():
            raise ConfigError(
                f"config file {name_or_path} does not exist; pass an existing YAML file or a shipped config name "
                "(see `kdtune ls`)"
            )
        return path
    configs = list_configs()
    for c in configs:
        if c.name == name_or_path:
            return c.path
    same_stem = [c for c in configs if c.name.rsplit("/", 1)[-1] == name_or_path]
    if len(same_stem) == 1:
        return same_stem[0].path
    names = [c.name for c in configs]
    raise ConfigError(
        f"unknown config '{name_or_path}' (closest: {_closest(name_or_path, names)}); "
        "run `kdtune ls` to see all configs, or pass a path to a .yaml file"
    )
