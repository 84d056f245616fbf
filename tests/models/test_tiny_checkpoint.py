"""make_tiny_hf_checkpoint writes a directory that transformers and kdtune load to identical logits."""

from __future__ import annotations

import pytest
import torch

from kdtune.models import load_hf_model
from kdtune.testing import make_tiny_hf_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "family,tie",
    [("llama", False), ("llama", True), ("mistral", False), ("qwen2", True), ("qwen3", False), ("gpt2", True)],
)
def test_tiny_checkpoint_loads_in_transformers(family, tie, tmp_path):
    path = make_tiny_hf_checkpoint(
        tmp_path / "m", family, vocab_size=128, dim=32, layers=2, heads=4, kv_heads=2, tie=tie
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = load_hf_model(path)
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=2e-5, rtol=1e-5)


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = load_hf_model(make_tiny_hf_checkpoint(tmp_path / "a", seed=3, vocab_size=64, dim=16, heads=2, kv_heads=1))
    b = load_hf_model(make_tiny_hf_checkpoint(tmp_path / "b", seed=3, vocab_size=64, dim=16, heads=2, kv_heads=1))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
