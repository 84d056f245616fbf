"""Source/target pairs for encoder-decoder models (T5, BART): rows -> ``{"encoder_tokens", "tokens", "labels"}``.

``encoder_tokens`` is the tokenized source (the tokenizer's BOS if it has one, EOS appended: T5 ``x </s>``, BART
``<s> x </s>``, as ``transformers`` tokenizers do); ``tokens = [decoder_start_id] + target_ids`` and
``labels = [-100] + target_ids`` (aligned with ``tokens``: the objective compares position ``t`` with label ``t + 1``,
exactly as for decoder-only models), where ``target_ids`` is the tokenized target with EOS (BART: and BOS), i.e. the
``labels`` of a ``transformers`` seq2seq fine-tune. Batch with ``kdtune.data.padded_collate``, which also pads
``encoder_tokens`` and returns ``encoder_padding_mask``.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from kdtune.data.datasets._builders import Subset, _load_subset
from kdtune.data.datasets._sft import CROSS_ENTROPY_IGNORE_IDX, EAGER_MAX_ROWS
from kdtune.errors import DataError

__all__ = ["SEQ2SEQ_LAYOUTS", "Seq2SeqDataset", "seq2seq_dataset"]

logger = logging.getLogger("kdtune.data")

#: Column layouts recognised without ``column_map``, in order: ``(source, context or None, target)``. The context, when
#: present and non-empty, follows the source after a blank line.
SEQ2SEQ_LAYOUTS: tuple[tuple[str, str | None, str], ...] = (
    ("source", None, "target"),
    ("instruction", "context", "response"),  # databricks-dolly-15k
    ("instruction", "input", "output"),  # alpaca
    ("input", None, "output"),
    ("document", None, "summary"),  # xsum
    ("article", None, "highlights"),  # cnn_dailymail
    ("dialogue", None, "summary"),  # samsum
)


def _columns(columns: Sequence[str], column_map: Mapping[str, str] | None, where: str) -> tuple[str, str | None, str]:
    """``(source, context, target)`` column names of the data: from ``column_map`` (keys ``source``, ``target``,
    optional ``context``) or the first matching ``SEQ2SEQ_LAYOUTS`` entry."""
    cols = set(columns)
    if column_map:
        unknown = sorted(set(column_map) - {"source", "target", "context"})
        if unknown:
            raise DataError(
                f"column_map: unknown key(s) {unknown} for a seq2seq dataset; use source, target and optionally context "
                "(e.g. column_map={source: document, target: summary})."
            )
        src, ctx, tgt = (
            column_map.get("source", "source"),
            column_map.get("context"),
            column_map.get("target", "target"),
        )
        missing = [c for c in (src, tgt, ctx) if c is not None and c not in cols]
        if missing:
            raise DataError(
                f"{where}: column(s) {missing} (from column_map) not found; the columns are {sorted(cols)}."
            )
        return src, ctx, tgt
    for src, ctx, tgt in SEQ2SEQ_LAYOUTS:
        if src in cols and tgt in cols:
            return src, (ctx if ctx in cols else None), tgt
    known = ", ".join(f"{s}/{t}" for s, _, t in SEQ2SEQ_LAYOUTS)
    raise DataError(
        f"{where}: cannot tell the source and target columns from {sorted(cols)} (known layouts: {known}); set "
        "column_map, e.g. column_map={source: question, target: answer}."
    )


def _cut(ids: list[int], limit: int | None, eos_id: int | None) -> tuple[list[int], bool]:
    """``ids`` cut to ``limit`` tokens, keeping a final EOS (as ``transformers`` truncation keeps special tokens)."""
    if limit is None or len(ids) <= limit:
        return ids, False
    if eos_id is not None and ids and ids[-1] == eos_id and limit > 1:
        return ids[: limit - 1] + [eos_id], True
    return ids[:limit], True


class Seq2SeqDataset(Dataset):
    """Source/target rows encoded for an encoder-decoder model (see the module docstring for the item layout).

    Rows are encoded up front (``lazy=False``; the default for up to 100,000 rows): truncated sources and targets are
    counted and reported in ONE warning, and rows with an empty target are dropped. With ``lazy=True`` rows are encoded
    on access and truncation is warned about once and counted in ``num_truncated``.

    Args:
        rows: the raw rows (a ``datasets.Dataset`` or a sequence of dicts).
        tokenizer: a kdtune tokenizer (``encode(text, add_bos, add_eos)``, ``eos_id``).
        decoder_start_id: first decoder input token (T5: pad = 0, BART: eos = 2; ``config.json``'s
            ``decoder_start_token_id``).
        columns: ``(source, context or None, target)`` column names.
        max_source_len: cut longer sources to this many tokens (EOS kept), or None.
        max_target_len: cut longer targets (``labels`` without the leading -100) to this many tokens, or None.
        source_prefix: text put before every source (T5 task prefixes, e.g. ``"summarize: "``).
        lazy: encode on access; None: up front unless there are more than 100,000 rows.
        source: dataset description for messages.
        row_ids: the row number in the user's split of each row, for messages.
    """

    def __init__(
        self,
        rows: Any,
        tokenizer: Any,
        *,
        decoder_start_id: int,
        columns: tuple[str, str | None, str],
        max_source_len: int | None = None,
        max_target_len: int | None = None,
        source_prefix: str = "",
        lazy: bool | None = None,
        source: str = "dataset",
        row_ids: Sequence[int] | None = None,
    ) -> None:
        for key, value in (("max_source_len", max_source_len), ("max_target_len", max_target_len)):
            if value is not None and int(value) < 2:
                raise DataError(f"{key} must be an integer >= 2 (room for a token and EOS), got {value!r}")
        if len(rows) == 0:
            raise DataError(f"{source} has no rows; check split, split slicing and filter_fn")
        self._rows = rows
        self.tokenizer = tokenizer
        self.decoder_start_id = int(decoder_start_id)
        self.columns = columns
        self.max_source_len = max_source_len
        self.max_target_len = max_target_len
        self.source_prefix = source_prefix
        self.source = source
        self._row_ids = None if row_ids is None else list(row_ids)
        self.lazy = len(rows) > EAGER_MAX_ROWS if lazy is None else bool(lazy)
        self.num_truncated_source = 0
        self.num_truncated_target = 0
        self.num_dropped = 0
        self._warned = False
        self._seen_truncated: set[int] = set()
        if self.lazy:
            for i in range(min(len(rows), 64)):  # fail at start-up on a systematic problem
                self._encode(rows[i], i)
        else:
            self._encode_all()

    @property
    def num_truncated(self) -> int:
        """Examples whose source or target was cut (counted once per example in eager mode)."""
        return self._num_truncated_any if not self.lazy else len(self._seen_truncated)

    def _text(self, row: Mapping[str, Any], col: str | None, index: int, required: bool) -> str:
        value = row.get(col) if col is not None else None
        if value is None:
            if required:
                raise DataError(f"{self.source} row {self._row_id(index)}: column {col!r} is empty (null).")
            return ""
        if not isinstance(value, str):
            raise DataError(
                f"{self.source} row {self._row_id(index)}: column {col!r} holds {type(value).__name__}, not text; "
                "point column_map at a text column."
            )
        return value

    def _encode(self, row: Mapping[str, Any], index: int) -> tuple[list[int], list[int], bool, bool]:
        """``(encoder_tokens, target_ids, source_cut, target_cut)`` for one row."""
        src_col, ctx_col, tgt_col = self.columns
        text = self._text(row, src_col, index, True)
        context = self._text(row, ctx_col, index, False)
        if context.strip():
            text = f"{text}\n\n{context}"
        tok = self.tokenizer
        eos = getattr(tok, "eos_id", None)
        enc, src_cut = _cut(tok.encode(self.source_prefix + text, add_bos=True, add_eos=True), self.max_source_len, eos)
        target = self._text(row, tgt_col, index, True)
        tgt, tgt_cut = _cut(tok.encode(target, add_bos=True, add_eos=True), self.max_target_len, eos)
        return enc, tgt, src_cut, tgt_cut

    def _item(self, enc: Sequence[int], tgt: Sequence[int]) -> dict[str, list[int]]:
        return {
            "encoder_tokens": list(enc),
            "tokens": [self.decoder_start_id, *tgt],
            "labels": [CROSS_ENTROPY_IGNORE_IDX, *tgt],
        }

    def _row_id(self, i: int) -> int:
        return i if self._row_ids is None else self._row_ids[i]

    def _encode_all(self) -> None:
        enc_ids, tgt_ids = array("i"), array("i")
        enc_off, tgt_off = array("q", [0]), array("q", [0])
        truncated_any = 0
        n = len(self._rows)
        for i in range(n):
            row = self._rows[i]
            enc, tgt, src_cut, tgt_cut = self._encode(row, i)
            self.num_truncated_source += src_cut
            self.num_truncated_target += tgt_cut
            truncated_any += src_cut or tgt_cut
            if not self._text(row, self.columns[2], i, True).strip():
                self.num_dropped += 1
                continue
            enc_ids.extend(enc)
            tgt_ids.extend(tgt)
            enc_off.append(len(enc_ids))
            tgt_off.append(len(tgt_ids))
        self._enc, self._tgt, self._enc_off, self._tgt_off = enc_ids, tgt_ids, enc_off, tgt_off
        self._num_truncated_any = truncated_any
        self._rows = None
        parts = []
        if self.num_truncated_source:
            parts.append(
                f"{self.num_truncated_source} of {n} sources of {self.source} were longer than max_source_len="
                f"{self.max_source_len} tokens and were truncated"
            )
        if self.num_truncated_target:
            parts.append(
                f"{self.num_truncated_target} of {n} targets were longer than max_target_len={self.max_target_len} "
                "tokens and were truncated"
            )
        if self.num_dropped:
            parts.append(f"{self.num_dropped} examples had an empty target and were dropped")
        if parts:
            logger.warning("%s; raise max_source_len / max_target_len to keep examples whole", "; ".join(parts))
        if len(self) == 0:
            raise DataError(f"{self.source}: every example has an empty target; check the target column (column_map)")

    def __len__(self) -> int:
        return len(self._rows) if self.lazy else len(self._enc_off) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} examples")
        if self.lazy:
            enc, tgt, src_cut, tgt_cut = self._encode(self._rows[index], index)
            if (src_cut or tgt_cut) and index not in self._seen_truncated:
                self._seen_truncated.add(index)
                self.num_truncated_source += src_cut
                self.num_truncated_target += tgt_cut
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "example %d of %s is longer than max_source_len=%s / max_target_len=%s and was truncated; "
                        "further truncations are counted in dataset.num_truncated (encode eagerly, lazy=False, to "
                        "get the total up front)",
                        index,
                        self.source,
                        self.max_source_len,
                        self.max_target_len,
                    )
            return self._item(enc, tgt)
        return self._item(
            self._enc[self._enc_off[index] : self._enc_off[index + 1]].tolist(),
            self._tgt[self._tgt_off[index] : self._tgt_off[index + 1]].tolist(),
        )

    def lengths(self) -> list[int]:
        """Source + target tokens of every example (eager mode): the size ``group_by_length`` sorts by."""
        if self.lazy:
            raise DataError("lengths() needs an eagerly encoded dataset (lazy=False)")
        enc, tgt = self._enc_off, self._tgt_off
        return [enc[i + 1] - enc[i] + tgt[i + 1] - tgt[i] for i in range(len(self))]


def seq2seq_dataset(
    tokenizer: Any,
    *,
    source: str,
    data_files: Any = None,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    max_source_len: int | None = None,
    max_target_len: int | None = None,
    decoder_start_id: int | None = None,
    source_prefix: str = "",
    filter_fn: Callable[[Mapping[str, Any]], bool] | str | None = None,
    val_split_ratio: float | None = None,
    val_split_seed: int = 0,
    eval_split: str | None = None,
    subset: Subset = "train",
    lazy: bool | None = None,
    **load_dataset_kwargs: Any,
) -> Seq2SeqDataset:
    """Source/target pairs for encoder-decoder training (config ``_component_: kdtune.data.seq2seq_dataset``).

    Columns are found from the known layouts (``SEQ2SEQ_LAYOUTS``: ``source``/``target``, dolly's
    ``instruction``/``context``/``response``, ``instruction``/``input``/``output``, ``input``/``output``,
    ``document``/``summary``, ``article``/``highlights``, ``dialogue``/``summary``) or named with ``column_map``
    (``{source: ..., target: ..., context: ...}``).

    Args:
        tokenizer: a kdtune tokenizer of the model (T5: sentencepiece, BART: byte-level BPE).
        source: a hub name, a packaged builder (``json``, ``csv``, ...) with ``data_files``, a local data file, or a
            ``save_to_disk`` directory.
        data_files: files for a packaged builder.
        split: split to load (``datasets`` slicing allowed).
        column_map: canonical name (``source``, ``target``, ``context``) -> the data's column.
        max_source_len: cut longer sources (encoder input) to this many tokens, EOS kept; default: the tokenizer's
            ``max_seq_len``.
        max_target_len: cut longer targets to this many tokens, EOS kept; default: the tokenizer's ``max_seq_len``.
        decoder_start_id: the decoder's first input token; default: the tokenizer's ``decoder_start_id`` (set by
            ``load_hf_tokenizer`` from ``config.json``'s ``decoder_start_token_id``).
        source_prefix: text put before every source (T5 task prefix, e.g. ``"summarize: "``).
        filter_fn: keep only rows for which this returns True (callable or dotted path).
        val_split_ratio: hold out this fraction of the rows for validation (``subset="validation"`` builds it).
        val_split_seed: seed of that split.
        eval_split: a split of the source used as the validation set instead.
        subset: ``"train"`` or ``"validation"``.
        lazy: encode on access (see ``Seq2SeqDataset``).
        **load_dataset_kwargs: passed to ``datasets.load_dataset``.

    Returns:
        A ``Seq2SeqDataset`` of ``{"encoder_tokens", "tokens", "labels"}`` lists.
    """
    start = decoder_start_id if decoder_start_id is not None else getattr(tokenizer, "decoder_start_id", None)
    if start is None:
        raise DataError(
            "seq2seq_dataset: decoder_start_id is not set and the tokenizer does not know it; set decoder_start_id "
            "(config.json's decoder_start_token_id: T5 0, BART 2)."
        )
    default_len = getattr(tokenizer, "max_seq_len", None)
    rows, where, row_ids = _load_subset(
        source,
        data_files=data_files,
        split=split,
        filter_fn=filter_fn,
        val_split_ratio=val_split_ratio,
        val_split_seed=val_split_seed,
        eval_split=eval_split,
        subset=subset,
        load_dataset_kwargs=load_dataset_kwargs,
    )
    columns = _columns(list(rows.column_names), column_map, where)
    return Seq2SeqDataset(
        rows,
        tokenizer,
        decoder_start_id=int(start),
        columns=columns,
        max_source_len=max_source_len if max_source_len is not None else default_len,
        max_target_len=max_target_len if max_target_len is not None else default_len,
        source_prefix=source_prefix,
        lazy=lazy,
        source=where,
        row_ids=row_ids,
    )
