"""Every shipped config loads, names an existing recipe, and validates recursively (imports + signature binding)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kdtune.config import find_recipe, load_config, read_settings, validate
from kdtune.config._instantiate import import_component

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.y*ml"))
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(autouse=True)
def _shipped_roots(monkeypatch) -> None:
    monkeypatch.setenv("KDTUNE_RECIPES_DIR", str(REPO / "recipes"))
    monkeypatch.setenv("KDTUNE_CONFIGS_DIR", str(REPO / "configs"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").with_suffix("").as_posix())
def test_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert "recipe" in cfg.keys(), f"{path} has no top-level `recipe:` key naming its recipe"
    recipe = find_recipe(str(cfg.recipe))
    problems = validate(cfg)
    assert problems == [], "\n".join(problems)
    if recipe.settings:
        read_settings(import_component(recipe.settings, "RECIPE_SETTINGS"), cfg)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_declares_how_it_runs(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    }
    assert "RECIPE_DISTRIBUTED" in names, f"{path.name} must declare RECIPE_DISTRIBUTED = True|False at top level"
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{path.name} has no main()"
