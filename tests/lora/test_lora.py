"""LoRALinear / apply_lora / merging / QLoRA, checked against float64 formulas and dequantised references."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kdtune.models  # noqa: F401
from kdtune.errors import ConfigError
from kdtune.models import hf_model
from kdtune.models.checkpointer import load_state_dict_shardwise, save_hf
from kdtune.models.modules.lora import (
    LoRALinear,
    apply_lora,
    disable_adapters,
    get_adapter_params,
    get_merged_lora_state_dict,
    is_nf4,
    lora_trainable_state_dict,
    merge_lora_weights,
)
from kdtune.testing.models import make_tiny_hf_checkpoint

TOKENS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
LORA = {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True}


def _randomise_adapters(model: nn.Module, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("lora") / "src", "llama", seed=5)


def _lora_model(src: Path, **kw) -> nn.Module:
    m = hf_model(src, **{**LORA, "lora_rank": 4, "lora_alpha": 8, **kw})
    load_state_dict_shardwise(m, src)
    return m


def test_lora_linear_matches_float64_formula() -> None:
    lin = LoRALinear(16, 24, rank=4, alpha=12, use_bias=True)
    nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(3, 5, 16)
    w, b = lin.weight.double(), lin.bias.double()
    a_, b_ = lin.lora_a.weight.double(), lin.lora_b.weight.double()
    ref = x.double() @ w.T + b + (12 / 4) * (x.double() @ a_.T @ b_.T)
    torch.testing.assert_close(lin(x).double(), ref, atol=1e-5, rtol=1e-5)
    with disable_adapters(nn.Sequential(lin)):
        torch.testing.assert_close(lin(x).double(), x.double() @ w.T + b, atol=1e-5, rtol=1e-5)
    # init: lora_b zero (update starts at 0), lora_a kaiming-uniform bound = 1/sqrt(in_dim)
    fresh = LoRALinear(16, 24, rank=4, alpha=8)
    assert torch.count_nonzero(fresh.lora_b.weight) == 0
    assert fresh.lora_a.weight.abs().max() <= 1 / 16**0.5 + 1e-6
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == ["lora_a.weight", "lora_b.weight"]


def test_apply_lora_freezes_base_and_keeps_outputs(src: Path) -> None:
    base = hf_model(src)
    load_state_dict_shardwise(base, src)
    ref = base.eval()(TOKENS).detach()
    model = _lora_model(src)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert len(names) == 2 * 7 and "layers.0.attn.output_proj" in names and "layers.1.mlp.w3" in names
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(get_adapter_params(model)) and all(".lora_" in n for n in trainable)
    torch.testing.assert_close(model.eval()(TOKENS), ref, atol=0, rtol=0)  # lora_b = 0: same function
    assert sorted(lora_trainable_state_dict(model)) == trainable
    # base state-dict keys are unchanged (so HF conversion is unchanged)
    assert set(base.state_dict()) == set(model.state_dict()) - set(get_adapter_params(model))


def test_merge_equals_base_plus_adapter(src: Path) -> None:
    model = _lora_model(src, apply_lora_to_output=True)
    _randomise_adapters(model)
    logits = model.eval()(TOKENS).detach()
    # float64 reference of one merged weight
    mod = model.layers[0].attn.q_proj
    ref_w = mod.weight.double() + (8 / 4) * mod.lora_b.weight.double() @ mod.lora_a.weight.double()
    merged = get_merged_lora_state_dict(model)
    torch.testing.assert_close(merged["layers.0.attn.q_proj.weight"].double(), ref_w, atol=1e-6, rtol=1e-6)
    assert not any(".lora_" in k for k in merged) and model.layers[0].attn.q_proj is mod  # model untouched
    plain = hf_model(src)
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(plain.eval()(TOKENS), logits, atol=1e-5, rtol=1e-5)
    merge_lora_weights(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model.eval()(TOKENS), logits, atol=1e-5, rtol=1e-5)


def test_backward_only_reaches_adapters(src: Path) -> None:
    model = _lora_model(src, lora_dropout=0.1)
    _randomise_adapters(model)
    model.train()(TOKENS).float().logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n


def test_apply_lora_errors(src: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown module name\(s\) \['o_proj'\]"):
        hf_model(src, lora_attn_modules=["q_proj", "o_proj"])
    tied = make_tiny_hf_checkpoint(tmp_path / "tied", "llama", tie=True)
    with pytest.raises(ConfigError, match="ties its output projection.*apply_lora_to_output=False"):
        hf_model(tied, lora_attn_modules=["q_proj"], apply_lora_to_output=True)
    with pytest.raises(ConfigError, match="selects no module"):
        hf_model(src, lora_attn_modules=[])
    with pytest.raises(ConfigError, match="already has LoRA modules"):
        apply_lora(hf_model(src, lora_attn_modules=["q_proj"]), ["v_proj"])
    with pytest.raises(ConfigError, match="lora_rank must be a positive"):
        LoRALinear(8, 8, rank=0, alpha=1)


def test_qlora_forward_close_to_dequantised_reference(src: Path, tmp_path: Path) -> None:
    full = _lora_model(src)
    q = _lora_model(src, quantize_base=True)
    _randomise_adapters(full)
    _randomise_adapters(q)
    mods = [m for m in q.modules() if isinstance(m, LoRALinear)]
    assert mods and all(is_nf4(m.weight) and not m.weight.requires_grad for m in mods)
    # NF4 storage error on the base weights is small (4-bit, blockwise absmax)
    full_mods = dict(full.named_modules())
    for n, m in q.named_modules():
        if isinstance(m, LoRALinear):
            w, orig = m.weight.get_original_weight(), full_mods[n].weight
            assert (w - orig).abs().max() <= 0.25 * orig.abs().max(), n
    # exact reference: the same network with plain (dequantised) base weights
    ref = hf_model(src, **{**LORA, "lora_rank": 4, "lora_alpha": 8})
    ref.load_state_dict({k: (v.get_original_weight() if is_nf4(v) else v) for k, v in q.state_dict().items()})
    out_q, out_ref, out_full = (m.eval()(TOKENS).detach() for m in (q, ref, full))
    torch.testing.assert_close(out_q, out_ref, atol=1e-5, rtol=1e-5)
    rel = (out_q - out_full).norm() / out_full.norm()  # 4-bit base weights: close to, not equal to, full precision
    assert rel < 0.2, rel
    # merged state dict dequantises
    merged = get_merged_lora_state_dict(q)
    assert not any(is_nf4(v) for v in merged.values())
    plain = hf_model(src)
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain.eval()(TOKENS), out_q, atol=1e-5, rtol=1e-5)
    # merged save (dequantised) loads in transformers with the QLoRA model's logits
    transformers = pytest.importorskip("transformers")
    out = save_hf(q, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, out_q, atol=1e-5, rtol=1e-5)
    # gradients reach the adapters only
    q.train()(TOKENS).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in get_adapter_params(q).values())


def test_qlora_on_meta_device_loads_like_eager(src: Path) -> None:
    eager = _lora_model(src, quantize_base=True)
    with torch.device("meta"):
        meta = hf_model(src, **{**LORA, "lora_rank": 4, "lora_alpha": 8, "quantize_base": True})
    res = load_state_dict_shardwise(meta, src, assign=True)
    assert not res.missing_keys
    assert all(not p.is_meta for p in meta.parameters())
    for (n, a), b in zip(eager.state_dict().items(), meta.state_dict().values()):
        if ".lora_" in n:
            continue
        if is_nf4(a):
            assert is_nf4(b) and torch.equal(a.get_original_weight(), b.get_original_weight()), n
        else:
            assert torch.equal(a, b), n
    trainable = sorted(n for n, p in meta.named_parameters() if p.requires_grad)
    assert trainable == sorted(get_adapter_params(meta))
    with torch.no_grad():
        for (_, p_meta), p_eager in zip(get_adapter_params(meta).items(), get_adapter_params(eager).values()):
            p_meta.copy_(p_eager)
    torch.testing.assert_close(meta.eval()(TOKENS), eager.eval()(TOKENS), atol=0, rtol=0)


def test_is_nf4_does_not_import_torchao_for_other_tensor_subclasses() -> None:
    # `kdtune estimate` replays LoRA models on fake tensors: checking them must not import torchao (~2 s and its
    # kernel-loading warnings), since no NF4 tensor can exist before torchao is imported
    code = (
        "import sys\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "import torch\n"
        "from kdtune.models.modules.lora import is_nf4\n"
        "with FakeTensorMode():\n"
        "    t = torch.empty(4, 4)\n"
        "assert not is_nf4(t) and 'torchao' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
