"""Batched generation with the KV cache: left-padded prompts, greedy or temperature/top-k sampling."""

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
    if decoder.pos_embeddings is not None and total > decoder.pos_embeddings.num_embeddings:
        raise ValueError(
            f"generate: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{decoder.pos_embeddings.num_embeddings} learned positions"
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
