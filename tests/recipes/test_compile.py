"""`compile: true` on CPU: the decoder layers go through torch.compile (inductor) and the run's losses match eager."""

from __future__ import annotations

import pytest
import torch

from kdtune.losses import fused


@pytest.mark.slow  # inductor compiles each new sequence length of the layers: ~1-2 min on a loaded 2-core CPU
def test_compile_matches_eager_kd(recipe, tiny_cfg, tmp_path):
    kd = recipe("knowledge_distillation_single_device")
    common = ["max_steps=3", "save_every_n_steps=null", "eval_every_n_steps=null", "val_split_ratio=0.0"]
    eager = kd.train(tiny_cfg("kd", tmp_path / "eager", *common))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fused._COMPILED_TERMS.clear()
    compiled = kd.train(tiny_cfg("kd", tmp_path / "compiled", *common, "compile=true"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the layers really were compiled
    assert "cpu" in fused._COMPILED_TERMS  # and the fused CE + forward-KL chunk loss
    for a, b in zip(eager.steps, compiled.steps, strict=True):
        for key in ("loss", "class_loss", "kd_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (key, a["step"])
