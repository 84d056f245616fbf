"""config_diff: the keys a resumed run changed, for the resume decision (apply or refuse) and `kdtune runs`."""

from __future__ import annotations

from omegaconf import OmegaConf

from kdtune.config import ConfigChange, config_diff
from kdtune.config._diff import MISSING_VALUE


def test_changes_are_dotted_leaf_keys() -> None:
    old = OmegaConf.create(
        {
            "output_dir": "/r",
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3, "betas": [0.9, 0.999]},
            "batch_size": 4,
            "kd_ratio": 1,
            "log_dir": "${output_dir}/logs",
            "dataset": [{"source": "a.jsonl"}],
            "profiler": None,
        }
    )
    new = OmegaConf.create(
        {
            "output_dir": "/r",
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4, "betas": [0.9, 0.95]},
            "batch_size": 4,
            "kd_ratio": 1.0,  # 1 == 1.0: no change
            "log_dir": "/r/logs",  # equal once resolved
            "dataset": [{"source": "b.jsonl"}],
            "seed": 3,
            "resume_from_checkpoint": True,
        }
    )
    changes = config_diff(old, new, ignore=("resume_from_checkpoint",))
    assert [str(c) for c in changes] == [
        "optimizer.lr: 0.001 -> 0.0001",
        "optimizer.betas[1]: 0.999 -> 0.95",
        "dataset[0].source: 'a.jsonl' -> 'b.jsonl'",
        f"profiler: None -> {MISSING_VALUE!r}",
        f"seed: {MISSING_VALUE!r} -> 3",
    ]
    assert config_diff(old, old) == []
    assert config_diff({"a": [1, 2]}, {"a": [1]}) == [ConfigChange("a", [1, 2], [1])]
    assert config_diff({"a": True}, {"a": 1}) == [ConfigChange("a", True, 1)]
    assert config_diff({"opt": {"lr": 1}}, {"opt": {"lr": 2}}, ignore=("opt",)) == []
