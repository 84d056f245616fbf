"""T5 (original and v1.1/flan-t5) and BART: logits equal transformers on tiny configs (full tensors, fp32, eager HF
attention as the reference; odd head counts, different encoder/decoder depths, padded encoder inputs), HF save/load
round trip, PEFT adapter load, KV-cache greedy generation equal to transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdtune.models  # noqa: F401
from kdtune.models import hf_model, load_hf_model
from kdtune.models.checkpointer import HFCheckpointer, load_adapter, load_state_dict_shardwise
from kdtune.models.generation import generate_seq2seq
from kdtune.models.modules import enable_activation_checkpointing
from kdtune.models.modules.lora import get_adapter_params

transformers = pytest.importorskip("transformers")
from tests.models._seq2seq import hf_reference, save_tiny  # noqa: E402

V = 61
T5 = ("T5Config", "T5ForConditionalGeneration")
BART = ("BartConfig", "BartForConditionalGeneration")
_T5_BASE = dict(vocab_size=V, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_BART_BASE = dict(
    vocab_size=V,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    max_position_embeddings=48,
    forced_eos_token_id=None,
)
# name -> (classes, config, untie_head)
CASES = {
    "flan-t5": (
        T5,
        dict(
            _T5_BASE,
            d_model=16,
            d_kv=6,
            d_ff=24,
            num_layers=2,
            num_decoder_layers=3,
            num_heads=3,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            relative_attention_max_distance=12,
        ),
        True,
    ),
    "t5-original": (
        T5,
        dict(
            _T5_BASE,
            d_model=20,
            d_kv=4,
            d_ff=30,
            num_layers=3,
            num_decoder_layers=1,
            num_heads=5,
            feed_forward_proj="relu",
            relative_attention_num_buckets=10,
            relative_attention_max_distance=20,
        ),
        False,
    ),
    "t5-gated-silu-tied": (
        T5,
        dict(
            _T5_BASE,
            d_model=12,
            d_kv=5,
            d_ff=18,
            num_layers=1,
            num_decoder_layers=2,
            num_heads=7,
            feed_forward_proj="gated-silu",
        ),
        False,
    ),
    "bart": (
        BART,
        dict(
            _BART_BASE,
            d_model=20,
            encoder_layers=2,
            decoder_layers=3,
            encoder_attention_heads=5,
            decoder_attention_heads=4,
            encoder_ffn_dim=24,
            decoder_ffn_dim=28,
        ),
        False,
    ),
    "bart-scaled-odd": (
        BART,
        dict(
            _BART_BASE,
            d_model=21,
            encoder_layers=3,
            decoder_layers=1,
            encoder_attention_heads=7,
            decoder_attention_heads=3,
            encoder_ffn_dim=13,
            decoder_ffn_dim=19,
            scale_embedding=True,
        ),
        False,
    ),
}


def _ckpt(tmp_path: Path, name: str, seed: int = 0) -> tuple[Path, str]:
    (cfg_cls, model_cls), cfg, untie = CASES[name]
    path = save_tiny(tmp_path / name, cfg_cls, model_cls, seed=seed, untie_head=untie, **cfg)
    return path, model_cls


def _batch(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, V, (3, 14), generator=g)
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[1, 9:] = 0  # right-padded sources
    mask[2, 3:] = 0
    dec = torch.randint(3, V, (3, 12), generator=g)
    return src, mask, dec


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path: Path, name: str) -> None:
    src_dir, model_cls = _ckpt(tmp_path, name)
    ours = load_hf_model(src_dir).eval()
    ref = hf_reference(src_dir, model_cls)
    assert ours.is_encoder_decoder and ours.hf_family == ("t5" if "t5" in name else "bart")
    src, mask, dec = _batch()
    with torch.no_grad():
        want = ref(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(dec, encoder_tokens=src, encoder_padding_mask=mask.bool())
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        hidden = ours(dec, encoder_tokens=src, encoder_padding_mask=mask.bool(), return_hidden=True)
        assert hidden.shape == (3, 12, ours.embed_dim)
        torch.testing.assert_close(ours.output_logits(hidden), got, atol=0, rtol=0)
        enc = ours.encode(src, mask.bool())
        torch.testing.assert_close(
            ref.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state[mask.bool()],
            enc[mask.bool()],
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(ours(dec, encoder_hidden=enc, encoder_padding_mask=mask.bool()), got, atol=0, rtol=0)
    # gradients flow through both stacks, with activation checkpointing too
    ours.train()
    enable_activation_checkpointing(ours)
    loss = ours(dec, encoder_tokens=src, encoder_padding_mask=mask.bool()).logsumexp(-1).mean()
    loss.backward()
    assert ours.encoder.layers[0].attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["flan-t5", "t5-original", "bart"])
def test_save_load_round_trip_and_meta_init(tmp_path: Path, name: str) -> None:
    src_dir, model_cls = _ckpt(tmp_path, name, seed=2)
    model = load_hf_model(src_dir).eval()
    out = HFCheckpointer(src_dir, output_dir=tmp_path / "run").save_hf(model, "saved")
    again = load_hf_model(out)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    src, mask, dec = _batch(7)
    with torch.no_grad():
        back = hf_reference(out, model_cls)(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(
            back, model(dec, encoder_tokens=src, encoder_padding_mask=mask.bool()), atol=1e-5, rtol=1e-5
        )
    with torch.device("meta"):
        fresh = hf_model(src_dir)
    fresh.to_empty(device="cpu")
    fresh.init_weights()
    assert torch.isfinite(fresh(dec, encoder_tokens=src, encoder_padding_mask=mask.bool())).all()


@pytest.mark.parametrize("name", ["flan-t5", "t5-original", "bart"])
def test_peft_adapter_loads_in_peft(tmp_path: Path, name: str) -> None:
    peft = pytest.importorskip("peft")
    src_dir, model_cls = _ckpt(tmp_path, name, seed=4)
    lora = dict(lora_attn_modules=["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, lora_rank=4)
    model = hf_model(src_dir, **lora)
    load_state_dict_shardwise(model, src_dir)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = HFCheckpointer(src_dir, output_dir=tmp_path / "run")
    adapter = ckpt.save_adapter(model, "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM"
    src, mask, dec = _batch(3)
    pm = peft.PeftModel.from_pretrained(hf_reference(src_dir, model_cls), str(adapter)).eval()
    n_ours = sum(1 for k in get_adapter_params(model) if k.endswith("lora_a.weight"))
    n_peft = sum(1 for n, m in pm.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)
    assert n_ours == n_peft  # cross-attention adapted in both
    with torch.no_grad():
        ours = model.eval()(dec, encoder_tokens=src, encoder_padding_mask=mask.bool())
        want = pm(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
        merged = ckpt.save_hf(model, "merged")
        back = hf_reference(merged, model_cls)(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(back, ours, atol=1e-5, rtol=1e-5)
    fresh = hf_model(src_dir, **lora)
    load_state_dict_shardwise(fresh, src_dir)
    load_adapter(fresh, adapter)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(dec, encoder_tokens=src, encoder_padding_mask=mask.bool()), ours)


@pytest.mark.parametrize("name", ["flan-t5", "t5-original", "bart", "bart-scaled-odd"])
def test_greedy_generation_matches_transformers(tmp_path: Path, name: str) -> None:
    src_dir, model_cls = _ckpt(tmp_path, name, seed=6)
    ours = load_hf_model(src_dir)
    ref = hf_reference(src_dir, model_cls)
    sources = [[5, 9, 11, 3, 7, 30, 12], [8, 4], [13, 21, 30, 44]]
    cfg = ours.hf_config
    eos = cfg["eos_token_id"]
    got = generate_seq2seq(ours, sources, max_new_tokens=10, eos_ids=[eos])
    ids = torch.full((3, 7), cfg["pad_token_id"])
    att = torch.zeros(3, 7, dtype=torch.long)
    for i, s in enumerate(sources):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
    want = ref.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=10,
        do_sample=False,
        num_beams=1,
        use_cache=False,  # transformers 5 sizes its cache by num_layers, breaking num_decoder_layers != num_layers
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        no_repeat_ngram_size=0,
        min_length=0,
    )
    for g, w in zip(got, want[:, 1:].tolist()):  # HF output starts with the decoder start token
        cut = next((j + 1 for j, t in enumerate(w) if t == eos), len(w))
        assert g == w[:cut]
    # without EOS: the cached incremental decode equals the full forward at every step
    full = generate_seq2seq(ours, sources[:1], max_new_tokens=6, eos_ids=[])
    dec = torch.tensor([[cfg["decoder_start_token_id"]] + full[0][:-1]])
    logits = ours.eval()(dec, encoder_tokens=torch.tensor(sources[:1]))
    assert logits.argmax(-1)[0].tolist() == full[0]


def test_families_refuse_unsupported_options(tmp_path: Path) -> None:
    from kdtune.errors import CheckpointError
    from kdtune.models.bart import FAMILY as BARTF
    from kdtune.models.t5 import FAMILY as T5F

    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        T5F.build(dict(CASES["flan-t5"][1], feed_forward_proj="gelu-gated-x"))
    with pytest.raises(CheckpointError, match="add_final_layer_norm"):
        BARTF.build(dict(CASES["bart"][1], add_final_layer_norm=True))
