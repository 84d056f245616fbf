"""Every shipped config validates (components import, arguments bind) and reads into its recipe's settings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdtune.config import load_config, read_settings, validate
from kdtune.training.settings import FinetuneSettings, KDSettings, LoRAFinetuneSettings

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))
SETTINGS = {
    "knowledge_distillation_single_device": KDSettings,
    "lora_finetune_single_device": LoRAFinetuneSettings,
    "full_finetune_single_device": FinetuneSettings,
}
MINE = [p for p in CONFIGS if OmegaConf.load(p).get("recipe") in SETTINGS and "quickstart" not in p.parts]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.get("recipe"), f"{path}: no top-level `recipe:` key"
    assert (ROOT / "recipes" / f"{cfg.recipe}.py").is_file(), f"{path}: recipe {cfg.recipe} does not exist"
    assert validate(cfg) == []


@pytest.mark.parametrize("path", MINE, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_single_device_configs_read_into_settings(path: Path) -> None:
    cfg = load_config(path)
    read_settings(SETTINGS[cfg.recipe], cfg)  # unknown or mistyped keys would raise
    text = path.read_text()
    assert f"kdtune run {cfg.recipe} --config" in text, "the top comment must give the run command"
    if "tiny" not in path.parts:
        assert "kdtune download" in text, "the top comment must give the download command(s)"


@pytest.mark.parametrize(
    "alias, original",
    [
        ("llama3_2/knowledge_distillation_single_device", "llama3_2/kd"),
        ("qwen2/knowledge_distillation_single_device", "qwen2/kd"),
    ],
)
def test_tutorial_config_names_are_aliases_of_the_originals(alias: str, original: str) -> None:
    """The torchtune tutorial's names are two-line `extends:` aliases (not copies that drift) loading the same keys."""
    from omegaconf import OmegaConf

    from kdtune.config import load_config
    from kdtune.config._catalog import list_configs

    assert f"extends: {original}" in (ROOT / "configs" / f"{alias}.yaml").read_text()
    assert OmegaConf.to_container(load_config(alias)) == OmegaConf.to_container(load_config(original))
    recipes = {c.name: c.recipe for c in list_configs()}
    assert recipes[alias] == recipes[original]


def test_extends_cycle_and_bad_value_are_clear_errors(tmp_path) -> None:
    from kdtune.config import load_config
    from kdtune.errors import ConfigError

    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\nx: 1\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: [1, 2]\n")
    with pytest.raises(ConfigError, match="extends must name one config"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: llama3_2/kd\nkd_ratio: 0.25\n")
    cfg = load_config(tmp_path / "d.yaml")
    assert cfg.kd_ratio == 0.25 and cfg.recipe == "knowledge_distillation_single_device" and "extends" not in cfg


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_recipe_declares_single_device(name: str) -> None:
    tree = ast.parse((ROOT / "recipes" / f"{name}.py").read_text())
    values = [
        n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "RECIPE_DISTRIBUTED" for t in n.targets)
    ]
    assert values == [False]


def test_misspelt_key_is_refused() -> None:
    from kdtune.errors import ConfigError

    cfg = load_config(ROOT / "configs" / "tiny" / "kd.yaml")
    cfg.kd_ratoi = 0.3
    with pytest.raises(ConfigError, match="kd_ratoi.*kd_ratio"):
        read_settings(KDSettings, cfg)


def test_recipe_docs_list_every_key() -> None:
    from kdtune.config import describe_settings

    for name, cls in SETTINGS.items():
        doc = (ROOT / "docs" / "recipes" / f"{name}.md").read_text()
        for info in describe_settings(cls):
            assert f"`{info.name}`" in doc, f"docs/recipes/{name}.md does not document {info.name}"


def test_recipe_docs_are_generated_from_settings() -> None:
    from kdtune.training.settings import RECIPES, recipe_doc

    for name in RECIPES:
        assert (ROOT / "docs" / "recipes" / f"{name}.md").read_text() == recipe_doc(name), (
            "stale docs: run `python -m kdtune.training.settings docs/recipes`"
        )


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "llama3_2/knowledge_distillation_single_device", "optimizer.lr=1e-3"],
        ["--config", "llama3_2/knowledge_distillation_single_device", "kd_ratio=0.25", "temperature=2.0"],
        ["--config", "llama3_2/kd", "teacher_checkpointer.checkpoint_dir=/tmp/Meta-Llama-3.1-8B-Instruct/"],
        [
            "--config",
            "qwen2/knowledge_distillation_single_device",
            "kd_loss=kdtune.losses.JSDLoss",
            "+kd_loss.beta=0.5",
        ],
    ],
)
def test_tutorial_ablation_overrides(argv: list[str]) -> None:
    """The seed-003 tutorial's command-line ablations parse and read into the KD settings."""
    from kdtune.config import parse_recipe_args

    s = read_settings(KDSettings, parse_recipe_args(argv, print_config=False))
    assert 0.0 <= s.kd_ratio <= 1.0 and s.teacher_checkpointer.checkpoint_dir
