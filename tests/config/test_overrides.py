"""Override parsing and application: the edge cases a command line throws at a config."""

from __future__ import annotations

import dataclasses
import math

import pytest
from omegaconf import OmegaConf

from kdtune.config import apply_overrides, parse_value
from kdtune.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.25", 0.25),
        ("1e-3", 1e-3),
        ("-2.5E+2", -250.0),
        (".5", 0.5),
        ("3.", 3.0),
        ("42", 42),
        ("-7", -7),
        ("0", 0),
        ("007", "007"),  # leading zeros stay a string (a run id, a zip code)
        ("00.5", "00.5"),
        ("0x10", "0x10"),
        ("null", None),
        ("None", None),
        ("~", None),
        ("true", True),
        ("False", False),
        ("yes", "yes"),  # YAML 1.1 would make this a bool; we do not
        ("json", "json"),
        ("a=b=c", "a=b=c"),
        ("'007'", "007"),
        ('"1e-3"', "1e-3"),
        ("'null'", "null"),
        ("", ""),
        ("${output_dir}/logs", "${output_dir}/logs"),
        ("[q_proj,v_proj]", ["q_proj", "v_proj"]),
        ("[q_proj, v_proj, output_proj]", ["q_proj", "v_proj", "output_proj"]),
        ("[]", []),
        ("[1, 2.5, null, '3']", [1, 2.5, None, "3"]),
        ("[[1,2],[3]]", [[1, 2], [3]]),
        ("{a: 1, b: [x, y]}", {"a": 1, "b": ["x", "y"]}),
        ("['a,b', c]", ["a,b", "c"]),
        ("hf://org/name", "hf://org/name"),
    ],
)
def test_parse_value(text: str, expected: object) -> None:
    got = parse_value(text)
    assert got == expected
    assert type(got) is type(expected)


def test_parse_value_special_floats() -> None:
    assert parse_value("inf") == math.inf
    assert parse_value("-inf") == -math.inf
    assert math.isnan(parse_value("nan"))


def test_parse_value_unbalanced() -> None:
    with pytest.raises(ValueError):
        parse_value("[a, b")


@pytest.fixture
def cfg():
    return OmegaConf.create(
        {
            "recipe": "kd",
            "output_dir": "/tmp/run",
            "log_dir": "${output_dir}/logs",
            "seed": 42,
            "kd_ratio": 0.5,
            "run_id": "abc",
            "lora_attn_modules": ["q_proj"],
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 0.01},
            "profiler": {"enabled": False},
            "dataset": [{"_component_": "a.b", "path": "x.json"}, {"_component_": "a.c", "path": "y.json"}],
        }
    )


def test_basic_overrides(cfg) -> None:
    out = apply_overrides(
        cfg,
        [
            "kd_ratio=0.25",
            "optimizer.lr=1e-3",
            "lora_attn_modules=[q_proj,v_proj]",
            "seed=null",
            "run_id=007",
            "output_dir=/data/run=3",
            "~profiler",
            "dataset[1].path=z.json",
            "dataset.0.path=w.json",
        ],
    )
    assert out.kd_ratio == 0.25 and isinstance(out.kd_ratio, float)
    assert out.optimizer.lr == 1e-3
    assert list(out.lora_attn_modules) == ["q_proj", "v_proj"]
    assert out.seed is None
    assert out.run_id == "007"
    assert out.output_dir == "/data/run=3"
    assert out.log_dir == "/data/run=3/logs"  # interpolation follows the override
    assert "profiler" not in out
    assert out.dataset[1].path == "z.json" and out.dataset[0].path == "w.json"
    # the input config is not modified
    assert cfg.kd_ratio == 0.5 and "profiler" in cfg


def test_leading_zero_string_survives_yaml_round_trip(cfg, tmp_path) -> None:
    from kdtune.config import load_config, save_config

    out = apply_overrides(cfg, ["run_id=007"])
    path = save_config(out, tmp_path / "config.yaml")
    assert load_config(path).run_id == "007"


def test_component_swap_keeps_arguments(cfg) -> None:
    out = apply_overrides(cfg, ["optimizer=torch.optim.SGD"])
    assert out.optimizer._component_ == "torch.optim.SGD"
    assert out.optimizer.lr == 3e-4 and out.optimizer.weight_decay == 0.01


def test_replace_component_with_null_or_mapping(cfg) -> None:
    assert apply_overrides(cfg, ["optimizer=null"]).optimizer is None
    out = apply_overrides(cfg, ["optimizer={_component_: torch.optim.SGD, lr: 0.1}"])
    assert dict(out.optimizer) == {"_component_": "torch.optim.SGD", "lr": 0.1}


def test_add_keys(cfg) -> None:
    out = apply_overrides(cfg, ["+new_key=3", "+optimizer.momentum=0.9", "+a.b.c=x", "+lora_attn_modules[1]=v_proj"])
    assert out.new_key == 3 and out.optimizer.momentum == 0.9 and out.a.b.c == "x"
    assert list(out.lora_attn_modules) == ["q_proj", "v_proj"]


def test_interpolation_override(cfg) -> None:
    out = apply_overrides(cfg, ["+ckpt=${output_dir}/ckpt", "output_dir=/x"])
    assert out.ckpt == "/x/ckpt"


def test_missing_key_names_closest(cfg) -> None:
    with pytest.raises(ConfigError, match=r"'kd_ration' is not in the config \(closest: kd_ratio.*\+kd_ration=0.3"):
        apply_overrides(cfg, ["kd_ration=0.3"])
    with pytest.raises(ConfigError, match=r"optimizer\.lrr.*closest: optimizer\.lr"):
        apply_overrides(cfg, ["optimizer.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"'optimzer' is not in the config \(closest: optimizer"):
        apply_overrides(cfg, ["optimzer.lr=1e-3"])


@dataclasses.dataclass
class _Inner:
    lmbda: float = 0.0
    seq_kd: bool = False


@dataclasses.dataclass
class _RecipeSettings:
    kd_ratio: float = 0.5
    group_by_length: bool = False
    on_policy: _Inner | None = None


def test_a_plain_override_sets_a_recipe_setting_the_config_leaves_out(cfg) -> None:
    """With the recipe's settings, ``key=value`` sets a setting absent from the YAML (at its default) as ``+key``
    does; a misspelt one is matched against the settings too; keys that are not settings still need ``+``."""
    assert "group_by_length" not in cfg
    out = apply_overrides(cfg, ["group_by_length=true", "on_policy.lmbda=0.5"], settings=_RecipeSettings)
    assert out.group_by_length is True and out.on_policy.lmbda == 0.5
    with pytest.raises(ConfigError, match=r"'group_by_lenght' is not in the config \(closest: group_by_length\)"):
        apply_overrides(cfg, ["group_by_lenght=true"], settings=_RecipeSettings)
    with pytest.raises(ConfigError, match=r"'group_by_length' is not in the config \(closest: none\)"):
        apply_overrides(cfg, ["group_by_length=true"])  # without the settings: unknown, as before
    with pytest.raises(ConfigError, match=r"'optimizer.betas' is not in the config"):
        apply_overrides(cfg, ["optimizer.betas=[0.9,0.95]"], settings=_RecipeSettings)  # a component argument


def test_errors_are_one_line(cfg) -> None:
    cases = {
        "kd_ratio": "has no '='",
        "~nope": "cannot delete 'nope'",
        "seed.x=1": "is a value, not a mapping",
        "dataset[5].path=a": "out of range",
        "=3": "has no key",
        "a..b=1": "malformed key",
        "kd_ratio=[1,2": "cannot parse the value",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as info:
            apply_overrides(cfg, [override])
        assert message in str(info.value)
        assert "\n" not in str(info.value)
