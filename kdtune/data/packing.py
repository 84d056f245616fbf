"""Packing several tokenized examples into fixed-length sequences.

Every pack is exactly ``max_seq_len`` long and carries, besides ``tokens`` and ``labels``:

- ``input_pos``: each example's own positions, restarting at 0 where an example starts;
- ``document_ids``: 0, 1, 2, ... per example in the pack; the padding at the end forms one more document.

A model that attends only within equal ``document_ids`` (causally) computes for every example exactly what it would
compute for that example alone. The label at the first token of every document is set to the ignore index: with the
loss's shift (``logits[:, :-1]`` vs ``labels[:, 1:]``) that label would otherwise make the previous document's last
token predict the next document's first token; in an unpacked batch it is never used either. So the packed loss
sums exactly the same (position, target) terms as the unpacked examples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from kdtune.errors import DataError

logger = logging.getLogger("kdtune.data")

CROSS_ENTROPY_IGNORE_IDX = -100


class PackedDataset(Dataset):
    """Greedy, order-preserving packing of a dataset of ``{"tokens", "labels"}`` items.

    Args:
        ds: Items with ``tokens`` and ``labels`` (lists or 1-D tensors of equal length).
        max_seq_len: Length of every pack.
        padding_idx: Token id used to pad the last part of a pack (its labels are ``ignore_index``).
        split_across_pack: If True, an example that does not fit in the current pack fills it and continues in the
            next pack(s) (each piece is a separate document with positions from 0). If False, the example starts a
            new pack; an example longer than ``max_seq_len`` is then an error.
        max_packs: Stop after this many packs (None: pack everything).
        ignore_index: Label value that is not trained.

    Yields items ``{"tokens", "labels", "input_pos", "document_ids"}``: lists of ``max_seq_len`` ints.
    """

    def __init__(
        self,
        ds: Iterable[dict[str, Any]],
        max_seq_len: int,
        *,
        padding_idx: int = 0,
        split_across_pack: bool = False,
        max_packs: int | None = None,
        ignore_index: int = CROSS_ENTROPY_IGNORE_IDX,
    ) -> None:
        if max_seq_len is None or int(max_seq_len) < 1:
            raise DataError(
                f"packing needs a positive max_seq_len, got {max_seq_len!r}; set max_seq_len on the dataset or tokenizer"
            )
        self.max_seq_len = int(max_seq_len)
        self.padding_idx = int(padding_idx)
        self.split_across_pack = bool(split_across_pack)
        self.ignore_index = int(ignore_index)
        self.max_packs = max_packs
        self._packs: list[torch.Tensor] = []  # each [4, max_seq_len] int32: tokens, labels, input_pos, document_ids
        self.num_examples = 0
        self._pack(ds)

    def _pack(self, ds: Iterable[dict[str, Any]]) -> None:
        L = self.max_seq_len
        cur_tokens: list[int] = []
        cur_labels: list[int] = []
        cur_pos: list[int] = []
        cur_docs: list[int] = []
        n_docs = 0

        def flush() -> None:
            nonlocal cur_tokens, cur_labels, cur_pos, cur_docs, n_docs
            pad = L - len(cur_tokens)
            if pad:
                cur_tokens += [self.padding_idx] * pad
                cur_labels += [self.ignore_index] * pad
                cur_pos += list(range(pad))
                cur_docs += [n_docs] * pad
            self._packs.append(torch.tensor([cur_tokens, cur_labels, cur_pos, cur_docs], dtype=torch.int32))
            cur_tokens, cur_labels, cur_pos, cur_docs, n_docs = [], [], [], [], 0

        def add(tokens: list[int], labels: list[int]) -> None:
            nonlocal n_docs
            labels = list(labels)
            labels[0] = self.ignore_index  # never a target across a document boundary (see module docstring)
            cur_tokens.extend(tokens)
            cur_labels.extend(labels)
            cur_pos.extend(range(len(tokens)))
            cur_docs.extend([n_docs] * len(tokens))
            n_docs += 1

        total = len(ds) if hasattr(ds, "__len__") else None
        for i, item in enumerate(tqdm(ds, total=total, desc="Packing", disable=(total or 0) < 20000, leave=False)):
            if self.max_packs is not None and len(self._packs) >= self.max_packs:
                break
            tokens, labels = _as_list(item["tokens"]), _as_list(item["labels"])
            if len(tokens) != len(labels):
                raise DataError(f"example {i}: {len(tokens)} tokens but {len(labels)} labels")
            if not tokens:
                continue
            self.num_examples += 1
            if len(tokens) > L and not self.split_across_pack:
                raise DataError(
                    f"example {i} has {len(tokens)} tokens, more than max_seq_len={L}; truncate it (the dataset's "
                    f"max_seq_len) or set split_across_pack=True"
                )
            if not self.split_across_pack:
                if len(cur_tokens) + len(tokens) > L:
                    flush()
                add(tokens, labels)
                continue
            while tokens:
                room = L - len(cur_tokens)
                add(tokens[:room], labels[:room])
                tokens, labels = tokens[room:], labels[room:]
                if len(cur_tokens) == L:
                    flush()
                    if self.max_packs is not None and len(self._packs) >= self.max_packs:
                        break
        if cur_tokens and (self.max_packs is None or len(self._packs) < self.max_packs):
            flush()
        if not self._packs:
            raise DataError("nothing to pack: the dataset has no non-empty example")
        logger.info("Packed %d examples into %d sequences of %d tokens", self.num_examples, len(self._packs), L)

    def __len__(self) -> int:
        return len(self._packs)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        tokens, labels, input_pos, document_ids = self._packs[index].tolist()
        return {"tokens": tokens, "labels": labels, "input_pos": input_pos, "document_ids": document_ids}


def _as_list(x: Any) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)
