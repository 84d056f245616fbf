"""The decoder-only transformer every kdtune family builds."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdtune.models.modules.attention import KVCache, MultiHeadAttention
from kdtune.models.modules.norms import RMSNorm
from kdtune.models.modules.rope import RotaryEmbedding


class TransformerSelfAttentionLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(sa_norm(x)); out = h + mlp(mlp_norm(h))``.

    With ``post_norm=True`` (OPT-350m, BART): ``h = sa_norm(x + attn(x)); out = mlp_norm(h + mlp(h))``.
    """

    def __init__(
        self,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        sa_norm: nn.Module,
        mlp_norm: nn.Module,
        *,
        post_norm: bool = False,
    ) -> None:
        super().__init__()
        self.sa_norm = sa_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.post_norm = post_norm

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor | None = None,
        rope_sin: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache_pos: int | None = None,
    ) -> torch.Tensor:
        """``x [B, T, D] -> [B, T, D]``; see ``MultiHeadAttention.forward`` for the other arguments."""
        rope = (rope_cos, rope_sin) if rope_cos is not None else None
        if self.post_norm:
            h = self.sa_norm(x + self.attn(x, rope=rope, mask=mask, cache_pos=cache_pos))
            return self.mlp_norm(h + self.mlp(h))
        h = x + self.attn(self.sa_norm(x), rope=rope, mask=mask, cache_pos=cache_pos)
        return h + self.mlp(self.mlp_norm(h))


class TransformerDecoder(nn.Module):
    """Decoder-only LM: embeddings, ``num_layers`` blocks, final norm, output projection (own or tied).

    The model holds no non-persistent buffers outside the KV caches (RoPE is computed on the fly), so it can be
    built under ``torch.device("meta")``, materialised with ``to_empty`` and filled by a state-dict load.

    Args:
        tok_embeddings: ``nn.Embedding(V, D)``.
        layers: the transformer blocks.
        norm: final norm.
        output: ``nn.Linear(D, V)``, or None when the output projection is tied to ``tok_embeddings``.
        rope: rotary embedding (None for learned positions).
        pos_embeddings: learned position embedding ``nn.Embedding(max_seq_len, D)`` (GPT-2), or None.
        max_seq_len: the longest sequence the model was configured for.
        sliding_window: if set, a token attends only to the previous ``sliding_window`` tokens (itself included),
            as Mistral does; applied only when a sequence is longer than the window.
        embed_scale: multiply token embeddings by this (Gemma: ``sqrt(D)``, rounded to the model dtype as HF does).
        pos_offset: added to positions before the learned position lookup (OPT: 2).
        project_in: maps token embeddings (width E) to the model width D before positions are added (OPT-350m).
        project_out: maps the final hidden states back to width E before the (tied) output projection (OPT-350m);
            ``return_hidden`` returns its output, so ``output_logits`` applies to it.
    """

    def __init__(
        self,
        *,
        tok_embeddings: nn.Embedding,
        layers: list[TransformerSelfAttentionLayer],
        norm: nn.Module,
        output: nn.Linear | None,
        rope: RotaryEmbedding | None,
        pos_embeddings: nn.Embedding | None = None,
        max_seq_len: int = 4096,
        sliding_window: int | None = None,
        embed_scale: float | None = None,
        pos_offset: int = 0,
        project_in: nn.Module | None = None,
        project_out: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.tok_embeddings = tok_embeddings
        if pos_embeddings is not None:
            self.pos_embeddings = pos_embeddings
        else:
            self.pos_embeddings = None
        self.pos_offset = int(pos_offset)
        if project_in is not None:
            self.project_in = project_in
        else:
            self.project_in = None
        if project_out is not None:
            self.project_out = project_out
        else:
            self.project_out = None
        self.rope = rope
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.output = output
        self.vocab_size = tok_embeddings.num_embeddings
        self.embed_dim = tok_embeddings.embedding_dim
        self.num_layers = len(layers)
        self.max_seq_len = max_seq_len
        self.sliding_window = sliding_window
        self.embed_scale = embed_scale
        self.activation_checkpointing = False
        self._cache_pos = 0
        self._kv_valid: torch.Tensor | None = None  # [B, S] bool: which cache slots hold real tokens
        # Set by the family builders; declared here so every TransformerDecoder has them.
        self.hf_family: str = ""
        self.hf_config: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def tie_word_embeddings(self) -> bool:
        """True when the output projection reuses ``tok_embeddings.weight``."""
        return self.output is None

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project final hidden states ``[..., D]`` to logits ``[..., V]`` (tied or own output weight)."""
        if self.output is None:
            return F.linear(hidden, self.tok_embeddings.weight)
        return self.output(hidden)

    # ----------------------------------------------------------------------------------------------- caches
    def setup_caches(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a KV cache of ``max_seq_len`` slots for ``batch_size`` sequences in every layer."""
        param = self.tok_embeddings.weight
        dtype = dtype or param.dtype
        for layer in self.layers:
            attn = layer.attn
            attn.kv_cache = KVCache(batch_size, max_seq_len, attn.num_kv_heads, attn.head_dim, dtype, param.device)
        self._kv_valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=param.device)
        self._cache_pos = 0

    def reset_caches(self) -> None:
        """Empty the KV caches (keep them allocated) so a new batch of prompts can start at slot 0."""
        if self._kv_valid is None:
            raise RuntimeError("reset_caches() called before setup_caches()")
        for layer in self.layers:
            layer.attn.kv_cache.reset()
        self._kv_valid.zero_()
        self._cache_pos = 0

    def remove_caches(self) -> None:
        """Free the KV caches; forward goes back to full-sequence mode."""
        for layer in self.layers:
            layer.attn.kv_cache = None
        self._kv_valid = None
        self._cache_pos = 0

    def caches_are_enabled(self) -> bool:
        """Whether ``setup_caches`` was called (and not undone by ``remove_caches``)."""
        return self._kv_valid is not None

    # ----------------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """HF-style random init: linear/embedding weights ~ N(0, std), biases 0, norm scales to identity.

        LoRA layers keep their adapter init (``lora_a`` Kaiming-uniform, ``lora_b`` zeros) and get their frozen base
        weight drawn like a linear layer (NF4-quantised bases are left as they are). Works after ``to_empty``.
        """
        from kdtune.models.modules.lora import LoRALinear, is_nf4

        lora_children: set[int] = set()
        for module in self.modules():
            if isinstance(module, LoRALinear):
                if not is_nf4(module.weight):
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                module.reset_lora_parameters()
                lora_children.update(id(m) for m in module.modules() if m is not module)
            elif id(module) in lora_children:
                continue
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Run the model.

        Args:
            tokens: ``[B, T]`` token ids.
            input_pos: ``[B, T]`` positions (RoPE / learned positions). Default: ``0..T-1``; restarting at each
                document when ``document_ids`` is given; counting only real tokens when ``padding_mask`` is given;
                continuing from the cache when the KV cache is in use.
            document_ids: ``[B, T]`` packed-sequence document ids: tokens attend only within their document.
            padding_mask: ``[B, T]`` bool, True = real token; padded keys are never attended to (left padding).
                With the KV cache, it describes the tokens of this call (later calls default to all real).
            return_hidden: return the final-norm hidden states ``[B, T, D]`` instead of logits.

        Returns:
            logits ``[B, T, V]`` (or hidden ``[B, T, D]``).
        """
        b, t = tokens.shape
        device = tokens.device
        cache_pos: int | None = None
        mask: torch.Tensor | None = None
        if self.caches_are_enabled():
            if document_ids is not None:
                raise ValueError("document_ids cannot be combined with the KV cache")
            kv_valid = self._kv_valid
            assert kv_valid is not None
            if b != kv_valid.shape[0]:
                raise ValueError(f"batch size {b} does not match the KV cache's {kv_valid.shape[0]}")
            start, end = self._cache_pos, self._cache_pos + t
            if end > kv_valid.shape[1]:
                raise ValueError(f"KV cache full: {end} tokens > {kv_valid.shape[1]} slots; call reset_caches()")
            kv_valid[:, start:end] = True if padding_mask is None else padding_mask.to(torch.bool)
            valid = kv_valid[:, :end]  # [B, L]
            if input_pos is None:
                input_pos = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            q_slot = torch.arange(start, end, device=device)[:, None]  # [T, 1]
            k_slot = torch.arange(end, device=device)[None, :]  # [1, L]
            allowed = k_slot <= q_slot
            if self.sliding_window is not None and end > self.sliding_window:
                allowed = allowed & (q_slot - k_slot < self.sliding_window)
            mask = ((allowed[None] & valid[:, None, :]) | (k_slot == q_slot)[None])[:, None]  # [B, 1, T, L]
            cache_pos = start
            self._cache_pos = end
        else:
            if input_pos is None:
                input_pos = _default_positions(b, t, device, document_ids, padding_mask)
            windowed = self.sliding_window is not None and t > self.sliding_window
            if document_ids is not None or padding_mask is not None or windowed:
                idx = torch.arange(t, device=device)
                mask = (idx[None, :] <= idx[:, None])[None]  # [1, T, T] causal
                if windowed:
                    mask = mask & (idx[:, None] - idx[None, :] < self.sliding_window)
                if document_ids is not None:
                    mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])
                if padding_mask is not None:
                    mask = (mask & padding_mask.to(torch.bool)[:, None, :]) | (idx[None, :] == idx[:, None])[None]
                mask = mask.expand(b, t, t)[:, None]  # [B, 1, T, T]

        h = self.tok_embeddings(tokens)
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype, device=h.device)
        if self.project_in is not None:
            h = self.project_in(h)
        if self.pos_embeddings is not None:
            n_pos = self.pos_embeddings.num_embeddings - self.pos_offset
            if (cache_pos or 0) + t > n_pos and input_pos.numel() and int(input_pos.max()) >= n_pos:
                raise ValueError(
                    f"sequence position {int(input_pos.max())} is beyond the model's {n_pos} learned positions"
                )
            h = h + self.pos_embeddings(input_pos + self.pos_offset if self.pos_offset else input_pos)
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope(input_pos, h.dtype)
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd]
        use_ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                h = checkpoint(layer, h, cos, sin, mask, cache_pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache_pos)
        h = self.norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        if return_hidden:
            return h
        return self.output_logits(h)


def _default_positions(
    b: int, t: int, device: torch.device, document_ids: torch.Tensor | None, padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """Positions ``[B, T]``: restart per document, count only real tokens, or plain ``0..T-1``."""
    idx = torch.arange(t, device=device)
    if padding_mask is not None:
        return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
    if document_ids is not None:
        new_doc = torch.ones_like(document_ids, dtype=torch.bool)
        new_doc[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        doc_start = torch.where(new_doc, idx[None, :], torch.zeros_like(document_ids)).cummax(dim=-1).values
        return idx[None, :] - doc_start
    return idx[None, :].expand(b, t)


def enable_activation_checkpointing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Recompute each transformer block in backward (per-layer activation checkpointing); returns ``model``."""
    found = False
    for module in model.modules():
        # TransformerDecoder, and the encoder/decoder stacks of encoder-decoder models, carry this flag
        if isinstance(module, TransformerDecoder) or getattr(module, "supports_activation_checkpointing", False):
            module.activation_checkpointing = enabled
            found = True
    if not found:
        raise TypeError(f"enable_activation_checkpointing: no TransformerDecoder inside {type(model).__name__}")
    return model
