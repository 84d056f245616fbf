"""instantiate (nested and list components, recipe args) and validate (every problem with its dotted key)."""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from kdtune.config import instantiate, validate
from kdtune.errors import ConfigError


def make_pipeline(layers: list, head: torch.nn.Module, *, name: str = "p", extra: dict | None = None) -> dict:
    """A test component: lists of components and a nested component arrive built; plain mappings arrive as dicts."""
    return {"layers": layers, "head": head, "name": name, "extra": extra}


def needs_keyword(x: int, *, required_kw: str) -> str:
    return f"{x}-{required_kw}"


def positional_only(a: int, /, b: int = 0) -> int:
    return a + b


CFG = OmegaConf.create(
    {
        "width": 8,
        "pipeline": {
            "_component_": "tests.config.test_instantiate.make_pipeline",
            "layers": [
                {"_component_": "torch.nn.Linear", "in_features": 4, "out_features": "${width}"},
                {"_component_": "torch.nn.ReLU"},
            ],
            "head": {
                "_component_": "torch.nn.Sequential",
            },
            "extra": {"a": [1, 2], "b": {"c": "${width}"}},
        },
        "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
    }
)


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    # make this test module importable by its dotted name for the _component_ paths above
    import sys

    monkeypatch.setitem(sys.modules, "tests.config.test_instantiate", sys.modules[__name__])


def test_nested_and_list_components() -> None:
    built = instantiate(CFG.pipeline)
    linear, relu = built["layers"]
    assert isinstance(linear, torch.nn.Linear) and linear.out_features == 8
    assert isinstance(relu, torch.nn.ReLU)
    assert isinstance(built["head"], torch.nn.Sequential)
    assert built["extra"] == {"a": [1, 2], "b": {"c": 8}}
    assert type(built["extra"]) is dict and type(built["extra"]["a"]) is list


def test_positional_args_and_kwargs() -> None:
    model = torch.nn.Linear(2, 2)
    opt = instantiate(CFG.optimizer, model.parameters(), lr=0.5)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["lr"] == 0.5 and opt.defaults["momentum"] == 0.9


def test_plain_dict_and_none() -> None:
    assert instantiate(None) is None
    layer = instantiate({"_component_": "torch.nn.Linear", "in_features": 3, "out_features": 1})
    assert isinstance(layer, torch.nn.Linear) and layer.in_features == 3
    part = instantiate({"_component_": "functools.partial"}, max, 3)
    assert isinstance(part, functools.partial) and part(5) == 5


def test_instantiate_errors_name_the_key() -> None:
    cfg = OmegaConf.create(
        {
            "opt": {"_component_": "torch.optim.SGDD", "lr": 0.1},
            "bad_arg": {"_component_": "torch.nn.Linear", "in_features": 1, "out_features": 1, "biass": True},
            "no_comp": {"lr": 1},
            "nested": {"_component_": "torch.nn.Sequential", "x": {"_component_": "nope_mod.thing"}},
            "missing_pos": {"_component_": "torch.nn.Linear", "in_features": 1},
        }
    )
    with pytest.raises(
        ConfigError, match=r"^opt\._component_: cannot import 'torch.optim.SGDD'.*closest: torch.optim.SGD"
    ):
        instantiate(cfg.opt, [torch.zeros(1, requires_grad=True)])
    with pytest.raises(ConfigError, match=r"^bad_arg\.biass: torch.nn.Linear has no argument 'biass' \(closest: bias"):
        instantiate(cfg.bad_arg)
    with pytest.raises(ConfigError, match=r"^no_comp: has no '_component_' key.*'\+no_comp\._component_=<package"):
        instantiate(cfg.no_comp)
    for key, example in [("val_dataset", "kdtune.data.sft_dataset"), ("lr_scheduler", "kdtune.training.get_cosine"),
                         ("teacher_checkpointer", "kdtune.models.HFCheckpointer"), ("optimizer", "torch.optim.AdamW")]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^{key}: has no '_component_' key.*\+{key}\._component_={example}"):
            instantiate(OmegaConf.create({key: {"lr": 1}})[key])
    with pytest.raises(ConfigError, match=r"missing_pos: arguments do not bind to torch.nn.Linear: .*out_features"):
        instantiate(cfg.missing_pos)


def test_validate_reports_every_problem_with_dotted_keys() -> None:
    cfg = OmegaConf.create(
        {
            "output_dir": "/tmp/x",
            "model": {"_component_": "torch.nn.Linear", "in_features": 4, "out_features": 2, "bais": True},
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3},  # params come from the recipe: fine
            "loss": {
                "_component_": "tests.config.test_instantiate.make_pipeline",
                "head": {"_component_": "torch.nn.Identity"},
                "layers": [
                    {"_component_": "torch.nn.CrossEntropyLoss", "ignore_indx": -100},
                    {"_component_": "kdtune.no_such_module.Loss"},
                ],
            },
            "kw": {"_component_": "tests.config.test_instantiate.needs_keyword"},
            "posonly": {"_component_": "tests.config.test_instantiate.positional_only", "a": 1},
            "log_dir": "${outptu_dir}/logs",
            "tokenizer_path": "???",
            "not_dotted": {"_component_": "Linear"},
        }
    )
    problems = validate(cfg)
    joined = "\n".join(problems)
    assert all("\n" not in p for p in problems)
    assert "model.bais: torch.nn.Linear has no argument 'bais' (closest: bias" in joined
    assert (
        "loss.layers[0].ignore_indx: torch.nn.CrossEntropyLoss has no argument 'ignore_indx' (closest: ignore_index"
        in joined
    )
    assert "loss.layers[1]._component_: cannot import 'kdtune.no_such_module.Loss'" in joined
    assert "kw.required_kw: required argument 'required_kw'" in joined
    assert "posonly.a: " in joined and "only positionally" in joined
    assert any(p.startswith("log_dir: interpolation does not resolve") for p in problems)
    assert any(p.startswith("tokenizer_path: required value is missing") for p in problems)
    assert "not_dotted._component_: 'Linear' is not a dotted import path" in joined
    assert not any(p.startswith("optimizer") for p in problems)
    assert len(problems) == 8, problems


def test_validate_clean_config_and_no_build(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch.nn.Linear, "__init__", lambda *a, **k: calls.append(1))
    cfg = OmegaConf.create({"m": {"_component_": "torch.nn.Linear", "in_features": 1, "out_features": 1}})
    assert validate(cfg) == []
    assert calls == []  # nothing was built
    assert isinstance(cfg.m, DictConfig)
