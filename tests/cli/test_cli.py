"""The ``kdtune`` command end to end, through a subprocess, on a temporary tree of recipes and configs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

TINY_RECIPE = '''\
"""A tiny single-device recipe: one SGD step of a Linear layer built from the config."""

import json

import torch
from tiny_settings import Settings

from kdtune.config import instantiate, parse_recipe_args, read_settings, save_config
from kdtune.errors import DataError

RECIPE_DISTRIBUTED = False
RECIPE_SETTINGS = "tiny_settings.Settings"


def main(argv=None):
    cfg = parse_recipe_args(argv)
    s = read_settings(Settings, cfg)
    if s.fail:
        raise DataError("dataset column 'text' is missing in train.jsonl; set dataset.column=<name>")
    torch.manual_seed(0)
    model = instantiate(s.model)
    opt = instantiate(s.optimizer, model.parameters())
    loss = model(torch.ones(1, model.in_features)).sum()
    loss.backward()
    opt.step()
    save_config(cfg, f"{s.output_dir}/config.yaml")
    print("RESULT " + json.dumps({"kd_ratio": s.kd_ratio, "seed": s.seed, "run_id": s.run_id,
          "modules": s.lora_attn_modules, "optimizer": type(opt).__name__, "lr": opt.defaults["lr"],
          "out_features": model.out_features, "profiler": s.profiler is not None}))


if __name__ == "__main__":
    main()
'''

SETTINGS_MODULE = """\
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Settings:
    output_dir: str = field(metadata={"help": "where the resolved config goes"})
    model: Any = field(metadata={"help": "model component"})
    optimizer: Any = field(metadata={"help": "optimizer component"})
    log_dir: str = ""
    kd_ratio: float = 0.5
    seed: int | None = 0
    run_id: str = "x"
    lora_attn_modules: list[str] = field(default_factory=list)
    fail: bool = False
    profiler: Any = None
"""

DIST_FAIL_RECIPE = '''\
"""Fails on every rank with a user error, before importing torch."""

import os

from kdtune.config import parse_recipe_args
from kdtune.errors import DataError

RECIPE_DISTRIBUTED = True


def main(argv=None):
    parse_recipe_args(argv, print_config=False)
    raise DataError(f"rank {os.environ['RANK']}: shard 3 of train.jsonl is empty; regenerate it")


if __name__ == "__main__":
    main()
'''

DIST_RECIPE = '''\
"""A tiny distributed recipe: all_reduce over gloo."""

import os

import torch
import torch.distributed as dist

from kdtune.config import parse_recipe_args

RECIPE_DISTRIBUTED = True


def main(argv=None):
    cfg = parse_recipe_args(argv, print_config=False)
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    print(f"DIST rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item()} value={cfg.value}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
'''

TINY_CONFIG = """\
# a tiny config (this comment is kept by `kdtune cat`)
recipe: tiny
output_dir: {out}
log_dir: ${{output_dir}}/logs
kd_ratio: 0.5
seed: 0
run_id: abc
lora_attn_modules: [q_proj]
model:
  _component_: torch.nn.Linear
  in_features: 4
  out_features: 2
optimizer:
  _component_: torch.optim.AdamW
  lr: 0.001
  weight_decay: 0.0
profiler:
  enabled: false
"""

BAD_CONFIG = """\
recipe: tiny
model:
  _component_: torch.nn.Linear
  in_features: 4
  out_feature: 2
optimizer:
  _component_: torch.optim.AdamWW
losses:
  - _component_: torch.nn.CrossEntropyLoss
    ignore_idx: -100
  - _component_: torch.nn.MSELoss
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kdtune_tree")
    (root / "recipes").mkdir()
    (root / "configs" / "fam").mkdir(parents=True)
    (root / "recipes" / "tiny.py").write_text(TINY_RECIPE)
    (root / "recipes" / "tiny_dist.py").write_text(DIST_RECIPE)
    (root / "recipes" / "dist_fail.py").write_text(DIST_FAIL_RECIPE)
    (root / "lib").mkdir()
    (root / "lib" / "tiny_settings.py").write_text(SETTINGS_MODULE)
    (root / "configs" / "fam" / "dist_fail.yaml").write_text("recipe: dist_fail\n")
    (root / "configs" / "fam" / "tiny.yaml").write_text(TINY_CONFIG.format(out=root / "out"))
    (root / "configs" / "fam" / "dist.yaml").write_text("recipe: tiny_dist\nvalue: 1\n")
    (root / "configs" / "fam" / "bad.yaml").write_text(BAD_CONFIG)
    (root / "configs" / "fam" / "broken.yaml").write_text("recipe: tiny\nmodel:\n  a: 1\n   b: [1, 2\n")
    return root


@pytest.fixture
def inproc(tree: Path, monkeypatch) -> Path:
    """Run `kdtune.cli.main.main` in this process against the tree (as `kdtune run` runs single-device recipes)."""
    monkeypatch.setenv("KDTUNE_RECIPES_DIR", str(tree / "recipes"))
    monkeypatch.setenv("KDTUNE_CONFIGS_DIR", str(tree / "configs"))
    monkeypatch.setenv("KDTUNE_DEBUG", "0")
    monkeypatch.syspath_prepend(str(tree / "lib"))
    return tree


def kdtune(tree: Path, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "KDTUNE_RECIPES_DIR": str(tree / "recipes"),
        "KDTUNE_CONFIGS_DIR": str(tree / "configs"),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(tree / "lib"), os.environ.get("PYTHONPATH", "")]),
        "KDTUNE_DEBUG": "0",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "kdtune", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or tree,
        timeout=300,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The process failed with exactly one `kdtune: error:` line and no traceback; return that line."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kdtune: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_help_and_version(tree: Path) -> None:
    proc = kdtune(tree, "--help")
    assert proc.returncode == 0
    for command in ("ls", "cp", "cat", "validate", "run", "download", "quickstart"):
        assert command in proc.stdout
    proc = kdtune(tree, "--version")
    assert proc.returncode == 0 and proc.stdout.strip().startswith("kdtune ")


@pytest.mark.parametrize("command", ["ls", "cp", "cat", "validate", "run", "download"])
def test_command_help(command: str, capsys) -> None:
    from kdtune.cli.main import main

    try:
        code = main([command, "--help"])
    except SystemExit as e:  # argparse exits after printing help
        code = e.code
    assert code == 0
    assert "usage:" in capsys.readouterr().out


def test_ls(tree: Path) -> None:
    proc = kdtune(tree, "ls")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert rows[0] == ["RECIPE", "DISTRIBUTED", "CONFIGS"]
    assert ["tiny", "no", "fam/bad"] in rows and ["fam/tiny"] in rows
    assert ["tiny_dist", "yes", "fam/dist"] in rows
    assert "fam/broken (recipe: not set)" in proc.stdout  # a config whose recipe cannot be read is still listed


def test_cp(tree: Path, tmp_path: Path) -> None:
    proc = kdtune(tree, "cp", "fam/tiny", str(tmp_path / "mine"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mine.yaml").read_text() == (tree / "configs" / "fam" / "tiny.yaml").read_text()
    proc = kdtune(tree, "cp", "tiny", str(tmp_path))  # into a directory: keeps the name
    assert proc.returncode == 0 and (tmp_path / "tiny.py").read_text() == TINY_RECIPE
    (tmp_path / "mine.yaml").write_text("edited")
    proc = kdtune(tree, "cp", "fam/tiny", str(tmp_path / "mine.yaml"), "--no-clobber")
    assert proc.returncode == 0 and "already exists" in proc.stdout
    assert (tmp_path / "mine.yaml").read_text() == "edited"
    line = one_line_error(kdtune(tree, "cp", "fam/tiny", str(tmp_path / "a" / "b" / "c")))
    assert "does not exist" in line and "--make-parents" in line
    proc = kdtune(tree, "cp", "fam/tiny", str(tmp_path / "a" / "b" / "c"), "--make-parents")
    assert proc.returncode == 0 and (tmp_path / "a" / "b" / "c.yaml").is_file()
    line = one_line_error(kdtune(tree, "cp", "fam/tin", str(tmp_path)))
    assert "closest: fam/tiny" in line


def test_cat(tree: Path) -> None:
    proc = kdtune(tree, "cat", "fam/tiny")
    assert proc.returncode == 0
    assert proc.stdout == (tree / "configs" / "fam" / "tiny.yaml").read_text()  # verbatim, comments kept
    proc = kdtune(tree, "cat", str(tree / "configs" / "fam" / "tiny.yaml"), "--sort")
    keys = [line.split(":")[0] for line in proc.stdout.splitlines() if line and not line.startswith((" ", "-"))]
    assert keys == sorted(keys) and "kd_ratio" in keys
    assert "is a recipe, not a config" in one_line_error(kdtune(tree, "cat", "tiny"))
    assert "closest: fam/tiny" in one_line_error(kdtune(tree, "cat", "fam/tinyy"))


def test_validate(tree: Path, inproc: Path, capsys) -> None:
    proc = kdtune(tree, "validate", "fam/bad")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    problems = [line.strip() for line in proc.stderr.splitlines()[1:]]
    assert len(problems) == 5, proc.stderr
    assert problems[0].startswith(
        "model.out_feature: torch.nn.Linear has no argument 'out_feature' (closest: out_features"
    )
    assert problems[1].startswith("optimizer._component_: cannot import 'torch.optim.AdamWW'")
    assert problems[2].startswith("losses[0].ignore_idx: torch.nn.CrossEntropyLoss has no argument 'ignore_idx'")
    # the recipe declares RECIPE_SETTINGS: top-level keys are checked against its settings dataclass
    assert problems[3].startswith("settings of recipe tiny: unknown config key 'losses'")
    assert problems[4].startswith("settings of recipe tiny: required config key 'output_dir' is missing")  # all of them
    line = one_line_error(kdtune(tree, "validate", "fam/broken"))
    assert f"YAML syntax error in {tree / 'configs' / 'fam' / 'broken.yaml'}:4:" in line
    # the valid cases in-process (importing torch in yet another process costs seconds on a busy CI machine)
    from kdtune.cli.main import main

    assert main(["validate", "fam/tiny"]) == 0
    assert main(["validate", "fam/tiny", "model.in_features=3", "optimizer=torch.optim.SGD"]) == 0
    assert main(["validate", "fam/tiny", "+optimizer.nesterov=true"]) == 1  # AdamW has no nesterov
    assert "optimizer.nesterov: torch.optim.AdamW has no argument 'nesterov'" in capsys.readouterr().err
    assert main(["validate", "fam/tiny", "+kd_ration=0.1"]) == 1
    err = capsys.readouterr().err
    assert "settings of recipe tiny: unknown config key 'kd_ration' (did you mean kd_ratio?)" in err


def test_run_with_overrides(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = kdtune(
        tree,
        "run",
        "tiny",
        "--config",
        "fam/tiny",
        "kd_ratio=0.25",
        "optimizer.lr=1e-3",
        "lora_attn_modules=[q_proj,v_proj]",
        "seed=null",
        "run_id=007",
        f"output_dir={out}",
        "~profiler",
        "optimizer=torch.optim.SGD",
        "model.out_features=3",
        "+optimizer.momentum=0.9",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result == {
        "kd_ratio": 0.25,
        "seed": None,
        "run_id": "007",
        "modules": ["q_proj", "v_proj"],
        "optimizer": "SGD",
        "lr": 1e-3,
        "out_features": 3,
        "profiler": False,
    }
    assert f"log_dir: {out}/logs" in proc.stdout  # the resolved config is printed at start
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["log_dir"] == f"{out}/logs" and saved["run_id"] == "007" and "profiler" not in saved
    assert saved["optimizer"] == {"_component_": "torch.optim.SGD", "lr": 0.001, "weight_decay": 0.0, "momentum": 0.9}


def test_run_recipe_and_config_by_path(inproc: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    # in-process, as `kdtune run` runs single-device recipes (runpy in this interpreter)
    from kdtune.cli.main import main

    recipe = tmp_path / "my_recipe.py"
    recipe.write_text(TINY_RECIPE)
    config = tmp_path / "my.yaml"
    config.write_text(TINY_CONFIG.format(out=tmp_path / "o"))
    monkeypatch.chdir(tmp_path)
    argv_before, path_before = list(sys.argv), list(sys.path)
    assert main(["run", str(recipe), "--config", str(config), "model.in_features=2"]) == 0
    assert sys.argv == argv_before and sys.path == path_before
    assert "RESULT" in capsys.readouterr().out and (tmp_path / "o" / "config.yaml").is_file()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["tiny_recipe", "--config", "fam/tiny"], "unknown recipe 'tiny_recipe' (closest: tiny"),
        (["tiny", "--config", "fam/tin"], "unknown config 'fam/tin' (closest: fam/tiny"),
        (["tiny", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["tiny", "--config", "fam/broken"], "YAML syntax error in"),
        (["tiny", "--config", "fam/tiny", "kd_ratio"], "override 'kd_ratio' has no '='"),
        (["tiny", "--config", "fam/tiny", "kd_ration=0.1"], "'kd_ration' is not in the config (closest: kd_ratio"),
        (["tiny", "fam/tiny"], "missing --config"),
        ([], "missing recipe"),
    ],
)
def test_run_errors_are_one_line(tree: Path, args: list[str], expected: str) -> None:
    line = one_line_error(kdtune(tree, "run", *args))
    assert expected in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--nproc_per_nod", "2", "tiny", "--config", "fam/tiny"],
            "unknown option '--nproc_per_nod' before the recipe",
        ),
        (["--no-python", "tiny", "--config", "fam/tiny"], "--no-python is not supported"),
        (["--nnodes"], "--nnodes needs a value"),
    ],
)
def test_run_torchrun_option_errors(capsys, args: list[str], expected: str) -> None:
    from kdtune.cli.main import main

    assert main(["run", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("kdtune: error:") == 1 and expected in err, err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+fail=true", "dataset column 'text' is missing in train.jsonl"),  # a KDTuneError raised by the recipe
        ("+kd_ration=1", "unknown config key 'kd_ration' (did you mean kd_ratio?)"),
        ("model._component_=torch.nn.Linearr", "model._component_: cannot import 'torch.nn.Linearr'"),
        ("+model.biass=true", "model.biass: torch.nn.Linear has no argument 'biass' (closest: bias"),
    ],
)
def test_recipe_errors_in_process(inproc: Path, capsys, override: str, expected: str) -> None:
    from kdtune.cli.main import main

    code = main(["run", "tiny", "--config", "fam/tiny", f"output_dir={inproc / 'o2'}", override])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("kdtune: error:")]
    assert len(errors) == 1 and expected in errors[0], err


def test_debug_shows_traceback(inproc: Path, monkeypatch, capsys) -> None:
    from kdtune.cli.main import main

    monkeypatch.setenv("KDTUNE_DEBUG", "1")
    assert main(["run", "tiny", "--config", "fam/tiny", "+fail=true"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "DataError" in err
    assert err.strip().splitlines()[-1].startswith("kdtune: error: dataset column")
    monkeypatch.setenv("KDTUNE_DEBUG", "0")
    assert main(["--debug", "run", "tiny", "--config", "fam/tiny", "+fail=true"]) == 1  # --debug sets KDTUNE_DEBUG
    assert "Traceback" in capsys.readouterr().err


def test_run_distributed_through_torchrun(tree: Path) -> None:
    proc = kdtune(tree, "run", "--nproc_per_node", "2", "tiny_dist", "--config", "fam/dist", "value=5")
    assert proc.returncode == 0, proc.stderr
    # both ranks share the pipe: their lines may interleave mid-line, so match records rather than lines
    lines = sorted(re.findall(r"DIST rank=\d world=\d sum=[\d.]+ value=\d", proc.stdout))
    assert lines == ["DIST rank=0 world=2 sum=3.0 value=5", "DIST rank=1 world=2 sum=3.0 value=5"]


def test_run_distributed_worker_error_is_one_line(tree: Path) -> None:
    proc = kdtune(tree, "run", "dist_fail", "--config", "fam/dist_fail")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdtune: error:")]
    assert errors == [
        "kdtune: error: rank 0: shard 3 of train.jsonl is empty; regenerate it",
        "kdtune: error: the recipe failed on 1 process(es) (first: global rank 0, exit code 1); see the messages above",
    ], proc.stderr


def test_run_distributed_error_is_reported(tree: Path) -> None:
    proc = kdtune(tree, "run", "tiny_dist", "--config", "fam/dist", "+value=${nope}")
    line = one_line_error(proc)  # checked in the launcher before any worker starts
    assert "value: interpolation does not resolve" in line


def test_python_dash_m_entry_points(tree: Path) -> None:
    for module in ("kdtune", "kdtune.cli.main"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--version"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=60,
        )
        assert proc.returncode == 0 and proc.stdout.startswith("kdtune"), proc.stderr
