"""load_config by name or path, YAML errors, save_config, parse_recipe_args, recipe discovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdtune.config import (
    find_recipe,
    list_configs,
    list_recipes,
    load_config,
    parse_recipe_args,
    save_config,
)
from kdtune.errors import ConfigError


@pytest.fixture
def tree(tmp_path: Path, monkeypatch) -> Path:
    recipes, configs = tmp_path / "recipes", tmp_path / "configs"
    (configs / "fam").mkdir(parents=True)
    recipes.mkdir()
    (recipes / "__init__.py").write_text("")
    (recipes / "_helper.py").write_text("RECIPE_DISTRIBUTED = True\n")
    (recipes / "train_one.py").write_text('"""Train on one device.\n\nMore."""\nRECIPE_DISTRIBUTED = False\n')
    (recipes / "train_many.py").write_text(
        'RECIPE_DISTRIBUTED: bool = True\nRECIPE_SETTINGS = "pkg.mod.Settings"\nimport sys\nsys.exit(3)\n'
    )
    (configs / "fam" / "small.yaml").write_text("recipe: train_one\nlr: 1.0e-3\nout: /tmp/o\nlog: ${out}/log\n")
    (configs / "fam" / "big.yaml").write_text("recipe: train_many\nlr: 0.1\n")
    (configs / "other.yml").write_text("lr: 2\n")
    (configs / "fam" / "broken.yaml").write_text("lr: 1\nmodel:\n  a: 1\n    b: 2\n")
    monkeypatch.setenv("KDTUNE_RECIPES_DIR", str(recipes))
    monkeypatch.setenv("KDTUNE_CONFIGS_DIR", str(configs))
    return tmp_path


def test_discovery(tree: Path) -> None:
    recipes = {r.name: r for r in list_recipes()}
    assert set(recipes) == {"train_one", "train_many"}  # _helper and __init__ are not recipes
    assert recipes["train_one"].distributed is False and recipes["train_one"].summary == "Train on one device."
    assert recipes["train_many"].distributed is True and recipes["train_many"].settings == "pkg.mod.Settings"
    configs = {c.name: c.recipe for c in list_configs()}
    assert configs == {"fam/small": "train_one", "fam/big": "train_many", "other": None, "fam/broken": None}


def test_load_by_name_path_and_stem(tree: Path) -> None:
    assert load_config("fam/small").lr == 1e-3
    assert load_config(tree / "configs" / "fam" / "big.yaml").lr == 0.1
    assert load_config("big").lr == 0.1  # a unique stem is accepted too


def test_unknown_names(tree: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config 'fam/smal' \(closest: fam/small"):
        load_config("fam/smal")
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist"):
        load_config(str(tree / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"unknown recipe 'train_on' \(closest: train_one"):
        find_recipe("train_on")
    with pytest.raises(ConfigError, match=r"recipe file .*x\.py does not exist"):
        find_recipe(str(tree / "x.py"))


def test_yaml_syntax_error_has_file_line_column(tree: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("fam/broken")
    msg = str(info.value)
    assert f"YAML syntax error in {tree / 'configs' / 'fam' / 'broken.yaml'}:4:" in msg
    assert "\n" not in msg


def test_top_level_list_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path)


def test_save_config_resolves_and_is_atomic(tree: Path, tmp_path: Path) -> None:
    cfg = load_config("fam/small")
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert out.read_text().count("${") == 0
    assert OmegaConf.load(out).log == "/tmp/o/log"
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind
    bad = OmegaConf.create({"a": "${nope}"})
    with pytest.raises(ConfigError, match="a: interpolation does not resolve"):
        save_config(bad, tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()


def test_parse_recipe_args(tree: Path, capsys) -> None:
    cfg = parse_recipe_args(["--config", "fam/small", "lr=0.5", "+extra=[1,2]", "out=/x"])
    assert cfg.lr == 0.5 and list(cfg.extra) == [1, 2] and cfg.log == "/x/log"
    printed = capsys.readouterr().out
    assert "lr: 0.5" in printed and "log: /x/log" in printed
    cfg = parse_recipe_args(["lr=2", "--config=fam/small"], print_config=False)
    assert cfg.lr == 2 and capsys.readouterr().out == ""


def test_parse_recipe_args_prints_on_rank_zero_only(tree: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    parse_recipe_args(["--config", "fam/small"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "missing --config"),
        (["--config"], "--config needs a value"),
        (["--config", "fam/small", "--config", "fam/big"], "--config is given twice"),
        (["--config", "fam/small", "--lr", "3"], "unknown option '--lr'"),
        (["--config", "fam/small", "lr"], "has no '='"),
        (["--config", "fam/small", "lrr=1"], "closest: lr"),
        (["--config", "fam/small", "log=${nope}"], "log: interpolation does not resolve"),
    ],
)
def test_parse_recipe_args_errors(tree: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_recipe_args(argv, print_config=False)


def test_parse_recipe_args_help(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_recipe_args(["--help"])
    assert info.value.code == 0 and "--config" in capsys.readouterr().out


def test_default_roots_point_at_the_checkout(monkeypatch) -> None:
    monkeypatch.delenv("KDTUNE_RECIPES_DIR", raising=False)
    monkeypatch.delenv("KDTUNE_CONFIGS_DIR", raising=False)
    from kdtune.config import config_roots, recipe_roots

    repo = Path(__file__).resolve().parents[2]
    assert recipe_roots() == [repo / "recipes"] and config_roots() == [repo / "configs"]
    assert os.path.isfile(repo / "configs" / "__init__.py")
