"""PEFT adapters both ways: kdtune save_adapter → peft.PeftModel.from_pretrained(HF base) gives our logits; a PEFT-written
adapter loads into kdtune with PEFT's logits; the merged save loads in transformers with our logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import kdtune.models  # noqa: F401
from kdtune.errors import CheckpointError
from kdtune.models import hf_model
from kdtune.models._family import registered_families
from kdtune.models.checkpointer import (
    HFCheckpointer,
    family_for_model,
    load_adapter,
    load_state_dict_shardwise,
    save_adapter,
)
from kdtune.models.modules.lora import LoRALinear, get_adapter_params
from kdtune.testing.models import make_tiny_hf_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(4))
# (family, tied, lora kwargs)
_CASES = [
    (
        "llama",
        False,
        {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True, "apply_lora_to_output": True},
    ),
    ("llama", True, {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"]}),
    ("qwen2", True, {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True}),
    ("qwen3", False, {"lora_attn_modules": ["q_proj", "output_proj"], "apply_lora_to_mlp": True}),
    # Phi-3 fuses q/k/v (qkv_proj) and gate/up (gate_up_proj) in nn.Linear layers
    ("phi3", False, {"lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True}),
    ("gemma", True, {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True}),
    # GPT-2 fuses q/k/v in one Conv1D c_attn: separate q/v adapters are written as one exact PEFT pair
    ("gpt2", True, {"lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True}),
]
CASES = [
    pytest.param(f, t, kw, id=f"{f}-{'tied' if t else 'untied'}") for f, t, kw in _CASES if f in registered_families()
]


def _randomise_adapters(model: nn.Module, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _hf_base(path: Path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("family,tie,lora", CASES)
def test_adapter_and_merged_load_in_peft_and_transformers(tmp_path: Path, family: str, tie: bool, lora: dict) -> None:
    src = make_tiny_hf_checkpoint(tmp_path / "src", family, tie=tie, seed=9)
    (src / "kdtune_source.json").write_text(json.dumps({"repo_id": "org/tiny-base"}))
    model = hf_model(src, **lora, lora_rank=4, lora_alpha=16)
    ckpt = HFCheckpointer(src, output_dir=tmp_path / "run", max_shard_size="100KB")
    ckpt.load_into(model)
    _randomise_adapters(model)
    with torch.no_grad():
        ours = model.eval()(TOKENS)
        base_logits = _hf_base(src)(TOKENS).logits
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter really changes the function

    adapter_dir = ckpt.save_adapter(model, "adapter")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["fan_in_fan_out"] == (family == "gpt2")  # GPT-2 Conv1D weights are stored [in, out]
    # rank 4 / alpha 16 (fused HF modules get rank 4 x members with the same alpha / r scale)
    assert cfg["r"] in (4, 8, 12) and cfg["lora_alpha"] / cfg["r"] == 16 / 4
    assert cfg["base_model_name_or_path"] == "org/tiny-base"
    keys = load_file(str(adapter_dir / "adapter_model.safetensors"))
    n_lora = sum(isinstance(m, LoRALinear) for m in model.modules())
    fam = family_for_model(model)
    # one PEFT pair per HF module (GPT-2: q and v share c_attn)
    n_hf = len({fam.module_name_to_hf(n) for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    assert len(keys) == 2 * n_hf and all(k.startswith("base_model.model.") for k in keys)

    peft_model = peft.PeftModel.from_pretrained(_hf_base(src), str(adapter_dir)).eval()
    with torch.no_grad():
        peft_logits = peft_model(TOKENS).logits
    torch.testing.assert_close(ours, peft_logits, atol=1e-5, rtol=1e-5)
    # PEFT created LoRA layers exactly where we have them (no extra modules matched by target_modules)
    peft_lora = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]
    assert len(peft_lora) == n_hf

    # merged save → plain transformers model with the same logits; the live model keeps its adapters
    before = {k: v.clone() for k, v in get_adapter_params(model).items()}
    merged_dir = ckpt.save_hf(model, "merged")
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == n_lora
    assert all(torch.equal(before[k], v) for k, v in get_adapter_params(model).items())
    with torch.no_grad():
        torch.testing.assert_close(_hf_base(merged_dir)(TOKENS).logits, ours, atol=1e-5, rtol=1e-5)
        # and PEFT's own merge agrees with ours
        torch.testing.assert_close(peft_model.merge_and_unload()(TOKENS).logits, ours, atol=1e-5, rtol=1e-5)

    # resume: a fresh LoRA model + load_adapter reproduces the logits
    fresh = hf_model(src, **lora, lora_rank=4, lora_alpha=16)
    load_state_dict_shardwise(fresh, src)
    loaded = ckpt.load_adapter(fresh, "adapter")
    assert len(loaded) == n_lora
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(TOKENS), ours, atol=0, rtol=0)


@pytest.mark.parametrize("family,tie,lora", CASES[:1])
def test_peft_written_adapter_loads_into_kdtune(tmp_path: Path, family: str, tie: bool, lora: dict) -> None:
    src = make_tiny_hf_checkpoint(tmp_path / "src", family, tie=tie, seed=2)
    hf = _hf_base(src)
    cfg = peft.LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
        lora_dropout=0.0,
    )
    pm = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(tmp_path / "peft_adapter"))
    with torch.no_grad():
        ref = pm.eval()(TOKENS).logits
    model = hf_model(src, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=8, lora_alpha=32)
    load_state_dict_shardwise(model, src)
    load_adapter(model, tmp_path / "peft_adapter")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(TOKENS), ref, atol=1e-5, rtol=1e-5)


def test_adapter_errors(tmp_path: Path) -> None:
    src = make_tiny_hf_checkpoint(tmp_path / "src", "llama", seed=1)
    model = hf_model(src, lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8)
    out = save_adapter(model, tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"rank 4 .* build the model with lora_rank=4"):
        load_adapter(hf_model(src, lora_attn_modules=["q_proj", "v_proj"], lora_rank=2, lora_alpha=8), out)
    with pytest.raises(CheckpointError, match="lora_alpha .* is 8 but the model's is 16"):
        load_adapter(hf_model(src, lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=16), out)
    with pytest.raises(CheckpointError, match="match no LoRA module of the model"):
        load_adapter(hf_model(src, lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8), out)
    with pytest.raises(CheckpointError, match="no adapter weights for LoRA module"):
        load_adapter(hf_model(src, lora_attn_modules=["q_proj", "v_proj", "k_proj"], lora_rank=4, lora_alpha=8), out)
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        load_adapter(model, tmp_path)
    with pytest.raises(CheckpointError, match="no LoRA modules"):
        save_adapter(hf_model(src), tmp_path / "b")


@pytest.mark.skipif("gpt2" not in registered_families(), reason="gpt2 family not registered")
def test_peft_fused_c_attn_adapter_that_mixes_qkv_is_refused(tmp_path: Path) -> None:
    src = make_tiny_hf_checkpoint(tmp_path / "src", "gpt2", seed=1)
    pm = peft.get_peft_model(_hf_base(src), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(str(tmp_path / "a"))
    model = hf_model(src, lora_attn_modules=["q_proj", "k_proj", "v_proj"], lora_rank=4, lora_alpha=8)
    with pytest.raises(CheckpointError, match=r"rank 4 .*lora_rank=1"):
        load_adapter(model, tmp_path / "a")
    # with matching total rank (3 x 4 = 12) the block structure is checked
    pm = peft.get_peft_model(_hf_base(src), peft.LoraConfig(r=12, lora_alpha=24, target_modules=["c_attn"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(str(tmp_path / "b"))
    with pytest.raises(CheckpointError, match="mixes the outputs"):
        load_adapter(model, tmp_path / "b")
