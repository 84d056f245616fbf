"""OPT family: logits equal transformers (pre/post-norm, project_in/out, odd head counts, left padding), HF save/load
round trip, PEFT adapter load, KV-cache greedy generation equal to transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdtune.models  # noqa: F401
from kdtune.models import hf_model, load_hf_model
from kdtune.models.checkpointer import HFCheckpointer, load_state_dict_shardwise
from kdtune.models.generation import generate
from kdtune.models.modules.lora import get_adapter_params

transformers = pytest.importorskip("transformers")
from tests.models._seq2seq import hf_reference, save_tiny  # noqa: E402

V = 53
CONFIGS = {
    "pre-norm": dict(hidden_size=20, num_hidden_layers=2, ffn_dim=28, num_attention_heads=4),
    "odd-heads": dict(hidden_size=21, num_hidden_layers=3, ffn_dim=17, num_attention_heads=3),
    "post-norm-proj": dict(
        hidden_size=24,
        num_hidden_layers=2,
        ffn_dim=20,
        num_attention_heads=6,
        word_embed_proj_dim=10,
        do_layer_norm_before=False,
    ),
    "pre-norm-proj": dict(
        hidden_size=16, num_hidden_layers=1, ffn_dim=30, num_attention_heads=2, word_embed_proj_dim=12
    ),
}


def _ckpt(tmp_path: Path, name: str, seed: int = 0) -> Path:
    return save_tiny(
        tmp_path / name,
        "OPTConfig",
        "OPTForCausalLM",
        seed=seed,
        vocab_size=V,
        max_position_embeddings=40,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        **CONFIGS[name],
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path: Path, name: str) -> None:
    src = _ckpt(tmp_path, name)
    ours = load_hf_model(src).eval()
    ref = hf_reference(src, "OPTForCausalLM")
    tokens = torch.randint(3, V, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=1e-5, rtol=1e-5)
        hidden = ours(tokens, return_hidden=True)
        torch.testing.assert_close(ours.output_logits(hidden), ours(tokens), atol=0, rtol=0)
        # left padding: positions count real tokens only (HF: cumsum of the attention mask)
        mask = torch.ones(3, 11, dtype=torch.long)
        mask[0, :4] = 0
        mask[2, :1] = 0
        got = ours(tokens, padding_mask=mask.bool())
        want = ref(tokens, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_meta_init(tmp_path: Path) -> None:
    src = _ckpt(tmp_path, "post-norm-proj", seed=3)
    model = load_hf_model(src)
    out = HFCheckpointer(src, output_dir=tmp_path / "run").save_hf(model, "saved")
    back = transformers.OPTForCausalLM.from_pretrained(str(out)).eval()
    tokens = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, model.eval()(tokens), atol=1e-5, rtol=1e-5)
    again = load_hf_model(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with torch.device("meta"):
        fresh = hf_model(src)
    fresh.to_empty(device="cpu")
    fresh.init_weights()
    assert torch.isfinite(fresh(tokens)).all()


def test_peft_adapter_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    src = _ckpt(tmp_path, "odd-heads", seed=4)
    model = hf_model(src, lora_attn_modules=["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, lora_rank=4)
    load_state_dict_shardwise(model, src)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = HFCheckpointer(src, output_dir=tmp_path / "run")
    adapter = ckpt.save_adapter(model, "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and sorted(cfg["target_modules"]) == [
        "fc1",
        "fc2",
        "out_proj",
        "q_proj",
        "v_proj",
    ]
    tokens = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    pm = peft.PeftModel.from_pretrained(hf_reference(src, "OPTForCausalLM"), str(adapter)).eval()
    with torch.no_grad():
        ours = model.eval()(tokens)
        torch.testing.assert_close(ours, pm(tokens).logits, atol=1e-5, rtol=1e-5)
        merged = ckpt.save_hf(model, "merged")
        torch.testing.assert_close(hf_reference(merged, "OPTForCausalLM")(tokens).logits, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["pre-norm", "post-norm-proj"])
def test_greedy_generation_matches_transformers(tmp_path: Path, name: str) -> None:
    src = _ckpt(tmp_path, name, seed=6)
    ours = load_hf_model(src)
    ref = hf_reference(src, "OPTForCausalLM")
    prompts = [[5, 9, 11, 3, 7], [8, 4], [13, 21, 30]]
    got = generate(ours, prompts, max_new_tokens=8, eos_ids=None, pad_id=1)
    for p, g in zip(prompts, got):  # one at a time: no padding in the reference
        want = ref.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, num_beams=1, min_new_tokens=8)
        assert g == want[0, len(p) :].tolist()


def test_state_dict_from_hf_reads_keys_without_the_model_prefix():
    """Some OPT checkpoints name tensors ``decoder.layers...`` instead of ``model.decoder.layers...``."""
    from kdtune.models._family import registered_families

    family = registered_families()["opt"]
    hf_config = {"model_type": "opt", "tie_word_embeddings": True}
    hf_state = {
        "model.decoder.embed_tokens.weight": torch.randn(5, 4),
        "model.decoder.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
        "lm_head.weight": torch.randn(5, 4),  # tied: not loaded
    }
    bare = {k.removeprefix("model."): v for k, v in hf_state.items()}
    ours, from_bare = family.state_dict_from_hf(hf_state, hf_config), family.state_dict_from_hf(bare, hf_config)
    assert ours.keys() == from_bare.keys() and "layers.0.attn.q_proj.weight" in ours and len(ours) == 2
    with pytest.raises(Exception, match="unexpected tensor 'model.decoder.nope.weight' for the opt model family"):
        family.state_dict_from_hf({"model.decoder.nope.weight": torch.zeros(1)}, hf_config)
