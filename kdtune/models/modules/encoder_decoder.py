"""The encoder-decoder transformer the seq2seq families (T5, BART) build, and its pieces.

``EncoderDecoder`` = shared token embedding + encoder ``TransformerStack`` (bidirectional self-attention) + decoder
``TransformerStack`` (causal self-attention, cross-attention to the encoder output) + output projection (own or tied,
optionally scaled (T5) and biased (BART)). Positions are either learned (BART, with an offset) or a T5 relative
position bias computed by the first layer's table and shared by all layers of a stack.

Contract used by the training objective and generation:

* ``model.is_encoder_decoder`` is True;
* ``model(tokens [B, T], *, encoder_tokens [B, S], encoder_padding_mask [B, S] bool (True = real))`` returns logits
  ``[B, T, V]`` (``return_hidden=True``: the final decoder hidden states ``[B, T, D]``);
* ``model.output_logits(hidden [..., D]) -> [..., V]`` applies the head (T5 tied scaling, BART ``final_logits_bias``);
* ``model.encode(encoder_tokens, encoder_padding_mask) -> [B, S, D]``, and ``forward(..., encoder_hidden=...)`` reuses it;
* ``setup_caches`` / ``reset_caches`` / ``remove_caches``: decoder self-attention KV cache, cross-attention K/V
  computed once from the encoder output (``kdtune.models.generation.generate_seq2seq`` drives them).

Like ``TransformerDecoder`` the model holds no non-persistent buffers outside the caches, so it can be built on the
meta device and filled from a checkpoint (or ``init_weights()``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdtune.models.modules.attention import KVCache, MultiHeadAttention
from kdtune.models.modules.transformer import TransformerDecoder

__all__ = [
    "CrossAttention",
    "EncoderDecoder",
    "RelativePositionBias",
    "TransformerCrossAttentionLayer",
    "TransformerStack",
    "t5_relative_position_bucket",
]


def t5_relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucketing of ``relative_position = key_pos - query_pos`` (integer tensor, any shape): exact buckets for
    small distances, logarithmic ones up to ``max_distance``; with ``bidirectional`` half the buckets are for keys
    after the query. Returns bucket ids of the same shape."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.minimum(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, large)


class RelativePositionBias(nn.Module):
    """T5 relative position bias: a learned ``[num_buckets, H]`` table (``embedding``) read at each query/key pair's
    bucket, added to the attention scores of every layer of one stack.

    Args:
        num_buckets: ``relative_attention_num_buckets``.
        max_distance: ``relative_attention_max_distance``.
        num_heads: H.
        bidirectional: True for the encoder, False (keys at or before the query only) for the decoder.
    """

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bias ``[1, H, T, L]`` for query positions ``q_pos [T]`` and key positions ``k_pos [L]``."""
        rel = k_pos[None, :] - q_pos[:, None]  # [T, L]
        buckets = t5_relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1)[None]  # [1, H, T, L]


class CrossAttention(nn.Module):
    """Attention from decoder states to the encoder output (``q_proj`` on the decoder side, ``k_proj``/``v_proj`` on the
    encoder output). With caching enabled the encoder's keys/values are computed on the first call and reused.

    Args:
        embed_dim: model dimension D.
        num_heads: H.
        head_dim: hd (T5: ``d_kv``, may differ from D // H).
        bias: bias on all four projections (BART).
        scale: softmax scale (default ``1 / sqrt(hd)``; T5: 1.0).
    """

    def __init__(
        self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = False, scale: float | None = None
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.output_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)
        self.scale = scale
        self.cache_enabled = False
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, H, S, hd] each, when cached

    def reset_cache(self) -> None:
        """Forget the cached encoder keys/values (they are recomputed on the next call)."""
        self._kv = None

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend.

        Args:
            x: decoder states ``[B, T, D]``.
            memory: encoder output ``[B, S, D]`` (may be None once the cache holds its keys/values).
            mask: boolean ``[B, 1, 1, S]`` (True = may attend: real encoder tokens), or None.

        Returns:
            ``[B, T, D]``.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        if self._kv is not None:
            k, v = self._kv
        else:
            if memory is None:
                raise ValueError("cross-attention needs the encoder output (encoder_hidden) on its first call")
            s = memory.shape[1]
            k = self.k_proj(memory).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(memory).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            if self.cache_enabled:
                self._kv = (k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # [B, H, T, hd]
        return self.output_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class TransformerCrossAttentionLayer(nn.Module):
    """Decoder block with cross-attention.

    Pre-norm (T5): ``h = x + attn(sa_norm(x)); h = h + cross_attn(ca_norm(h), memory); out = h + mlp(mlp_norm(h))``.
    Post-norm (BART): ``h = sa_norm(x + attn(x)); h = ca_norm(h + cross_attn(h, memory)); out = mlp_norm(h + mlp(h))``.
    """

    def __init__(
        self,
        attn: MultiHeadAttention,
        cross_attn: CrossAttention,
        mlp: nn.Module,
        sa_norm: nn.Module,
        ca_norm: nn.Module,
        mlp_norm: nn.Module,
        *,
        post_norm: bool = False,
    ) -> None:
        super().__init__()
        self.sa_norm = sa_norm
        self.attn = attn
        self.ca_norm = ca_norm
        self.cross_attn = cross_attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.post_norm = post_norm

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache_pos: int | None,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x [B, T, D] -> [B, T, D]``; ``mask`` as for ``MultiHeadAttention`` (boolean, or additive float with the
        T5 bias), ``memory [B, S, D]`` and ``memory_mask [B, 1, 1, S]`` as for ``CrossAttention``."""
        if self.post_norm:
            h = self.sa_norm(x + self.attn(x, mask=mask, cache_pos=cache_pos))
            h = self.ca_norm(h + self.cross_attn(h, memory, memory_mask))
            return self.mlp_norm(h + self.mlp(h))
        h = x + self.attn(self.sa_norm(x), mask=mask, cache_pos=cache_pos)
        h = h + self.cross_attn(self.ca_norm(h), memory, memory_mask)
        return h + self.mlp(self.mlp_norm(h))


class TransformerStack(nn.Module):
    """One side of an encoder-decoder: position information, optional embedding norm, blocks, final norm.

    Args:
        layers: ``TransformerSelfAttentionLayer`` blocks (encoder) or ``TransformerCrossAttentionLayer`` (decoder).
        norm: final norm (``nn.Identity()`` for post-norm stacks without one, e.g. BART).
        causal: decoder (causal self-attention, cross-attention) or encoder (bidirectional).
        pos_embeddings: learned positions ``nn.Embedding(n_pos + pos_offset, D)`` (BART), or None.
        pos_offset: added to positions before the lookup (BART: 2).
        rel_bias: T5 relative position bias shared by all layers, or None.
        embed_norm: norm applied right after embeddings + positions (BART ``layernorm_embedding``), or None.
    """

    supports_activation_checkpointing = True

    def __init__(
        self,
        *,
        layers: list[nn.Module],
        norm: nn.Module,
        causal: bool,
        pos_embeddings: nn.Embedding | None = None,
        pos_offset: int = 0,
        rel_bias: RelativePositionBias | None = None,
        embed_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if pos_embeddings is not None:
            self.pos_embeddings = pos_embeddings
        else:
            self.pos_embeddings = None
        if rel_bias is not None:
            self.rel_bias = rel_bias
        else:
            self.rel_bias = None
        if embed_norm is not None:
            self.embed_norm = embed_norm
        else:
            self.embed_norm = None
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.causal = causal
        self.pos_offset = int(pos_offset)
        self.num_layers = len(layers)
        self.activation_checkpointing = False

    def _self_mask(
        self,
        b: int,
        t: int,
        cache_pos: int | None,
        dtype: torch.dtype,
        device: torch.device,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Self-attention mask for queries at ``start..start+t-1`` over keys ``0..start+t-1``: None for plain causal
        attention without cache (SDPA's causal path), a boolean ``[B, 1, T, L]``, or, with a relative bias, the
        additive float bias ``[B or 1, H, T, L]``."""
        start = cache_pos or 0
        end = start + t
        q_pos = torch.arange(start, end, device=device)
        k_pos = torch.arange(end, device=device)
        if self.causal:
            if self.rel_bias is None and cache_pos is None:
                return None
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, L]
        else:
            allowed = torch.ones(1, 1, t, end, dtype=torch.bool, device=device)
        if padding_mask is not None:
            allowed = allowed & padding_mask.to(torch.bool)[:, None, None, :]  # [B, 1, T, L]
        if self.rel_bias is None:
            return allowed.expand(b, 1, t, end)
        bias = self.rel_bias(q_pos, k_pos).to(dtype)  # [1, H, T, L]
        if allowed is not None:
            bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)
        return bias

    def forward(
        self,
        h: torch.Tensor,
        *,
        padding_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        cache_pos: int | None = None,
    ) -> torch.Tensor:
        """Run the stack on embedded tokens.

        Args:
            h: token embeddings ``[B, T, D]`` (already scaled).
            padding_mask: encoder only: ``[B, T]`` bool, True = real token (padded keys are never attended to).
            memory: decoder only: the encoder output ``[B, S, D]`` (None once the cross-attention caches hold it).
            memory_padding_mask: decoder only: ``[B, S]`` bool, True = real encoder token.
            cache_pos: decoder with KV cache: first cache slot of these tokens.

        Returns:
            ``[B, T, D]`` after the final norm.
        """
        b, t, _ = h.shape
        start = cache_pos or 0
        if self.pos_embeddings is not None:
            n_pos = self.pos_embeddings.num_embeddings - self.pos_offset
            if start + t > n_pos:
                raise ValueError(f"sequence length {start + t} is beyond the model's {n_pos} learned positions")
            pos = torch.arange(start, start + t, device=h.device) + self.pos_offset
            h = h + self.pos_embeddings(pos)[None]
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        mask = self._self_mask(b, t, cache_pos, h.dtype, h.device, padding_mask)
        mem_mask = None
        if self.causal and memory_padding_mask is not None:
            mem_mask = memory_padding_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, S]
        use_ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if self.causal:
                args = (h, mask, cache_pos, memory, mem_mask)
            else:
                args = (h, None, None, mask, None)
            h = checkpoint(layer, *args, use_reentrant=False) if use_ckpt else layer(*args)
        return self.norm(h)


class EncoderDecoder(nn.Module):
    """Encoder-decoder LM (T5, BART): shared token embedding, encoder and decoder stacks, output projection.

    Args:
        tok_embeddings: ``nn.Embedding(V, D)``, shared by encoder and decoder (and the output when tied).
        encoder: the encoder ``TransformerStack`` (``causal=False``).
        decoder: the decoder ``TransformerStack`` (``causal=True``, ``TransformerCrossAttentionLayer`` blocks).
        output: ``nn.Linear(D, V, bias=False)``, or None when tied to ``tok_embeddings``.
        embed_scale: multiply token embeddings by this (BART ``scale_embedding``: ``sqrt(D)``), or None.
        output_scale: multiply the final decoder states by this before the head (original T5: ``D ** -0.5``).
        final_logits_bias: add a persistent ``final_logits_bias [1, V]`` buffer to the logits (BART).
        max_seq_len: the longest sequence the model was configured for (learned positions), for information.
    """

    is_encoder_decoder = True

    def __init__(
        self,
        *,
        tok_embeddings: nn.Embedding,
        encoder: TransformerStack,
        decoder: TransformerStack,
        output: nn.Linear | None,
        embed_scale: float | None = None,
        output_scale: float | None = None,
        final_logits_bias: bool = False,
        max_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        if encoder.causal or not decoder.causal:
            raise ValueError("EncoderDecoder: the encoder stack must be bidirectional and the decoder stack causal")
        self.tok_embeddings = tok_embeddings
        self.encoder = encoder
        self.decoder = decoder
        self.output = output
        self.embed_scale = embed_scale
        self.output_scale = output_scale
        if final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(1, tok_embeddings.num_embeddings))
        else:
            self.final_logits_bias = None
        self.vocab_size = tok_embeddings.num_embeddings
        self.embed_dim = tok_embeddings.embedding_dim
        self.max_seq_len = max_seq_len
        self._cache_pos = 0
        self._caches = False
        self.hf_family: str = ""
        self.hf_config: dict[str, Any] = {}

    @property
    def tie_word_embeddings(self) -> bool:
        """True when the output projection reuses ``tok_embeddings.weight``."""
        return self.output is None

    @property
    def num_layers(self) -> int:
        """Decoder depth (the positions the objective runs over are decoder positions)."""
        return self.decoder.num_layers

    # ----------------------------------------------------------------------------------------------- pieces
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, T, D]`` (scaled by ``embed_scale`` when set)."""
        h = self.tok_embeddings(tokens)
        return h * self.embed_scale if self.embed_scale is not None else h

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project final decoder states ``[..., D]`` to logits ``[..., V]``: optional T5 scaling, the (tied or own)
        output weight, optional BART ``final_logits_bias``."""
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        logits = F.linear(hidden, self.tok_embeddings.weight) if self.output is None else self.output(hidden)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias.to(logits.dtype)
        return logits

    def encode(self, encoder_tokens: torch.Tensor, encoder_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output ``[B, S, D]`` for ``encoder_tokens [B, S]`` (``encoder_padding_mask [B, S]`` bool,
        True = real token; None = all real)."""
        return self.encoder(self.embed(encoder_tokens), padding_mask=encoder_padding_mask)

    # ----------------------------------------------------------------------------------------------- caches
    def setup_caches(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate decoder self-attention KV caches of ``max_seq_len`` slots and enable cross-attention K/V caching."""
        param = self.tok_embeddings.weight
        dtype = dtype or param.dtype
        for layer in self.decoder.layers:
            attn = layer.attn
            attn.kv_cache = KVCache(batch_size, max_seq_len, attn.num_kv_heads, attn.head_dim, dtype, param.device)
            layer.cross_attn.cache_enabled = True
            layer.cross_attn.reset_cache()
        self._cache_pos = 0
        self._caches = True

    def reset_caches(self) -> None:
        """Empty the caches (keep them allocated) for a new batch: the next call must pass the encoder output again."""
        if not self._caches:
            raise RuntimeError("reset_caches() called before setup_caches()")
        for layer in self.decoder.layers:
            layer.attn.kv_cache.reset()
            layer.cross_attn.reset_cache()
        self._cache_pos = 0

    def remove_caches(self) -> None:
        """Free the caches; forward goes back to full-sequence mode."""
        for layer in self.decoder.layers:
            layer.attn.kv_cache = None
            layer.cross_attn.cache_enabled = False
            layer.cross_attn.reset_cache()
        self._cache_pos = 0
        self._caches = False

    def caches_are_enabled(self) -> bool:
        """Whether ``setup_caches`` was called (and not undone by ``remove_caches``)."""
        return self._caches

    # ----------------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """HF-style random init (see ``TransformerDecoder.init_weights``: linear/embedding N(0, std), biases 0, norms
        identity, LoRA adapters PEFT init) plus ``final_logits_bias`` zeroed. Works after ``to_empty``."""
        TransformerDecoder.init_weights(self, std)  # type: ignore[arg-type]  # walks self.modules(); no decoder state
        if self.final_logits_bias is not None:
            self.final_logits_bias.zero_()

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        encoder_tokens: torch.Tensor | None = None,
        encoder_padding_mask: torch.Tensor | None = None,
        encoder_hidden: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Run encoder (unless ``encoder_hidden`` is given) and decoder.

        Args:
            tokens: decoder input ids ``[B, T]`` (``[decoder_start] + target[:-1]`` style, right-padded).
            encoder_tokens: encoder input ids ``[B, S]`` (right-padded).
            encoder_padding_mask: ``[B, S]`` bool, True = real encoder token (None = all real).
            encoder_hidden: a precomputed ``encode(...)`` output ``[B, S, D]`` (generation); with the KV cache it is
                needed on the first call after ``setup_caches``/``reset_caches`` only.
            return_hidden: return the final decoder states ``[B, T, D]`` instead of logits.

        Returns:
            logits ``[B, T, V]`` (or hidden ``[B, T, D]``).
        """
        if encoder_hidden is None and not (self._caches and self._cache_pos > 0):
            if encoder_tokens is None:
                raise ValueError("EncoderDecoder.forward needs encoder_tokens (or encoder_hidden from encode())")
            encoder_hidden = self.encode(encoder_tokens, encoder_padding_mask)
        cache_pos: int | None = None
        if self._caches:
            cache_pos = self._cache_pos
            kv = self.decoder.layers[0].attn.kv_cache
            if cache_pos + tokens.shape[1] > kv.max_seq_len:
                raise ValueError(
                    f"KV cache full: {cache_pos + tokens.shape[1]} tokens > {kv.max_seq_len} slots; call reset_caches()"
                )
            self._cache_pos += tokens.shape[1]
        h = self.decoder(
            self.embed(tokens),
            memory=encoder_hidden,
            memory_padding_mask=encoder_padding_mask,
            cache_pos=cache_pos,
        )
        if return_hidden:
            return h
        return self.output_logits(h)
