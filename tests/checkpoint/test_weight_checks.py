"""Weights that are not floating point, or hold NaN/inf, are refused at load, naming the file and the tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kdtune.models  # noqa: F401
from kdtune.errors import CheckpointError
from kdtune.models import _safetensors_io, hf_model
from kdtune.models._safetensors_io import check_weight_tensor
from kdtune.models.checkpointer import HFCheckpointer, load_adapter, save_adapter
from kdtune.testing.models import make_tiny_hf_checkpoint

NAME = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    return make_tiny_hf_checkpoint(tmp_path / "src", "llama", seed=0)


def _rewrite(src: Path, name: str, tensor: torch.Tensor) -> Path:
    state = load_file(str(src / "model.safetensors"))
    assert name in state and state[name].shape == tensor.shape
    state[name] = tensor
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src / "model.safetensors"


def _load(src: Path) -> None:
    HFCheckpointer(str(src), str(src.parent / "out")).load_into(hf_model(str(src)))


def test_clean_checkpoint_loads(src: Path) -> None:
    _load(src)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bad", "expected"), [(float("nan"), "1 NaN and 0 inf"), (float("inf"), "0 NaN and 1 inf")])
def test_nan_or_inf_weight_is_named(src: Path, monkeypatch, dtype, bad: float, expected: str) -> None:
    monkeypatch.setattr(_safetensors_io, "_FINITE_CHECK_ELEMENTS", 1000)  # the bad value sits in a later slice
    t = load_file(str(src / "model.safetensors"))[NAME].to(dtype)
    t.view(-1)[-3] = bad
    assert t.numel() > 3000
    path = _rewrite(src, NAME, t)
    with pytest.raises(CheckpointError) as e:
        _load(src)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: tensor '{NAME}' holds {expected} value(s) of {t.numel()}")


def test_integer_weight_is_refused(src: Path) -> None:
    t = load_file(str(src / "model.safetensors"))[NAME]
    path = _rewrite(src, NAME, (t * 100).to(torch.int8))
    with pytest.raises(CheckpointError, match=rf"^{path}: tensor '{NAME}' is int8, not floating point"):
        _load(src)


def test_check_counts_match_a_reference() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5000, generator=g)
    idx = torch.randperm(5000, generator=g)
    t[idx[:7]] = float("nan")
    t[idx[7:10]] = float("-inf")
    with pytest.raises(CheckpointError, match=r"holds 7 NaN and 3 inf value\(s\) of 5000"):
        check_weight_tensor(Path("w.safetensors"), "w", t)
    check_weight_tensor(Path("w.safetensors"), "ids", torch.arange(3), expect_float=False)  # ints where ints belong
    # finite fp16 values whose sum overflows fp16 (the fast path's only false alarm) are accepted
    check_weight_tensor(Path("w.safetensors"), "big", torch.full((10000,), 60000.0, dtype=torch.float16))


def test_adapter_with_nan_is_refused(tmp_path: Path, src: Path) -> None:
    kwargs = {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 2, "lora_alpha": 4}
    model = hf_model(str(src), **kwargs)
    HFCheckpointer(str(src), str(tmp_path)).load_into(model)
    out = save_adapter(model, tmp_path / "adapter")
    weights = out / "adapter_model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name][0, 0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"^{weights}: tensor '{name}' holds 1 NaN"):
        load_adapter(hf_model(str(src), **kwargs), out)
