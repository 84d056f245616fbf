"""Shared helpers for the model parity tests: build a transformers model on a tiny config and save it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")


def save_hf_model(config_cls_name: str, model_cls_name: str, out_dir: Path, seed: int = 0, **config: Any):
    """Build ``transformers.<model_cls_name>(<config_cls_name>(**config))`` with random weights, save it, return it."""
    cfg = getattr(transformers, config_cls_name)(**config)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(cfg).eval()
    with torch.no_grad():  # make norms/biases non-trivial so a mixed-up name or layout cannot pass
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture
def hf_save():
    return save_hf_model
