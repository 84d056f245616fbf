"""read_settings: typed recipe settings that reject unknown or misspelt keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdtune.config import describe_settings, read_settings, setting
from kdtune.errors import ConfigError


@dataclass
class LoggerSettings:
    log_every_n_steps: int = field(default=1, metadata={"help": "How often to log."})
    backend: Literal["stdout", "disk"] = "stdout"


@dataclass
class Settings:
    output_dir: Path = field(metadata={"help": "Where outputs go."})
    model: Any = field(metadata={"help": "Model component."})
    kd_ratio: float = field(default=0.5, metadata={"help": "Weight of the KD loss."})
    seed: int | None = 42
    compile: bool = False
    dtype: Literal["fp32", "bf16"] = "fp32"
    lora_attn_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    dataset: Any = None
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    name: str = "run"


BASE = {
    "recipe": "kd",
    "output_dir": "/tmp/out",
    "model": {"_component_": "torch.nn.Linear", "in_features": 2, "out_features": 2},
}


def make(**extra: Any) -> DictConfig:
    return OmegaConf.create({**BASE, **extra})


def test_reads_types_and_defaults() -> None:
    s = read_settings(
        Settings,
        make(
            kd_ratio=1,
            seed=None,
            lora_attn_modules=["q_proj"],
            dataset=[{"_component_": "a.b"}],
            logger={"log_every_n_steps": 5},
            name=7,
        ),
    )
    assert s.output_dir == Path("/tmp/out")
    assert isinstance(s.model, DictConfig) and s.model._component_ == "torch.nn.Linear"
    assert s.kd_ratio == 1.0 and isinstance(s.kd_ratio, float)
    assert s.seed is None and s.compile is False and s.dtype == "fp32"
    assert s.lora_attn_modules == ["q_proj"] and type(s.lora_attn_modules) is list
    assert isinstance(s.dataset, ListConfig)
    assert s.logger == LoggerSettings(log_every_n_steps=5, backend="stdout")
    assert s.name == "7"


def test_interpolations_resolve() -> None:
    cfg = make(name="${output_dir}/x")
    assert read_settings(Settings, cfg).name == "/tmp/out/x"


def test_unknown_keys_name_closest() -> None:
    with pytest.raises(ConfigError) as info:
        read_settings(Settings, make(kd_ration=0.3, compiel=True, zzz=1))
    msg = str(info.value)
    assert "'kd_ration' (did you mean kd_ratio?)" in msg
    assert "'compiel' (did you mean compile?)" in msg
    assert "'zzz'" in msg and "for Settings" in msg and "\n" not in msg


def test_nested_unknown_key() -> None:
    with pytest.raises(ConfigError, match=r"'logger\.log_every_n_step' \(did you mean logger\.log_every_n_steps\?\)"):
        read_settings(Settings, make(logger={"log_every_n_step": 3}))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"kd_ratio": "high"}, "kd_ratio: expected a number, got 'high'"),
        ({"compile": 1}, "compile: expected true or false, got 1"),
        ({"seed": 1.5}, "seed: 1.5 is not a valid int | None"),
        ({"dtype": "fp16"}, "dtype: 'fp16' is not one of 'fp32', 'bf16'"),
        ({"lora_attn_modules": "q_proj"}, "lora_attn_modules: expected a list"),
        ({"lora_attn_modules": [True]}, r"lora_attn_modules\[0\]: expected a string"),
        ({"kd_ratio": None}, "kd_ratio: null is not allowed here"),
        ({"logger": {"backend": "x"}}, "logger.backend: 'x' is not one of"),
        ({"kd_ratio": "???"}, r"kd_ratio: required value is missing \(\?\?\?\)"),
    ],
)
def test_type_errors(extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_settings(Settings, make(**extra))


def test_required_key_missing() -> None:
    cfg = OmegaConf.create({"output_dir": "/x"})
    with pytest.raises(ConfigError, match="required config key 'model' is missing"):
        read_settings(Settings, cfg)


def test_recipe_key_allowed_and_plain_dict_input() -> None:
    s = read_settings(Settings, {**BASE})
    assert s.kd_ratio == 0.5


def test_describe_settings() -> None:
    info = {i.name: i for i in describe_settings(Settings)}
    assert info["kd_ratio"].help == "Weight of the KD loss." and info["kd_ratio"].default == 0.5
    assert info["output_dir"].default is dataclasses.MISSING
    assert info["lora_attn_modules"].default == ["q_proj", "v_proj"]
    assert info["seed"].type == "int | None"


def test_not_a_dataclass() -> None:
    with pytest.raises(TypeError):
        read_settings(dict, make())  # type: ignore[arg-type]


@dataclass(kw_only=True)
class _Components:
    optimizer: Any = setting(help="optimizer", component=True)
    dataset: Any = setting(help="one or a list", component=True)
    val_dataset: Any = setting(None, help="optional", component=True)
    free: Any = None  # not a component slot: any mapping


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"val_dataset": {"data_files": "v.json"}}, "val_dataset: has no '_component_' key (the dotted path of what to "
         "build); add one, e.g. '+val_dataset._component_=kdtune.data.sft_dataset'"),
        ({"dataset": [{"_component_": "a.b"}, {"source": "x"}]}, "dataset[1]: has no '_component_' key"),
        ({"optimizer": "torch.optim.SGD"}, "optimizer='torch.optim.SGD' is not a `_component_` mapping; write e.g. "
         "'optimizer={_component_: torch.optim.SGD}'"),
    ],
)  # fmt: skip
def test_a_component_slot_needs_a_component(cfg: dict, message: str) -> None:
    """A setting marked component=True holds a `_component_` mapping (or a list of them), or null where allowed:
    anything else is one line naming the key and the override that fixes it, before anything is built."""
    base = {"optimizer": {"_component_": "torch.optim.AdamW"}, "dataset": {"_component_": "a.b"}, "free": {"x": 1}}
    assert read_settings(_Components, OmegaConf.create(base)).free == {"x": 1}
    with pytest.raises(ConfigError) as info:
        read_settings(_Components, OmegaConf.create({**base, **cfg}))
    assert str(info.value).startswith(message)
