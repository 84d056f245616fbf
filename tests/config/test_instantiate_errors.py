"""Any exception raised while building a `_component_` becomes one ConfigError naming the config key."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdtune.config import instantiate
from kdtune.errors import DataError, KDTuneError


def raises_data_error(path: str) -> None:
    raise DataError(f"data file {path!r} is empty; give a file with rows")


def raises_runtime(n: int) -> None:
    raise RuntimeError(f"cannot build with n={n}\nsecond line of the message")


def test_optimizer_rejecting_its_arguments_names_the_key() -> None:
    cfg = OmegaConf.create({"optimizer": {"_component_": "torch.optim.AdamW", "lr": -1.0, "weight_decay": 0.0}})
    with pytest.raises(KDTuneError) as e:
        instantiate(cfg.optimizer, torch.nn.Linear(2, 2).parameters())
    assert str(e.value) == (
        "optimizer: torch.optim.AdamW(lr=-1.0, weight_decay=0.0) failed: Invalid learning rate: -1.0"
    )
    assert isinstance(e.value.__cause__, ValueError)  # --debug shows the original traceback
    cfg = OmegaConf.create({"optimizer": {"_component_": "torch.optim.SGD", "lr": "fast"}})
    with pytest.raises(KDTuneError, match=r"^optimizer: torch.optim.SGD\(lr='fast'\) failed: "):
        instantiate(cfg.optimizer, torch.nn.Linear(2, 2).parameters())


def test_nested_and_list_components_name_their_own_key() -> None:
    cfg = OmegaConf.create(
        {"a": {"_component_": "builtins.dict", "inner": [{"_component_": f"{__name__}.raises_runtime", "n": 3}]}}
    )
    with pytest.raises(KDTuneError) as e:
        instantiate(cfg.a)
    assert str(e.value) == (
        f"a.inner[0]: {__name__}.raises_runtime(n=3) failed: cannot build with n=3 second line of the message"
    )


def test_kdtune_errors_pass_through_unchanged() -> None:
    cfg = OmegaConf.create({"dataset": {"_component_": f"{__name__}.raises_data_error", "path": "x.jsonl"}})
    with pytest.raises(DataError) as e:
        instantiate(cfg.dataset)
    assert str(e.value) == "data file 'x.jsonl' is empty; give a file with rows"


def test_recipe_kwargs_and_component_arguments_are_summarised() -> None:
    cfg = OmegaConf.create({"m": {"_component_": f"{__name__}.raises_runtime", "n": {"_component_": "builtins.float"}}})
    with pytest.raises(KDTuneError, match=r"^m: .*raises_runtime\(n=builtins.float\(\.\.\.\)\) failed: cannot build"):
        instantiate(cfg.m)
    cfg = OmegaConf.create({"m": {"_component_": f"{__name__}.raises_runtime"}})
    with pytest.raises(KDTuneError, match=r"raises_runtime\(n=<from the recipe>\) failed: cannot build with n=7"):
        instantiate(cfg.m, n=7)
