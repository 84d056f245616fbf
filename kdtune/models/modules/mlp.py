"""Feed-forward blocks."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.errors import CheckpointError


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new``: the tanh approximation of GELU, written out as HF's ``NewGELUActivation``."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function for an HF ``hidden_act``/``activation_function`` name."""
    if name not in _ACTIVATIONS:
        raise CheckpointError(
            f"config.json: activation {name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}."
        )
    return _ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """SwiGLU-style MLP: ``w2(act(w1(x)) * w3(x))`` (w1 = gate, w3 = up, w2 = down).

    Args:
        dim: model dimension.
        hidden_dim: intermediate dimension.
        activation: HF activation name (``silu`` for Llama/Qwen).
        bias: whether the three projections carry a bias.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.activation_name = activation
        self.act = get_activation(activation)
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D] -> [B, T, D]``."""
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class MLP(nn.Module):
    """Plain two-layer MLP: ``w2(act(w1(x)))`` (GPT-2: w1 = c_fc, w2 = c_proj).

    Args:
        dim: model dimension.
        hidden_dim: intermediate dimension.
        activation: HF activation name (``gelu_new`` for GPT-2).
        bias: whether the projections carry a bias.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu_new", bias: bool = True) -> None:
        super().__init__()
        self.activation_name = activation
        self.act = get_activation(activation)
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D] -> [B, T, D]``."""
        return self.w2(self.act(self.w1(x)))
