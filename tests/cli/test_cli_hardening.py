"""Bad inputs through the `kdtune` command: each is refused with exit code 1 and one line naming the key, and nothing
is written before the refusal (table-driven, in-process as `kdtune run` runs single-device recipes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

RECIPE = '''\
"""A tiny recipe with constrained settings."""

import torch
from hard_settings import Settings

from kdtune.config import instantiate, parse_recipe_args, read_settings, save_config
from kdtune.errors import DataError

RECIPE_DISTRIBUTED = False
RECIPE_SETTINGS = "hard_settings.Settings"


def main(argv=None):
    cfg = parse_recipe_args(argv, print_config=False)
    s = read_settings(Settings, cfg)
    if s.fail:
        raise DataError("dataset train.jsonl is broken")
    model = instantiate(s.model)
    instantiate(s.optimizer, model.parameters())
    save_config(cfg, f"{s.output_dir}/config.yaml")
    print("RAN")


if __name__ == "__main__":
    main()
'''

OTHER_RECIPE = RECIPE.replace("hard_settings.Settings", "hard_settings.OtherSettings").replace(
    "import Settings", "import OtherSettings as Settings"
)

SETTINGS = """\
from dataclasses import dataclass
from typing import Any

from kdtune.config import setting


@dataclass(kw_only=True)
class Settings:
    output_dir: str = setting(help="out", non_empty=True)
    model: Any = setting(help="model")
    optimizer: Any = setting(help="optimizer")
    batch_size: int = setting(2, help="micro-batch", ge=1)
    kd_ratio: float = setting(0.5, help="mix", ge=0.0, le=1.0)
    temperature: float | None = setting(None, help="T", gt=0)
    save_every_n_steps: int | None = setting(None, help="period", ge=1)
    fail: bool = False


@dataclass(kw_only=True)
class OtherSettings:
    output_dir: str = setting(help="out", non_empty=True)
    model: Any = setting(help="model")
    optimizer: Any = setting(help="optimizer")
    teacher_model: Any = setting(help="teacher")
    fail: bool = False
"""

CONFIG = """\
recipe: {recipe}
output_dir: {out}
model:
  _component_: torch.nn.Linear
  in_features: 2
  out_features: 2
optimizer:
  _component_: torch.optim.AdamW
  lr: 0.001
  weight_decay: 0.0
"""


HARD_KEYS = "batch_size: 2\nkd_ratio: 0.5\ntemperature: null\nsave_every_n_steps: null\n"


@pytest.fixture
def tree(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "configs" / "h").mkdir(parents=True)
    (tmp_path / "lib").mkdir()
    (tmp_path / "recipes" / "hard.py").write_text(RECIPE)
    (tmp_path / "recipes" / "other.py").write_text(OTHER_RECIPE)
    (tmp_path / "lib" / "hard_settings.py").write_text(SETTINGS)
    hard = CONFIG.format(recipe="hard", out=tmp_path / "out") + HARD_KEYS
    (tmp_path / "configs" / "h" / "hard.yaml").write_text(hard)
    other = CONFIG.format(recipe="other", out=tmp_path / "out") + "teacher_model:\n  _component_: torch.nn.Linear\n"
    (tmp_path / "configs" / "h" / "other.yaml").write_text(other)
    monkeypatch.setenv("KDTUNE_RECIPES_DIR", str(tmp_path / "recipes"))
    monkeypatch.setenv("KDTUNE_CONFIGS_DIR", str(tmp_path / "configs"))
    monkeypatch.setenv("KDTUNE_DEBUG", "0")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    sys.modules.pop("hard_settings", None)
    return tmp_path


def one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("kdtune: error:")]
    assert len(lines) == 1, err
    return lines[0]


RUN = ["run", "hard", "--config", "h/hard"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([*RUN, "kd_ratio=1.5"], "kd_ratio=1.5 is out of range: allowed is >= 0.0 and <= 1.0"),
        ([*RUN, "temperature=0"], "temperature=0.0 is out of range: allowed is > 0, or null"),
        ([*RUN, "batch_size=-1"], "batch_size=-1 is out of range: allowed is >= 1"),
        ([*RUN, "save_every_n_steps=0"], "save_every_n_steps=0 is out of range"),
        ([*RUN, "output_dir="], "output_dir='' is empty"),
        ([*RUN, "optimizer.lr=-1"], "optimizer: torch.optim.AdamW(lr=-1, weight_decay=0.0) failed: Invalid learning"),
        ([*RUN, "optimizer.lr=abc"], "optimizer: torch.optim.AdamW(lr='abc', weight_decay=0.0) failed:"),
        (["run", "--nproc_per_node", "0", "hard", "--config", "h/hard"], "--nproc_per_node '0': expected the number"),
        (["run", "--nproc_per_node", "-2", "hard", "--config", "h/hard"], "--nproc_per_node '-2': expected"),
        (["run", "--nproc_per_node", "two", "hard", "--config", "h/hard"], "--nproc_per_node 'two': expected"),
        (["run", "--nproc-per-node=0", "hard", "--config", "h/hard"], "--nproc-per-node '0': expected"),
        (
            ["run", "hard", "--config", "h/other"],
            "config h/other belongs to recipe 'other' (its recipe: key), not 'hard': unknown config key "
            "'teacher_model'",
        ),
    ],
)
def test_bad_inputs_are_one_line_and_write_nothing(tree: Path, capsys, argv: list[str], expected: str) -> None:
    from kdtune.cli.main import main

    line = one_line(capsys, main(argv))
    assert expected in line, line
    assert not (tree / "out" / "config.yaml").exists()  # refused before the run wrote anything


def test_wrong_recipe_error_gives_the_command(tree: Path, capsys) -> None:
    from kdtune.cli.main import main

    line = one_line(capsys, main(["run", "hard", "--config", "h/other"]))
    assert line.endswith("run it with `kdtune run other --config h/other`")
    # the right recipe runs
    assert main(["run", "other", "--config", "h/other"]) == 0
    assert "RAN" in capsys.readouterr().out


def test_good_nproc_values_pass_the_check() -> None:
    from kdtune.cli._run import check_nproc_per_node

    assert check_nproc_per_node("4") == 4
    for word in ("auto", "cpu", "gpu"):
        assert check_nproc_per_node(word) == word


def test_a_plain_override_sets_a_setting_the_config_leaves_out(tree: Path, capsys) -> None:
    """`save_every_n_steps` is a setting of the recipe but not in its YAML: `key=value` sets it (the recipe itself
    parses without its settings: `kdtune run` hands it `+key=value`); a misspelt one names the setting."""
    from kdtune.cli.main import main

    assert main([*RUN, "save_every_n_steps=3", "kd_ratio=0.25"]) == 0
    assert "RAN" in capsys.readouterr().out
    assert main(["validate", "h/hard", "save_every_n_steps=3"]) == 0
    assert main([*RUN, "save_every_n_step=3"]) == 1
    assert "'save_every_n_step' is not in the config (closest: save_every_n_steps)" in capsys.readouterr().err


def test_validate_checks_values_as_run_does(tree: Path, capsys) -> None:
    from kdtune.cli.main import main

    assert main(["validate", "h/hard", "kd_ratio=1.5", "temperature=0", "batch_size=-1"]) == 1
    err = capsys.readouterr().err
    problems = [line.strip() for line in err.splitlines()[1:]]
    assert len(problems) == 3, err
    assert problems[0].startswith("settings of recipe hard: batch_size=-1 is out of range")
    assert "kd_ratio=1.5 is out of range" in problems[1] and "temperature=0.0 is out of range" in problems[2]
    assert main(["validate", "h/hard", "kd_ratio=1"]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug", *RUN, "+fail=true"],
        ["run", "--debug", "hard", "--config", "h/hard", "+fail=true"],
        [*RUN, "--debug", "+fail=true"],
        [*RUN, "+fail=true", "--debug"],
    ],
)
def test_debug_anywhere(tree: Path, capsys, argv: list[str], monkeypatch) -> None:
    from kdtune.cli.main import main

    monkeypatch.setenv("KDTUNE_DEBUG", "0")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "kdtune: error: dataset train.jsonl is broken"


def test_debug_after_a_subcommand(tree: Path, capsys, monkeypatch) -> None:
    from kdtune.cli.main import main

    monkeypatch.setenv("KDTUNE_DEBUG", "0")
    assert main(["validate", "h/hard", "--debug"]) == 0
    assert main(["cat", "h/hard", "--debug"]) == 0
    assert "config is valid" in capsys.readouterr().out
