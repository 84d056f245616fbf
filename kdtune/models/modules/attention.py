"""Grouped-query self-attention through ``scaled_dot_product_attention``, with an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.models.modules.rope import apply_rotary


class KVCache(nn.Module):
    """Key/value cache of one attention layer: ``k_cache``/``v_cache [B, H_kv, S, hd]`` (non-persistent buffers).

    Args:
        batch_size: B.
        max_seq_len: S, the number of cache slots.
        num_kv_heads: H_kv.
        head_dim: hd.
        dtype: cache dtype.
        device: cache device.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v [B, H_kv, T, hd]`` into slots ``[start, start + T)``; return slots ``[0, start + T)``."""
        end = start + k.shape[2]
        self.k_cache[:, :, start:end] = k
        self.v_cache[:, :, start:end] = v
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]

    def reset(self) -> None:
        """Zero the cache."""
        self.k_cache.zero_()
        self.v_cache.zero_()


class MultiHeadAttention(nn.Module):
    """Multi-head / grouped-query / multi-query self-attention.

    Args:
        embed_dim: model dimension D.
        num_heads: query heads H.
        num_kv_heads: key/value heads H_kv (H % H_kv == 0).
        head_dim: per-head dimension hd (may differ from D // H, e.g. Qwen3).
        qkv_bias: bias on q/k/v projections (Qwen2, GPT-2).
        out_bias: bias on the output projection (GPT-2).
        q_norm: optional per-head norm applied to queries before RoPE (Qwen3).
        k_norm: optional per-head norm applied to keys before RoPE (Qwen3).
        scale: softmax scale (default ``1 / sqrt(head_dim)``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.output_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=out_bias)
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.scale = scale
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache_pos: int | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: ``[B, T, D]``.
            rope: ``(cos, sin)``, each ``[B, 1, T, rot]`` (``rot <= hd``: the first ``rot`` dims are rotated), or None.
            mask: boolean ``[B, 1, T, L]`` (True = may attend), or None for plain causal attention.
            cache_pos: first cache slot of these tokens when the KV cache is in use, else None.

        Returns:
            ``[B, T, D]``.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(_kv), T, hd]
        if rope is not None:
            cos, sin = rope
            rot = cos.shape[-1]
            if rot == self.head_dim:
                q = apply_rotary(q, cos, sin)
                k = apply_rotary(k, cos, sin)
            else:  # partial rotary (Phi-3 with partial_rotary_factor < 1): rotate the first `rot` dims only
                q = torch.cat((apply_rotary(q[..., :rot], cos, sin), q[..., rot:]), dim=-1)
                k = torch.cat((apply_rotary(k[..., :rot], cos, sin), k[..., rot:]), dim=-1)
        if cache_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("cache_pos given but setup_caches() was not called")
            k, v = self.kv_cache.update(cache_pos, k, v)  # [B, H_kv, L, hd]
        is_causal = mask is None and cache_pos is None and t > 1
        gqa = self.num_heads != self.num_kv_heads
        if gqa and mask is not None:
            # SDPA's fused kernels that take an arbitrary mask do not take enable_gqa; expand k/v instead of falling
            # back to the math kernel.
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, enable_gqa=gqa
        )  # [B, H, T, hd]
        return self.output_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
