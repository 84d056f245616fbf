"""Rotary position embeddings (HF ``rotate_half`` layout), with Llama 3.1 and linear frequency scaling.

The module holds no buffers: the inverse frequencies are recomputed (a few hundred floats) on the device of the
positions at each forward, so a model built on the ``meta`` device needs no buffer re-initialisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kdtune.errors import CheckpointError

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def rope_inv_freq(
    head_dim: int, base: float, scaling: dict[str, Any] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` in fp32, with the scaling of an HF ``rope_scaling`` dict applied.

    Args:
        head_dim: rotated dimension per head.
        base: RoPE theta.
        scaling: HF ``rope_scaling``/``rope_parameters`` dict (``rope_type`` ``default``, ``llama3`` or ``linear``).
        device: where to compute.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponent)
    rope_type = rope_type_of(scaling)
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])  # type: ignore[index]
    if rope_type == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    low = float(scaling["low_freq_factor"])  # type: ignore[index]
    high = float(scaling["high_freq_factor"])  # type: ignore[index]
    old_ctx = float(scaling["original_max_position_embeddings"])  # type: ignore[index]
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    """The rope type named by an HF scaling dict (``default`` when absent), or a CheckpointError if unsupported."""
    if not scaling:
        return "default"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"config.json: rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    return rope_type


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (HF layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, hd]`` with ``cos``/``sin [B, 1, T, hd]`` (already in ``x``'s dtype)."""
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Computes ``cos, sin [B, T, head_dim]`` for integer positions ``[B, T]``.

    Args:
        head_dim: rotated dimension per head.
        base: RoPE theta.
        scaling: optional HF rope scaling dict (``llama3`` or ``linear``).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        rope_type_of(scaling)  # validate early
        self.head_dim = head_dim
        self.base = float(base)
        self.scaling = dict(scaling) if scaling else None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(cos, sin)``, each ``[B, T, head_dim]`` in ``dtype``, computed in fp32 like HF."""
        inv_freq = rope_inv_freq(self.head_dim, self.base, self.scaling, device=positions.device)
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, scaling={self.scaling}"
