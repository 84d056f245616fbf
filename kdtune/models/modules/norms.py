"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama/Qwen), computed in fp32 and cast back, as HF does.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the reciprocal square root.
        offset: Gemma style: scale by ``1 + weight`` (weight initialised to 0) and multiply in fp32 before the cast.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x [..., dim]`` over its last dimension."""
        in_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.weight.float())).to(in_dtype)
        return self.weight * x32.to(in_dtype)

    def reset_parameters(self) -> None:
        """Set the scale to identity (ones, or zeros with ``offset``)."""
        if self.offset:
            nn.init.zeros_(self.weight)
        else:
            nn.init.ones_(self.weight)
