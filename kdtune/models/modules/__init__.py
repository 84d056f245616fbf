"""Building blocks shared by every model family."""

from kdtune.models.modules.attention import KVCache, MultiHeadAttention
from kdtune.models.modules.mlp import MLP, GatedMLP, get_activation
from kdtune.models.modules.norms import RMSNorm
from kdtune.models.modules.rope import RotaryEmbedding, apply_rotary, rope_inv_freq, rotate_half
from kdtune.models.modules.transformer import (
    TransformerDecoder,
    TransformerSelfAttentionLayer,
    enable_activation_checkpointing,
)

__all__ = [
    "MLP",
    "GatedMLP",
    "KVCache",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerDecoder",
    "TransformerSelfAttentionLayer",
    "apply_rotary",
    "enable_activation_checkpointing",
    "get_activation",
    "rope_inv_freq",
    "rotate_half",
]
