"""Value constraints declared in a settings field's metadata and enforced by read_settings / check_settings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from omegaconf import OmegaConf

from kdtune.config import check_settings, describe_settings, read_settings, setting
from kdtune.errors import ConfigError


def _power_of_two(v: int) -> str | None:
    """A power of two."""
    return None if v > 0 and v & (v - 1) == 0 else "must be a power of two (1, 2, 4, ...)"


@dataclass
class Inner:
    every_n: int | None = setting(None, help="period", ge=1)


@dataclass(kw_only=True)
class S:
    output_dir: str = setting(help="where", non_empty=True)
    batch_size: int = setting(2, help="micro-batch", ge=1)
    kd_ratio: float = setting(0.5, help="mix", ge=0.0, le=1.0)
    temperature: float | None = setting(None, help="T", gt=0)
    save_every_n_steps: int | None = setting(None, help="period", ge=1)
    dtype: str = setting("fp32", help="precision", choices=("fp32", "bf16"))
    mode: Literal["a", "b"] = "a"
    chunks: int = setting(8, help="chunks", check=_power_of_two)
    modules: list[str] = setting(["q_proj"], help="targets", non_empty=True)
    inner: Inner = field(default_factory=Inner)
    model: Any = None


def cfg(**kw: Any):
    return OmegaConf.create({"output_dir": "/tmp/x", **kw})


def test_valid_values_and_null_switches_off() -> None:
    s = read_settings(S, cfg(kd_ratio=0, temperature=None, save_every_n_steps=None, chunks=4, inner={"every_n": 3}))
    assert (s.kd_ratio, s.temperature, s.save_every_n_steps, s.chunks, s.inner.every_n) == (0.0, None, None, 4, 3)
    assert read_settings(S, cfg(kd_ratio=1, temperature=0.5, save_every_n_steps=1)).kd_ratio == 1.0
    # list defaults are copied per instance
    a, b = read_settings(S, cfg()), read_settings(S, cfg())
    assert a.modules == ["q_proj"] and a.modules is not b.modules


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"batch_size": 0}, "batch_size=0 is out of range: allowed is >= 1; set batch_size=<value>"),
        ({"batch_size": -1}, "batch_size=-1 is out of range: allowed is >= 1"),
        ({"kd_ratio": 1.5}, "kd_ratio=1.5 is out of range: allowed is >= 0.0 and <= 1.0"),
        ({"kd_ratio": -0.1}, "kd_ratio=-0.1 is out of range"),
        ({"kd_ratio": float("nan")}, "kd_ratio=nan is out of range"),
        ({"temperature": 0}, "temperature=0.0 is out of range: allowed is > 0, or null"),
        ({"save_every_n_steps": 0}, "save_every_n_steps=0 is out of range: allowed is >= 1, or null"),
        ({"dtype": "fp16"}, "dtype='fp16' is not allowed: allowed is one of 'fp32', 'bf16'"),
        ({"output_dir": ""}, "output_dir='' is empty: allowed is not empty; set output_dir=<value>"),
        ({"output_dir": "  "}, "output_dir='  ' is empty"),
        ({"modules": []}, "modules=[] is empty"),
        ({"chunks": 6}, "chunks=6 is not allowed: must be a power of two (1, 2, 4, ...)"),
        ({"inner": {"every_n": 0}}, "inner.every_n=0 is out of range: allowed is >= 1, or null"),
    ],
)
def test_refused_values_name_key_value_and_allowed(override: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        read_settings(S, cfg(**override))
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_type_errors_still_come_first() -> None:
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        read_settings(S, cfg(batch_size="two"))
    with pytest.raises(ConfigError, match="batch_size: null is not allowed"):
        read_settings(S, cfg(batch_size=None))


def test_check_settings_lists_every_problem() -> None:
    problems = check_settings(S, cfg(kd_ratio=1.5, temperature=0, batch_size=-1, kd_ration=2, inner={"every_n": 0}))
    assert len(problems) == 5, problems
    assert problems[0].startswith("unknown config key 'kd_ration' (did you mean kd_ratio?)")
    joined = "\n".join(problems)
    for key in ("batch_size=-1", "kd_ratio=1.5", "temperature=0.0", "inner.every_n=0"):
        assert key in joined
    assert check_settings(S, cfg()) == []
    with pytest.raises(ConfigError, match="unknown config key 'kd_ration'"):  # read_settings raises the first
        read_settings(S, cfg(kd_ratio=1.5, kd_ration=2))


def test_describe_settings_shows_allowed() -> None:
    info = {i.name: i for i in describe_settings(S)}
    assert info["kd_ratio"].allowed == ">= 0.0 and <= 1.0"
    assert info["save_every_n_steps"].allowed == ">= 1, or null"
    assert info["chunks"].allowed == "A power of two"
    assert info["mode"].allowed == ""
    assert info["batch_size"].help == "micro-batch"


def test_metadata_written_by_hand_is_enforced() -> None:
    # a plain dataclasses.field with the constraint in its metadata works the same (what recipe_settings._f builds)
    @dataclass
    class Plain:
        clip_grad_norm: float | None = field(default=None, metadata={"help": "clip", "gt": 0})

    assert read_settings(Plain, OmegaConf.create({"clip_grad_norm": None})).clip_grad_norm is None
    assert math.isclose(read_settings(Plain, OmegaConf.create({"clip_grad_norm": 1})).clip_grad_norm, 1.0)
    with pytest.raises(ConfigError, match=r"clip_grad_norm=-1.0 is out of range: allowed is > 0, or null"):
        read_settings(Plain, OmegaConf.create({"clip_grad_norm": -1}))


def test_setting_refuses_unknown_constraint_names() -> None:
    with pytest.raises(TypeError, match="unknown setting constraint"):
        setting(1, help="x", gte=1)
    with pytest.raises(TypeError, match="callable"):
        setting(1, help="x", check="not callable")
    f = setting(help="required")
    assert f.default is dataclasses.MISSING and f.metadata["help"] == "required"
