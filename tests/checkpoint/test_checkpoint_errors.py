"""Every user-caused checkpoint error is a CheckpointError with one line saying what, where and how to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kdtune.models  # noqa: F401
from kdtune.errors import CheckpointError, KDTuneError
from kdtune.models import hf_model
from kdtune.models._family import registered_families
from kdtune.models._safetensors_io import parse_size
from kdtune.models.checkpointer import HFCheckpointer, load_state_dict_shardwise, save_hf
from kdtune.testing.models import make_tiny_hf_checkpoint


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    return make_tiny_hf_checkpoint(tmp_path / "src", "llama", seed=0)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert isinstance(e.value, KDTuneError) and "\n" not in msg
    return msg


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        HFCheckpointer(tmp_path / "nope", tmp_path / "out")
    msg = _one_line(e)
    assert "nope" in msg and "does not exist" in msg and "download" in msg


def test_missing_config(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        HFCheckpointer(tmp_path / "d", tmp_path / "out")
    assert "config.json" in _one_line(e) and "model.safetensors" in str(e.value)


def test_listed_files_missing_names_present(src: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        HFCheckpointer(src, tmp_path / "o", checkpoint_files=["model-00001-of-00002.safetensors", "model.safetensors"])
    msg = _one_line(e)
    assert "model-00001-of-00002.safetensors" in msg and "present: ['model.safetensors']" in msg
    # an index that lists a shard which is not there
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"}})
    )
    with pytest.raises(CheckpointError) as e:
        load_state_dict_shardwise(hf_model(src), src)
    assert "missing weight file(s) ['model-00001-of-00002.safetensors']" in _one_line(e)


def test_no_weight_files(src: Path, tmp_path: Path) -> None:
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        HFCheckpointer(src, tmp_path / "o")
    assert "no weight files" in _one_line(e) and "config.json" in str(e.value)


def test_unsupported_architecture(src: Path, tmp_path: Path) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FalconForCausalLM"], "falcon"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        HFCheckpointer(src, tmp_path / "o").load_into(torch.nn.Linear(2, 2))
    msg = _one_line(e)
    assert "FalconForCausalLM" in msg and "not supported" in msg and "LlamaForCausalLM" in msg


def test_shape_mismatch_names_key_and_shapes(src: Path, tmp_path: Path) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96  # config no longer matches the weights (128)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        HFCheckpointer(src, tmp_path / "o").load_into(hf_model(src))
    msg = _one_line(e)
    # the first mismatching tensor in file order, with its HF and kdtune names and both shapes
    assert "'model.layers.0.mlp.down_proj.weight' (kdtune 'layers.0.mlp.w2.weight')" in msg
    assert "shape [64, 128]" in msg and "expects [64, 96]" in msg


def test_missing_and_unexpected_keys(src: Path, tmp_path: Path) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    dropped = tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        HFCheckpointer(src, tmp_path / "o").load_into(hf_model(src))
    msg = _one_line(e)
    assert "missing 1 tensor(s) the model needs: model.layers.1.mlp.down_proj.weight (layers.1.mlp.w2.weight)" in msg
    # non-strict: loads the rest and reports
    res = HFCheckpointer(src, tmp_path / "o").load_into(hf_model(src), strict=False)
    assert res.missing_keys == ["layers.1.mlp.w2.weight"]

    tensors["model.layers.1.mlp.down_proj.weight"] = dropped
    tensors["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(2, 2)  # a layer the config does not have
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        HFCheckpointer(src, tmp_path / "o").load_into(hf_model(src))
    assert "1 unexpected tensor(s): model.layers.7.self_attn.q_proj.weight (layers.7.attn.q_proj.weight)" in _one_line(
        e
    )


@pytest.mark.skipif("qwen2" not in registered_families(), reason="qwen2 family not registered yet")
def test_family_mismatch(src: Path, tmp_path: Path) -> None:
    q = make_tiny_hf_checkpoint(tmp_path / "qwen", "qwen2", seed=0)
    with pytest.raises(CheckpointError) as e:
        HFCheckpointer(q, tmp_path / "o").load_into(hf_model(src))
    assert "'qwen2'" in _one_line(e) and "'llama'" in str(e.value)


def test_bad_shard_size_and_unsafe_output(src: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        HFCheckpointer(src, tmp_path / "o", max_shard_size="five gigs")
    assert "max_shard_size" in _one_line(e)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200MB") == 2 * 10**8 and parse_size("1GiB") == 2**30
    model = hf_model(src)
    with pytest.raises(CheckpointError) as e:
        save_hf(model, src, source_dir=src)
    assert "checkpoint directory being read" in _one_line(e)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError) as e:
        save_hf(model, home)
    assert "refusing to replace" in _one_line(e) and (home / "notes.txt").read_text() == "precious"
