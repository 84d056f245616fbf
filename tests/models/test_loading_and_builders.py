"""load_hf_model file formats and errors; size-table builders; LoRA builders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import kdtune.models.gemma
import kdtune.models.gpt2
import kdtune.models.llama2
import kdtune.models.llama3_1
import kdtune.models.llama3_2
import kdtune.models.phi3
import kdtune.models.qwen2
import kdtune.models.qwen2_5
import kdtune.models.qwen3
from kdtune.errors import CheckpointError
from kdtune.models import hf_model, load_hf_model
from kdtune.testing import make_tiny_hf_checkpoint


def _tiny(tmp_path, **kw):
    return make_tiny_hf_checkpoint(tmp_path / "m", "llama", vocab_size=64, dim=16, heads=2, kv_heads=1, **kw)


def test_sharded_and_bin_checkpoints_load_identically(tmp_path):
    path = _tiny(tmp_path)
    ref = load_hf_model(path)
    state = load_file(str(path / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((path / "config.json").read_text())
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(sharded / name))
        weight_map.update({k: name for k in ks})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((path / "config.json").read_text())
    torch.save(state, binary / "pytorch_model.bin")
    for other in (sharded, binary):
        got = load_hf_model(other)
        for (k, v), (k2, v2) in zip(ref.state_dict().items(), got.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    # a listed shard that is missing is named, with what is present
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*present"):
        load_hf_model(sharded)


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_hf_model(tmp_path / "empty")
    path = _tiny(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"], "model_type": "x"}))
    with pytest.raises(CheckpointError, match="FalconForCausalLM.*Supported: .*LlamaForCausalLM"):
        load_hf_model(path)
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' \(kdtune .*\) has shape"):
        load_hf_model(path)


def test_missing_tensor_is_reported(tmp_path):
    path = _tiny(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*layers\.1\.mlp\.(w3|up_proj)\.weight"):
        load_hf_model(path)


# (builder module, name, parameter count of the public model)
SIZES = [
    (kdtune.models.llama3_2, "llama3_2_1b", 1_235_814_400),
    (kdtune.models.llama3_2, "llama3_2_3b", 3_212_749_824),
    (kdtune.models.llama3_1, "llama3_1_8b", 8_030_261_248),
    (kdtune.models.llama2, "llama2_7b", 6_738_415_616),
    (kdtune.models.llama2, "tinyllama_1_1b", 1_100_048_384),
    (kdtune.models.qwen2, "qwen2_0_5b", 494_032_768),
    (kdtune.models.qwen2, "qwen2_1_5b", 1_543_714_304),
    (kdtune.models.qwen2_5, "qwen2_5_3b", 3_085_938_688),
    (kdtune.models.qwen2_5, "qwen2_5_14b", 14_770_033_664),
    (kdtune.models.qwen3, "qwen3_0_6b", 596_049_920),
    (kdtune.models.gpt2, "dialogpt_small", 124_439_808),
    (kdtune.models.phi3, "phi3_mini", 3_821_079_552),
    (kdtune.models.gemma, "gemma_2b", 2_506_172_416),
    (kdtune.models.gpt2, "dialogpt_medium", 354_823_168),
]


@pytest.mark.parametrize("module,name,count", SIZES, ids=[s[1] for s in SIZES])
def test_size_builders_on_meta(module, name, count):
    with torch.device("meta"):
        model = getattr(module, name)()
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.hf_config["architectures"] and model.hf_family


def test_lora_builders_and_hf_model(tmp_path):
    with torch.device("meta"):
        model = kdtune.models.llama3_2.lora_llama3_2_1b(["q_proj", "v_proj"], lora_rank=8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 16 * 8 * (2048 + 2048 + 2048 + 512)  # A [8, 2048] + B [out, 8] for q and v in 16 layers
    assert model.hf_family == "llama" and model.hf_config["tie_word_embeddings"]
    path = _tiny(tmp_path)
    lora = hf_model(path, lora_attn_modules=["q_proj"], apply_lora_to_mlp=True, lora_rank=2)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} and lora.hf_config["hidden_size"] == 16
    assert all("lora" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_every_size_has_base_and_lora_builders_with_signatures():
    import inspect

    for module in (
        kdtune.models.llama,
        kdtune.models.qwen2,
        kdtune.models.qwen3,
        kdtune.models.gpt2,
        kdtune.models.phi3,
    ):
        for name in module.SIZES:
            assert inspect.signature(getattr(module, name)).parameters == {}
            params = inspect.signature(getattr(module, "lora_" + name)).parameters
            assert list(params)[:2] == ["lora_attn_modules", "apply_lora_to_mlp"] and "quantize_base" in params


def test_gpt2_learned_positions_bound():
    from kdtune.models.gpt2 import gpt2

    model = gpt2(vocab_size=32, num_layers=1, num_heads=2, embed_dim=8, max_seq_len=6)
    model(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond the model's 6 learned positions"):
        model(torch.zeros(1, 7, dtype=torch.long))


def test_hf_model_rejects_misspelt_lora_option(tmp_path):
    from kdtune.errors import ConfigError

    with pytest.raises(ConfigError, match="lora_rnak"):
        hf_model(_tiny(tmp_path), lora_attn_modules=["q_proj"], lora_rnak=4)
