"""Helpers shared by the OPT / T5 / BART tests: tiny transformers models saved to disk with non-trivial weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

__all__ = ["hf_reference", "perturb", "save_tiny"]


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Make biases, norm scales and ``final_logits_bias`` non-trivial so a mixed-up name or layout cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        if getattr(model, "final_logits_bias", None) is not None:
            model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=g))


def save_tiny(
    out: Path, config_cls: str, model_cls: str, *, seed: int = 0, untie_head: bool = False, **cfg: Any
) -> Path:
    """Build ``transformers.<model_cls>(<config_cls>(**cfg))`` with random weights and save it to ``out``.

    ``untie_head``: write a separate random ``lm_head.weight`` and ``tie_word_embeddings: false`` (transformers 5 always
    ties T5's head in memory; it unties it again on load when the checkpoint holds a different ``lm_head``).
    """
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).eval()
    perturb(model, seed + 1)
    model.save_pretrained(out)
    if untie_head:
        path = out / "model.safetensors"
        sd = load_file(str(path))
        shared = next(v for k, v in sd.items() if k.endswith("shared.weight"))
        sd["lm_head.weight"] = torch.randn(shared.shape, generator=torch.Generator().manual_seed(seed + 7)) * 0.5
        save_file(sd, str(path), metadata={"format": "pt"})
        conf = json.loads((out / "config.json").read_text())
        conf["tie_word_embeddings"] = False
        conf.pop("scale_decoder_outputs", None)
        (out / "config.json").write_text(json.dumps(conf, indent=2))
    return out


def hf_reference(path: Path, model_cls: str) -> torch.nn.Module:
    """The saved model loaded by transformers with eager attention (an independent reference for our SDPA path)."""
    return (
        getattr(transformers, model_cls)
        .from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
        .eval()
    )
