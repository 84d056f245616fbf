"""Tokenized map-style datasets: rows -> ``{"tokens", "labels"}`` with truncation accounted for once."""

from __future__ import annotations

import logging
import multiprocessing
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from kdtune.errors import DataError

logger = logging.getLogger("kdtune.data")

CROSS_ENTROPY_IGNORE_IDX = -100

#: Above this many rows, datasets are tokenized on access unless ``lazy=False`` is given.
EAGER_MAX_ROWS = 100_000

#: ``encode_fn(row, index) -> (tokens, labels)``; labels aligned with tokens, -100 where not trained.
EncodeFn = Callable[[Mapping[str, Any], int], tuple[list[int], list[int]]]


def labels_from_mask(
    tokens: Sequence[int], mask: Sequence[bool], ignore_index: int = CROSS_ENTROPY_IGNORE_IDX
) -> list[int]:
    """Labels aligned with ``tokens``: the token id where it is trained (mask False), ``ignore_index`` elsewhere."""
    if len(tokens) != len(mask):
        raise ValueError(f"tokenizer returned {len(tokens)} tokens but {len(mask)} mask entries")
    return [ignore_index if m else t for t, m in zip(tokens, mask)]


@dataclass
class _EncodedChunk:
    """Encoded examples of a range of rows (what a tokenizing worker sends back)."""

    tokens: array = field(default_factory=lambda: array("i"))
    labels: array = field(default_factory=lambda: array("i"))
    lengths: list[int] = field(default_factory=list)
    num_truncated: int = 0
    num_dropped: int = 0
    longest: int = 0


_FORK_DATASET: SFTDataset | None = None


def _encode_range_in_worker(args: tuple[int, int, bool]) -> _EncodedChunk:
    assert _FORK_DATASET is not None
    return _FORK_DATASET._encode_range(*args)


class SFTDataset(Dataset):
    """Rows of a `datasets.Dataset` (or any sequence of dicts) encoded to ``{"tokens", "labels"}``.

    By default every row is encoded once at construction (``lazy=False``): rows that fail fail at start-up, the
    examples longer than ``max_seq_len`` are counted and reported in ONE warning, examples left with no trained token
    (e.g. a response cut away by truncation) are dropped, and the token ids are kept compactly (4 bytes per token).
    With ``lazy=True`` (the default, None, picks it for more than `EAGER_MAX_ROWS` rows) rows are encoded in ``__getitem__`` (for datasets too large to encode up front); truncation
    is then warned about once, at the first truncated example, and counted in `num_truncated`.

    Args:
        rows: The raw rows.
        encode_fn: ``(row, index) -> (tokens, labels)``.
        max_seq_len: Truncate longer examples to this many tokens (None: no truncation).
        lazy: Encode on access instead of up front; None: up front unless there are more than `EAGER_MAX_ROWS` rows.
        source: Dataset name used in messages.
        drop_untrainable: Drop (eager mode) examples whose labels are all ignored.
        row_ids: The row number (in the user's split) of each row, passed to ``encode_fn`` for messages when rows were
            filtered or split (default: the position).
        num_proc: Tokenize up front with this many processes (forked, so the tokenizer is not pickled; Linux/macOS).
    """

    def __init__(
        self,
        rows: Any,
        encode_fn: EncodeFn,
        *,
        max_seq_len: int | None = None,
        lazy: bool | None = None,
        source: str = "dataset",
        drop_untrainable: bool = True,
        num_proc: int | None = None,
        row_ids: Sequence[int] | None = None,
    ) -> None:
        if max_seq_len is not None and int(max_seq_len) < 1:
            raise DataError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        self._rows = rows
        self._encode_fn = encode_fn
        self.max_seq_len = None if max_seq_len is None else int(max_seq_len)
        self.num_proc = max(1, int(num_proc or 1))
        self._row_ids = None if row_ids is None else list(row_ids)
        if lazy is None:
            lazy = len(rows) > EAGER_MAX_ROWS
            if lazy:
                logger.info(
                    "%s has %d rows: tokenizing on access (lazy); set lazy=False to tokenize up front",
                    source,
                    len(rows),
                )
        self.lazy = bool(lazy)
        self.source = source
        self.num_truncated = 0
        self.num_dropped = 0
        self._warned = False
        self._truncated_indices: set[int] = set()  # lazy mode: distinct examples seen truncated
        if len(rows) == 0:
            raise DataError(f"{source} has no rows; check split, split slicing and filter_fn")
        if not self.lazy:
            self._encode_all(drop_untrainable)
        else:  # fail at start-up, not hours into training, on a systematic problem (wrong columns, roles, ...)
            for i in range(min(len(rows), 64)):
                self._encode_fn(rows[i], self._row_id(i))

    def _encode_range(self, start: int, end: int, drop_untrainable: bool) -> _EncodedChunk:
        chunk = _EncodedChunk()
        rows = self._rows
        for i in range(start, end):
            t, lab = self._encode_fn(rows[i], self._row_id(i))
            chunk.longest = max(chunk.longest, len(t))
            t, lab, cut = self._truncate(t, lab)
            chunk.num_truncated += cut
            if drop_untrainable and all(x == CROSS_ENTROPY_IGNORE_IDX for x in lab):
                chunk.num_dropped += 1
                continue
            chunk.tokens.extend(t)
            chunk.labels.extend(lab)
            chunk.lengths.append(len(t))
        return chunk

    def _encode_all(self, drop_untrainable: bool) -> None:
        tokens, labels, offsets = array("i"), array("i"), array("q", [0])
        longest = 0
        n = len(self._rows)
        step = max(1, min(1000, -(-n // (4 * self.num_proc)))) if self.num_proc > 1 else 256
        ranges = [(s, min(n, s + step), drop_untrainable) for s in range(0, n, step)]
        progress = tqdm(total=n, desc="Tokenizing", disable=n < 20000, leave=False)
        if self.num_proc > 1 and len(ranges) > 1 and "fork" in multiprocessing.get_all_start_methods():
            global _FORK_DATASET
            _FORK_DATASET = self  # inherited by the forked workers: nothing (tokenizer, rows) is pickled
            try:
                with multiprocessing.get_context("fork").Pool(min(self.num_proc, len(ranges))) as pool:
                    chunks = pool.imap(_encode_range_in_worker, ranges)
                    for chunk in chunks:
                        self._add_chunk(chunk, tokens, labels, offsets)
                        longest = max(longest, chunk.longest)
                        progress.update(len(chunk.lengths) + chunk.num_dropped)
            finally:
                _FORK_DATASET = None
        else:
            for start, end, drop in ranges:
                chunk = self._encode_range(start, end, drop)
                self._add_chunk(chunk, tokens, labels, offsets)
                longest = max(longest, chunk.longest)
                progress.update(end - start)
        progress.close()
        self._tokens, self._labels, self._offsets = tokens, labels, offsets
        self._rows = None  # the encoded form is all that is needed now
        if self.num_truncated or self.num_dropped:
            parts = []
            if self.num_truncated:
                parts.append(
                    f"{self.num_truncated} of {n} examples of {self.source} were longer than max_seq_len="
                    f"{self.max_seq_len} (longest: {longest} tokens) and were truncated"
                )
            if self.num_dropped:
                parts.append(f"{self.num_dropped} examples had no trained token left and were dropped")
            logger.warning("%s; raise max_seq_len to keep examples whole", "; ".join(parts))
        if len(self) == 0:
            raise DataError(
                f"{self.source}: no example has a trained token (all {n} were dropped); check the masking settings "
                f"(train_on_input, masking), the response columns and max_seq_len"
            )

    def _row_id(self, i: int) -> int:
        return i if self._row_ids is None else self._row_ids[i]

    def _add_chunk(self, chunk: _EncodedChunk, tokens: array, labels: array, offsets: array) -> None:
        tokens.extend(chunk.tokens)
        labels.extend(chunk.labels)
        end = offsets[-1]
        for length in chunk.lengths:
            end += length
            offsets.append(end)
        self.num_truncated += chunk.num_truncated
        self.num_dropped += chunk.num_dropped

    def _truncate(self, tokens: list[int], labels: list[int]) -> tuple[list[int], list[int], bool]:
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            return tokens[: self.max_seq_len], labels[: self.max_seq_len], True
        return tokens, labels, False

    def __len__(self) -> int:
        return len(self._rows) if self.lazy else len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if self.lazy:
            if index < 0:
                index += len(self)
            tokens, labels = self._encode_fn(self._rows[index], self._row_id(index))
            tokens, labels, cut = self._truncate(tokens, labels)
            if cut and index not in self._truncated_indices:
                self._truncated_indices.add(index)
                self.num_truncated += 1
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "example %d of %s is longer than max_seq_len=%d and was truncated; further truncations are "
                        "counted in dataset.num_truncated (in this process) (encode eagerly, lazy=False, to get the total up front)",
                        index,
                        self.source,
                        self.max_seq_len,
                    )
            return {"tokens": list(tokens), "labels": list(labels)}
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} examples")
        start, end = self._offsets[index], self._offsets[index + 1]
        return {"tokens": self._tokens[start:end].tolist(), "labels": self._labels[start:end].tolist()}

    def lengths(self) -> list[int]:
        """Token count of every example (eager mode), e.g. for length-grouped sampling."""
        if self.lazy:
            raise DataError("lengths() needs an eagerly encoded dataset (lazy=False)")
        return [self._offsets[i + 1] - self._offsets[i] for i in range(len(self))]
