"""Batching variable-length examples: right padding to the longest example (optionally to a multiple)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kdtune.errors import DataError

CROSS_ENTROPY_IGNORE_IDX = -100


def padded_collate(
    batch: Sequence[dict[str, Any]],
    pad_id: int = 0,
    ignore_index: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Stack examples into right-padded LongTensors.

    Use as a `DataLoader` ``collate_fn`` via ``functools.partial(padded_collate, pad_id=tokenizer.pad_id)``.

    Args:
        batch: Items with ``tokens`` and ``labels`` (lists or 1-D tensors, equal lengths per item) and, for packed
            data, ``input_pos`` and ``document_ids``.
        pad_id: Token id written into padding.
        ignore_index: Label written into padding (not trained).
        pad_to_multiple_of: Round the padded length up to a multiple of this (e.g. 8 for tensor cores).

    Returns:
        ``tokens [B, T]`` and ``labels [B, T]`` (int64), plus ``input_pos [B, T]`` and ``document_ids [B, T]`` when
        the items have them. Padding of ``input_pos`` counts from 0 and padding of ``document_ids`` is a new document
        id (one more than the row's largest), so padding never joins a real document. Encoder-decoder items
        (``kdtune.data.seq2seq_dataset``) also give ``encoder_tokens [B, S]`` (right-padded with ``pad_id``) and
        ``encoder_padding_mask [B, S]`` (bool, True = real token).
    """
    if not batch:
        raise DataError("padded_collate got an empty batch")
    keys = ("tokens", "labels", "input_pos", "document_ids")
    present = [k for k in keys if k in batch[0]]
    if "tokens" not in present or "labels" not in present:
        raise DataError(f"batch items need 'tokens' and 'labels', got keys {sorted(batch[0])}")
    rows = {k: [torch.as_tensor(item[k], dtype=torch.long).reshape(-1) for item in batch] for k in present}
    for i, item_tokens in enumerate(rows["tokens"]):
        for k in present[1:]:
            if rows[k][i].numel() != item_tokens.numel():
                raise DataError(f"batch item {i}: {item_tokens.numel()} tokens but {rows[k][i].numel()} {k}")
    lengths = [t.numel() for t in rows["tokens"]]
    T = max(lengths)
    if pad_to_multiple_of is not None and pad_to_multiple_of > 1:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(batch)
    out = {
        "tokens": torch.full((B, T), int(pad_id), dtype=torch.long),
        "labels": torch.full((B, T), int(ignore_index), dtype=torch.long),
    }
    if "input_pos" in present:
        out["input_pos"] = torch.arange(T, dtype=torch.long).repeat(B, 1)
    if "document_ids" in present:
        out["document_ids"] = torch.zeros((B, T), dtype=torch.long)
    for i, n in enumerate(lengths):
        for k in present:
            out[k][i, :n] = rows[k][i]
        if n < T:
            if "input_pos" in out:
                out["input_pos"][i, n:] = torch.arange(T - n)
            if "document_ids" in out:
                out["document_ids"][i, n:] = (int(rows["document_ids"][i].max()) + 1) if n else 0
    if "encoder_tokens" in batch[0]:
        out.update(_pad_encoder([item["encoder_tokens"] for item in batch], pad_id, pad_to_multiple_of))
    return out


def _pad_encoder(sources: Sequence[Any], pad_id: int, pad_to_multiple_of: int | None) -> dict[str, torch.Tensor]:
    """``encoder_tokens [B, S]`` right-padded with ``pad_id`` and ``encoder_padding_mask [B, S]`` (True = real)."""
    rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sources]
    if any(r.numel() == 0 for r in rows):
        raise DataError("a batch item has empty encoder_tokens; every source needs at least one token")
    S = max(r.numel() for r in rows)
    if pad_to_multiple_of is not None and pad_to_multiple_of > 1:
        S = -(-S // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(rows), S), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : r.numel()] = r
        mask[i, : r.numel()] = True
    return {"encoder_tokens": tokens, "encoder_padding_mask": mask}


#: batch keys that are keyword arguments of the models' ``forward`` (packed sequences; the encoder input of encoder-decoder models), beside ``tokens``
MODEL_INPUT_KEYS = ("input_pos", "document_ids", "encoder_tokens", "encoder_padding_mask")


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's ``forward`` present in a collated batch (packed fields included)."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
