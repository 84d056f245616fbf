"""Batched generation with the KV cache, greedy or temperature/top-k sampling: ``generate`` for decoder-only models
(left-padded prompts), ``generate_seq2seq`` for encoder-decoder models (encoder once, decoder incremental)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdtune.models.modules import TransformerDecoder


def _decoder(model: nn.Module) -> TransformerDecoder:
    if isinstance(model, TransformerDecoder):
        return model
    for module in model.modules():
        if isinstance(module, TransformerDecoder):
            return module
    raise TypeError(f"generate: expected a kdtune TransformerDecoder, got {type(model).__name__}")


def sample_next_token(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick the next token from ``logits [B, V]``: argmax when ``temperature == 0``, else sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens. Returns ``[B]``."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: int | list[int] | None = None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[list[int]]:
    """Continue every prompt, batched: prompts are left-padded, run once through the model (prefill), then decoded
    one token per step with the KV cache.

    Args:
        model: a kdtune decoder. KV caches are set up for this call and removed afterwards (caches the model
            already had are replaced).
        prompts: token ids of each prompt (non-empty).
        max_new_tokens: the most tokens generated per prompt.
        eos_ids: token id(s) that end a sequence; none means generate ``max_new_tokens`` each.
        pad_id: id used for left padding (never attended to).
        temperature: 0 = greedy; > 0 samples from the tempered distribution.
        top_k: sample only among the ``top_k`` most likely tokens.
        generator: RNG for sampling (reproducible runs).
        stop_fn: called after each step with the tokens generated so far ``[B, steps]`` (finished rows hold
            ``pad_id`` after their end); returns a bool ``[B]``, True for rows to end after their latest token (e.g.
            a stop string appeared in the decoded text). Rows already ended are ignored.

    Returns:
        The generated tokens of each prompt (prompt excluded), cut after the first EOS (the EOS is kept) or after the
        token at which ``stop_fn`` ended the row.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    decoder = _decoder(model)
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or [])
    param = decoder.tok_embeddings.weight
    device = param.device
    b, prompt_len = len(prompts), max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    n_pos = None if decoder.pos_embeddings is None else decoder.pos_embeddings.num_embeddings - decoder.pos_offset
    if n_pos is not None and total > n_pos:
        raise ValueError(
            f"generate: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{n_pos} learned positions"
        )
    tokens = torch.full((b, prompt_len), pad_id, dtype=torch.long, device=device)
    padding_mask = torch.zeros((b, prompt_len), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, prompt_len - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        padding_mask[i, prompt_len - len(p) :] = True

    was_training = model.training
    model.eval()
    decoder.setup_caches(b, total, dtype=param.dtype)
    try:
        out = torch.empty((b, max_new_tokens), dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        lengths = [max_new_tokens] * b  # tokens kept per row (set when a row ends)
        eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
        logits = model(tokens, padding_mask=padding_mask)[:, -1]  # [B, V]
        steps = 0
        for step in range(max_new_tokens):
            nxt = sample_next_token(logits, temperature, top_k, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, step] = nxt
            steps = step + 1
            ended = torch.zeros_like(done)
            if eos:
                ended = torch.isin(nxt, eos_t) & ~done
            if stop_fn is not None:
                ended = ended | (stop_fn(out[:, :steps]).to(device=device, dtype=torch.bool) & ~done)
            if (eos or stop_fn is not None) and bool(ended.any()):
                for i in ended.nonzero().flatten().tolist():
                    lengths[i] = steps
                done = done | ended
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = model(nxt[:, None])[:, -1]
    finally:
        decoder.remove_caches()
        model.train(was_training)
    return [row[: lengths[i]] for i, row in enumerate(out[:, :steps].tolist())]


@torch.no_grad()
def generate_seq2seq(
    model: nn.Module,
    encoder_inputs: list[list[int]],
    max_new_tokens: int,
    eos_ids: int | list[int] | None = None,
    pad_id: int | None = None,
    decoder_start_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Generate targets for a batch of sources with an encoder-decoder model (T5, BART): the sources are right-padded
    and encoded once, then the decoder runs one token per step from ``decoder_start_id`` with its self-attention KV
    cache and the cross-attention keys/values computed once. Greedy decoding equals ``transformers``' greedy
    ``generate`` (no forced BOS/EOS, no repetition rules).

    Args:
        model: a kdtune ``EncoderDecoder`` (``is_encoder_decoder``); caches are set up for this call and removed after.
        encoder_inputs: token ids of each source (non-empty).
        max_new_tokens: the most tokens generated per source (the start token not counted).
        eos_ids: token id(s) that end a sequence (default: ``hf_config["eos_token_id"]``).
        pad_id: id used for padding (default: ``hf_config["pad_token_id"]``, else 0).
        decoder_start_id: first decoder token (default: ``hf_config["decoder_start_token_id"]``).
        temperature: 0 = greedy; > 0 samples from the tempered distribution.
        top_k: sample only among the ``top_k`` most likely tokens.
        generator: RNG for sampling.

    Returns:
        The generated tokens of each source (start token excluded), cut after the first EOS (the EOS is kept).
    """
    if not getattr(model, "is_encoder_decoder", False):
        raise TypeError(f"generate_seq2seq: expected an encoder-decoder model, got {type(model).__name__}")
    if not encoder_inputs or any(len(p) == 0 for p in encoder_inputs):
        raise ValueError("generate_seq2seq: every source needs at least one token")
    if max_new_tokens <= 0:
        return [[] for _ in encoder_inputs]
    cfg = getattr(model, "hf_config", None) or {}
    if eos_ids is None:
        eos_ids = cfg.get("eos_token_id")
    if pad_id is None:
        pad_id = cfg.get("pad_token_id")
        pad_id = 0 if pad_id is None else int(pad_id)
    if decoder_start_id is None:
        decoder_start_id = cfg.get("decoder_start_token_id")
        if decoder_start_id is None:
            raise ValueError("generate_seq2seq: decoder_start_id not given and hf_config has no decoder_start_token_id")
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or [])
    device = model.tok_embeddings.weight.device
    b, src_len = len(encoder_inputs), max(len(p) for p in encoder_inputs)
    src = torch.full((b, src_len), pad_id, dtype=torch.long, device=device)
    src_mask = torch.zeros((b, src_len), dtype=torch.bool, device=device)
    for i, p in enumerate(encoder_inputs):
        src[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        src_mask[i, : len(p)] = True

    was_training = model.training
    model.eval()
    model.setup_caches(b, max_new_tokens, dtype=model.tok_embeddings.weight.dtype)
    try:
        enc = model.encode(src, src_mask)  # [B, S, D], once
        out = torch.empty((b, max_new_tokens), dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
        nxt = torch.full((b,), int(decoder_start_id), dtype=torch.long, device=device)
        logits = model(nxt[:, None], encoder_hidden=enc, encoder_padding_mask=src_mask)[:, -1]  # [B, V]
        steps = 0
        for step in range(max_new_tokens):
            nxt = sample_next_token(logits, temperature, top_k, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, step] = nxt
            steps = step + 1
            if eos:
                done = done | torch.isin(nxt, eos_t)
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = model(nxt[:, None], encoder_padding_mask=src_mask)[:, -1]
    finally:
        model.remove_caches()
        model.train(was_training)
    results: list[list[int]] = []
    for row in out[:, :steps].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results
