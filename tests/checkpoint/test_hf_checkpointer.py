"""HFCheckpointer against transformers on tiny random checkpoints: load (single, sharded, .bin), save → transformers
from_pretrained, sharded save, tied embeddings, meta-device loading, atomic replacement."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdtune.models  # noqa: F401  (registers families)
from kdtune.models import hf_model
from kdtune.models._family import registered_families
from kdtune.models.checkpointer import HFCheckpointer, load_state_dict_shardwise, save_hf
from kdtune.testing.models import make_tiny_hf_checkpoint

transformers = pytest.importorskip("transformers")

# (family, tie_word_embeddings): every family kdtune has registered so far, tied and untied where the family is.
_CASES = [("llama", False), ("llama", True), ("mistral", False), ("qwen2", True), ("qwen2", False), ("qwen3", False)]
_CASES += [("phi3", False), ("gemma", True), ("gpt2", True)]
CASES = [
    pytest.param(f, t, id=f"{f}-{'tied' if t else 'untied'}")
    for f, t in _CASES
    if ("llama" if f == "mistral" else f) in registered_families()
]
TOKENS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))


def _tiny(tmp_path: Path, family: str, tie: bool, name: str = "src") -> Path:
    d = make_tiny_hf_checkpoint(tmp_path / name, family, tie=tie, seed=3)
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 4}))
    (d / "kdtune_source.json").write_text(json.dumps({"repo_id": "org/tiny"}))
    return d


@torch.no_grad()
def _hf_logits(path: Path) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return m(TOKENS).logits


@torch.no_grad()
def _ours(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(TOKENS)


def _loaded(d: Path, **kw) -> torch.nn.Module:
    m = hf_model(d)
    HFCheckpointer(d, output_dir=d.parent / "out", **kw).load_into(m)
    return m


@pytest.mark.parametrize("family,tie", CASES)
def test_load_and_save_match_transformers(tmp_path: Path, family: str, tie: bool) -> None:
    src = _tiny(tmp_path, family, tie)
    model = _loaded(src)
    ref = _hf_logits(src)
    ours = _ours(model)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)  # max |diff| measured 0 (llama), see report

    # save → transformers, sharded with a tiny shard size so there are several files and an index
    ckpt = HFCheckpointer(src, output_dir=tmp_path / "run", max_shard_size="40KB")
    out = ckpt.save_hf(model, "epoch_0")
    assert out == tmp_path / "run" / "epoch_0"
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    for n in ("tokenizer_config.json", "generation_config.json", "config.json"):
        assert n in names
    assert "kdtune_source.json" not in names and not any(".tmp-" in n for n in os.listdir(tmp_path / "run"))
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["torch_dtype"] == "float32"
        and cfg["architectures"] == json.loads((src / "config.json").read_text())["architectures"]
    )
    # the saved tensors are exactly the source tensors (same HF names, bitwise equal)
    src_t = load_file(str(src / "model.safetensors"))
    saved = {}
    for s in shards:
        saved.update(load_file(str(out / s)))
    if tie:
        src_t.pop("lm_head.weight", None)
        assert "lm_head.weight" not in saved
    assert sorted(saved) == sorted(src_t)
    for k in src_t:
        assert torch.equal(saved[k], src_t[k]), k
    torch.testing.assert_close(_hf_logits(out), ref, atol=0, rtol=0)


@pytest.mark.parametrize("family,tie", CASES[:1])
def test_sharded_and_bin_loads_equal_single(tmp_path: Path, family: str, tie: bool) -> None:
    src = _tiny(tmp_path, family, tie)
    single = _loaded(src).state_dict()

    # sharded by transformers' own save_pretrained
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    sharded_dir = tmp_path / "sharded"
    hf.save_pretrained(str(sharded_dir), max_shard_size="50KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    sharded = _loaded(sharded_dir)
    assert sorted(sharded.state_dict()) == sorted(single)
    for k, v in sharded.state_dict().items():
        assert torch.equal(v, single[k]), k
    # the same files named explicitly: torchtune's {filename_format, max_filename} mapping, or the index file
    shard_names = sorted(p.name for p in sharded_dir.glob("model-*.safetensors"))
    n = len(shard_names)
    spec = {"filename_format": "model-{}-of-{}.safetensors", "max_filename": f"{n:05d}"}
    for files in (spec, ["model.safetensors.index.json"], shard_names):
        for k, v in _loaded(sharded_dir, checkpoint_files=files).state_dict().items():
            assert torch.equal(v, single[k]), (files, k)

    # pytorch_model.bin (torch pickle, loaded with weights_only=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(str(src / "model.safetensors")), bin_dir / "pytorch_model.bin")
    for k, v in _loaded(bin_dir).state_dict().items():
        assert torch.equal(v, single[k]), k
    # a torchtune-style .pt named explicitly
    os.replace(bin_dir / "pytorch_model.bin", bin_dir / "hf_model_0001_0.pt")
    for k, v in _loaded(bin_dir, checkpoint_files=["hf_model_0001_0.pt"]).state_dict().items():
        assert torch.equal(v, single[k]), k

    # our own .bin save (safe_serialization=False), sharded, loads back
    out = save_hf(_loaded(src), tmp_path / "binsave", safe_serialization=False, max_shard_size="60KB")
    assert (out / "pytorch_model.bin.index.json").is_file()
    for k, v in _loaded(out).state_dict().items():
        assert torch.equal(v, single[k]), k


def test_bf16_load_casts_to_model_dtype(tmp_path: Path) -> None:
    src = _tiny(tmp_path, "llama", False)
    fp32 = _loaded(src).state_dict()
    m = hf_model(src).to(torch.bfloat16)
    HFCheckpointer(src, tmp_path / "o").load_into(m)
    for k, v in m.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, fp32[k].to(torch.bfloat16)), k
    out = save_hf(m, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())


def test_meta_device_load_assign(tmp_path: Path) -> None:
    src = _tiny(tmp_path, "llama", True)
    ref = _ours(_loaded(src))
    with torch.device("meta"):
        m = hf_model(src)
    res = load_state_dict_shardwise(m, src, assign=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert all(not p.is_meta for p in m.parameters())
    torch.testing.assert_close(_ours(m), ref, atol=0, rtol=0)


def test_save_replaces_existing_dir_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _tiny(tmp_path, "llama", False)
    model = _loaded(src)
    out = tmp_path / "out" / "model"
    save_hf(model, out, source_dir=src)
    (out / "stale.safetensors").write_bytes(b"x")  # from an older save: must disappear on replace
    save_hf(model, out, source_dir=src)
    assert not (out / "stale.safetensors").exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["model"]  # no tmp/old dirs left

    # a failing save leaves the previous directory intact and no temporary directory behind
    from kdtune.models.checkpointer import family_for_model

    fam = family_for_model(model)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fam, "state_dict_to_hf", boom)
    before = sorted(os.listdir(out))
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(model, out)
    assert sorted(os.listdir(out)) == before and sorted(os.listdir(tmp_path / "out")) == ["model"]
