"""Dataset builders, usable as config ``_component_``s: ``builder(tokenizer, **cfg_kwargs)``.

Each builder loads rows through `datasets.load_dataset` (hub name, or ``json``/``csv``/``parquet``/``arrow`` with
``data_files``, or a local file path as ``source``), optionally filters them and holds out a validation part, turns
them into messages by the row format, tokenizes them with the tokenizer's chat format, truncates to ``max_seq_len``
and optionally packs them.

Held-out validation: give ``val_split_ratio`` (and ``val_split_seed``) to split the loaded rows deterministically,
or ``eval_split`` to use another split of the source; ``subset="validation"`` returns the held-out part, so a
recipe builds its validation set from the same config node with ``instantiate(cfg.dataset, tok, subset="validation")``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch.utils.data import Dataset

from kdtune.data.datasets._load import load_rows, resolve_callable, split_indices
from kdtune.data.datasets._sft import SFTDataset, labels_from_mask
from kdtune.data.formats import (
    ColumnFormat,
    MaskingStyle,
    RowConverter,
    check_columns,
    detect_format,
    get_format,
)
from kdtune.data.packing import PackedDataset
from kdtune.errors import DataError

logger = logging.getLogger("kdtune.data")

Subset = Literal["train", "validation"]


def _describe(source: str, data_files: Any, split: str) -> str:
    """A short name of the dataset for messages: ``dataset data/train.jsonl (split 'train')``."""
    if isinstance(data_files, Mapping) and split.split("[")[0] in data_files:
        data_files = data_files[split.split("[")[0]]
    if data_files is not None:
        files = (
            data_files
            if isinstance(data_files, str)
            else list(data_files.values() if isinstance(data_files, Mapping) else data_files)
        )
        if isinstance(files, list):
            files = [f if isinstance(f, str) else str(list(f)) for f in files]
            files = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"
        return f"dataset {files} (split {split!r})"
    return f"dataset {source} (split {split!r})"


def _load_subset(
    source: str,
    *,
    data_files: Any,
    split: str,
    filter_fn: Callable[[Mapping[str, Any]], bool] | str | None,
    val_split_ratio: float | None,
    val_split_seed: int,
    eval_split: str | None,
    subset: Subset,
    load_dataset_kwargs: dict[str, Any],
) -> tuple[Any, str, list[int] | None]:
    """Load, filter and pick the train or validation part of the rows.

    Returns:
        ``(rows, description, row_ids)``; ``row_ids[i]`` is the position of ``rows[i]`` in the loaded split (None when
        no row was left out), so messages name the row of the user's file.
    """
    if subset not in ("train", "validation"):
        raise DataError(f"subset must be 'train' or 'validation', got {subset!r}")
    if eval_split is not None and val_split_ratio is not None:
        raise DataError("set either eval_split (a split of the source) or val_split_ratio (a held-out part), not both")
    if subset == "validation" and eval_split is None and val_split_ratio is None:
        raise DataError(
            "subset='validation' needs a held-out set: set val_split_ratio (e.g. 0.05) or eval_split (e.g. 'test')"
        )
    load_split = eval_split if (subset == "validation" and eval_split is not None) else split
    rows = load_rows(source, data_files=data_files, split=load_split, **load_dataset_kwargs)
    where = _describe(source, data_files, load_split)
    if len(rows) == 0:
        raise DataError(f"{where} has no rows; check split and its slicing")
    row_ids: list[int] | None = None
    fn = resolve_callable(filter_fn, key="filter_fn")
    if fn is not None:
        keep = [i for i, row in enumerate(rows) if fn(row)]
        if not keep:
            raise DataError(f"{where} is empty after filter_fn ({len(rows)} rows before filtering); relax filter_fn")
        if len(keep) < len(rows):
            logger.info("filter_fn kept %d of %d rows of %s", len(keep), len(rows), where)
            rows, row_ids = rows.select(keep), keep
    if val_split_ratio is not None:
        train_idx, val_idx = split_indices(len(rows), val_split_ratio, val_split_seed)
        part = val_idx if subset == "validation" else train_idx
        rows = rows.select(part)
        row_ids = [row_ids[i] for i in part] if row_ids is not None else part
        where = f"{where} ({subset} part of val_split_ratio={val_split_ratio}, seed {val_split_seed})"
    return rows, where, row_ids


def _finish(
    tokenizer: Any,
    rows: Any,
    encode_fn: Callable[[Mapping[str, Any], int], tuple[list[int], list[int]]],
    *,
    where: str,
    max_seq_len: int | None,
    packed: bool,
    split_across_pack: bool,
    lazy: bool | None,
    num_proc: int | None,
    row_ids: list[int] | None,
) -> Dataset:
    if packed and lazy:
        raise DataError("packed=True encodes every example up front; it cannot be combined with lazy=True")
    if packed and max_seq_len is None:
        raise DataError("packed=True needs max_seq_len (set it on the dataset or the tokenizer)")
    if packed:
        lazy = False
    ds = SFTDataset(
        rows, encode_fn, max_seq_len=max_seq_len, lazy=lazy, source=where, num_proc=num_proc, row_ids=row_ids
    )
    if packed:
        return PackedDataset(
            ds, max_seq_len, padding_idx=getattr(tokenizer, "pad_id", 0) or 0, split_across_pack=split_across_pack
        )
    return ds


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _max_seq_len(tokenizer: Any, max_seq_len: int | None) -> int | None:
    return max_seq_len if max_seq_len is not None else getattr(tokenizer, "max_seq_len", None)


def _message_dataset(
    tokenizer: Any,
    *,
    source: str,
    data_files: Any,
    split: str,
    format: str | ColumnFormat,
    kinds: tuple[str, ...],
    column_map: Mapping[str, str] | None,
    train_on_input: bool,
    new_system_prompt: str | None,
    masking: MaskingStyle,
    role_map: Mapping[str, str] | None,
    packed: bool,
    split_across_pack: bool,
    max_seq_len: int | None,
    filter_fn: Any,
    val_split_ratio: float | None,
    val_split_seed: int,
    eval_split: str | None,
    subset: Subset,
    lazy: bool | None,
    num_proc: int | None,
    load_dataset_kwargs: dict[str, Any],
) -> Dataset:
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
    if isinstance(format, ColumnFormat):
        fmt = format
    elif format == "auto":
        fmt = detect_format(rows.column_names, column_map, kinds=kinds, source=where)
    else:
        fmt = get_format(format)
        if fmt.kind not in kinds:
            raise DataError(f"format {fmt.name!r} is a {fmt.kind} format; this builder takes {'/'.join(kinds)} formats")
    check_columns(fmt, rows.column_names, column_map, source=where)
    if fmt.kind == "text":
        return _finish(
            tokenizer,
            rows,
            _text_encoder(tokenizer, fmt.resolve_columns(column_map)["text"], add_eos=True),
            where=where,
            max_seq_len=max_seq_len,
            packed=packed,
            split_across_pack=split_across_pack,
            lazy=lazy,
            num_proc=num_proc,
            row_ids=row_ids,
        )
    convert = RowConverter(
        fmt,
        column_map=column_map,
        train_on_input=train_on_input,
        masking=masking,
        new_system_prompt=new_system_prompt,
        role_map=role_map,
        source=where,
    )

    check_something_to_train(rows, convert, where=where, row_ids=row_ids)

    # The dataset truncates (and counts truncations) itself, so ask the tokenizer not to cut silently first.
    extra = (
        {"truncate_to_max_seq_len": False} if _accepts(tokenizer.tokenize_messages, "truncate_to_max_seq_len") else {}
    )

    def encode(row: Mapping[str, Any], index: int) -> tuple[list[int], list[int]]:
        messages = convert(row, index)
        try:
            tokens, mask = tokenizer.tokenize_messages(messages, add_eos=True, **extra)
        except DataError as e:  # e.g. a role or order the chat template rejects: say which row
            raise DataError(f"{where} row {index}: {e}") from e
        return list(tokens), labels_from_mask(tokens, mask)

    return _finish(
        tokenizer,
        rows,
        encode,
        where=where,
        max_seq_len=max_seq_len,
        packed=packed,
        split_across_pack=split_across_pack,
        lazy=lazy,
        num_proc=num_proc,
        row_ids=row_ids,
    )


def check_something_to_train(
    rows: Any,
    convert: Callable[[Mapping[str, Any], int], list[Any]],
    *,
    where: str,
    row_ids: list[int] | None = None,
) -> None:
    """Refuse a dataset none of whose trained messages (the assistant's; with ``train_on_input`` every turn's) has any
    content: it would train on end-of-turn tokens only.

    Stops at the first row with something to train, so it costs one row conversion on any usable dataset.

    Raises:
        DataError: naming the dataset (file) and the number of rows.
    """
    for i in range(len(rows)):
        messages = convert(rows[i], i if row_ids is None else row_ids[i])
        if any(not m.masked and m.content.strip() for m in messages):
            return
    raise DataError(
        f"{where}: nothing to train: none of its {len(rows)} rows has an assistant (trained) message that is not "
        "empty or null; fill in the responses or point column_map at the response column"
    )


def _text_encoder(
    tokenizer: Any, column: str, *, add_eos: bool
) -> Callable[[Mapping[str, Any], int], tuple[list[int], list[int]]]:
    def encode(row: Mapping[str, Any], index: int) -> tuple[list[int], list[int]]:
        text = row.get(column)
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise DataError(f"row {index}: column {column!r} should hold text but holds {type(text).__name__}")
        tokens = list(tokenizer.encode(text, add_bos=True, add_eos=add_eos))
        return tokens, list(tokens)

    return encode


def sft_dataset(
    tokenizer: Any,
    source: str,
    *,
    data_files: Any = None,
    split: str = "train",
    format: str = "auto",
    column_map: Mapping[str, str] | None = None,
    train_on_input: bool = False,
    new_system_prompt: str | None = None,
    masking: MaskingStyle = "all_assistant",
    role_map: Mapping[str, str] | None = None,
    packed: bool = False,
    split_across_pack: bool = False,
    max_seq_len: int | None = None,
    filter_fn: Callable[[Mapping[str, Any]], bool] | str | None = None,
    val_split_ratio: float | None = None,
    val_split_seed: int = 0,
    eval_split: str | None = None,
    subset: Subset = "train",
    lazy: bool | None = None,
    num_proc: int | None = None,
    **load_dataset_kwargs: Any,
) -> Dataset:
    """Any SFT / distillation dataset; the row format is detected from the columns unless ``format`` is given.

    Detection order (first match wins, after ``column_map``): ``messages`` (openai), ``conversations`` (sharegpt),
    ``instruction``/``input``/``output`` (alpaca), ``instruction``/``context``/``response`` (dolly),
    ``system_prompt``/``question``/``response`` (openorca), ``source``/``target``, ``prompt``/``completion``,
    ``text`` (plain text, every token trained). The detected format is logged.

    Args:
        tokenizer: A kdtune tokenizer (``tokenize_messages``, ``encode``, ``max_seq_len``, ``pad_id``).
        source: Hub name, packaged builder (``json``/``csv``/``parquet``/``arrow``/``text``) with ``data_files``,
            a local data file, or a `save_to_disk` directory.
        data_files: Files for a packaged builder.
        split: Split to load; `datasets` slicing allowed (``"train[:95%]"``).
        format: ``"auto"`` or a name from `kdtune.data.formats.FORMATS`.
        column_map: Canonical column name -> the dataset's column (``{"source": "question"}``).
        train_on_input: Also train on prompt / user / system tokens.
        new_system_prompt: Replace the system turn of every example with this text.
        masking: Chat data: train on ``"all_assistant"`` turns or only the ``"last_assistant"`` one.
        role_map: Chat data: extra role names -> kdtune roles (``{"bot": "assistant"}``).
        packed: Pack examples into ``max_seq_len`` sequences (`PackedDataset`).
        split_across_pack: Packing: let an example continue into the next pack instead of starting a new one.
        max_seq_len: Truncate to this many tokens; default ``tokenizer.max_seq_len``.
        filter_fn: Keep only rows for which ``filter_fn(row)`` is true (callable or dotted path).
        val_split_ratio: Hold out this fraction of the rows for validation (deterministic, ``val_split_seed``).
        val_split_seed: Seed of the held-out split.
        eval_split: Use this split of the source as the validation set instead.
        subset: ``"train"`` or ``"validation"`` (the held-out part).
        lazy: Tokenize on access instead of up front (for very large datasets; not with ``packed``). Default
            (None): up front for datasets of at most 100,000 rows, on access for larger ones.
        num_proc: Tokenize up front with this many (forked) processes; the tokenizers are pure Python, so this is
            what makes a large dataset start quickly.
        **load_dataset_kwargs: Passed to `datasets.load_dataset` (``name``, ``revision``, ``cache_dir``...).

    Returns:
        A map-style dataset of ``{"tokens", "labels"}`` (packed: plus ``input_pos``, ``document_ids``).
    """
    return _message_dataset(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        format=format,
        kinds=("instruct", "chat", "text"),
        column_map=column_map,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt,
        masking=masking,
        role_map=role_map,
        packed=packed,
        split_across_pack=split_across_pack,
        max_seq_len=_max_seq_len(tokenizer, max_seq_len),
        filter_fn=filter_fn,
        val_split_ratio=val_split_ratio,
        val_split_seed=val_split_seed,
        eval_split=eval_split,
        subset=subset,
        lazy=lazy,
        num_proc=num_proc,
        load_dataset_kwargs=load_dataset_kwargs,
    )


def instruct_dataset(
    tokenizer: Any,
    *,
    source: str,
    data_files: Any = None,
    split: str = "train",
    format: str = "auto",
    column_map: Mapping[str, str] | None = None,
    train_on_input: bool = False,
    new_system_prompt: str | None = None,
    packed: bool = False,
    split_across_pack: bool = False,
    max_seq_len: int | None = None,
    filter_fn: Callable[[Mapping[str, Any]], bool] | str | None = None,
    val_split_ratio: float | None = None,
    val_split_seed: int = 0,
    eval_split: str | None = None,
    subset: Subset = "train",
    lazy: bool | None = None,
    num_proc: int | None = None,
    **load_dataset_kwargs: Any,
) -> Dataset:
    """Single-turn instruction data: one prompt (masked unless ``train_on_input``) and one response.

    ``format`` is ``"auto"`` (detected among the instruction formats) or one of ``source_target``, ``alpaca``,
    ``dolly``, ``openorca``, ``prompt_completion``. With the default ``source_target`` columns,
    ``column_map={"source": "question", "target": "answer"}`` adapts other column names. Other arguments as in
    `sft_dataset`.
    """
    return _message_dataset(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        format=format,
        kinds=("instruct",),
        column_map=column_map,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt,
        masking="all_assistant",
        role_map=None,
        packed=packed,
        split_across_pack=split_across_pack,
        max_seq_len=_max_seq_len(tokenizer, max_seq_len),
        filter_fn=filter_fn,
        val_split_ratio=val_split_ratio,
        val_split_seed=val_split_seed,
        eval_split=eval_split,
        subset=subset,
        lazy=lazy,
        num_proc=num_proc,
        load_dataset_kwargs=load_dataset_kwargs,
    )


def chat_dataset(
    tokenizer: Any,
    *,
    source: str,
    data_files: Any = None,
    split: str = "train",
    conversation_style: Literal["auto", "openai", "sharegpt"] = "auto",
    conversation_column: str | None = None,
    column_map: Mapping[str, str] | None = None,
    masking: MaskingStyle = "all_assistant",
    train_on_input: bool = False,
    new_system_prompt: str | None = None,
    role_map: Mapping[str, str] | None = None,
    packed: bool = False,
    split_across_pack: bool = False,
    max_seq_len: int | None = None,
    filter_fn: Callable[[Mapping[str, Any]], bool] | str | None = None,
    val_split_ratio: float | None = None,
    val_split_seed: int = 0,
    eval_split: str | None = None,
    subset: Subset = "train",
    lazy: bool | None = None,
    num_proc: int | None = None,
    **load_dataset_kwargs: Any,
) -> Dataset:
    """Multi-turn chat data: a column holding a list of turns.

    ``conversation_style``: ``"openai"`` (column ``messages``, turns ``{"role", "content"}``), ``"sharegpt"``
    (column ``conversations``, turns ``{"from", "value"}`` with roles human/gpt/system), or ``"auto"`` (whichever
    column is present). Either key style is accepted in either column. ``conversation_column`` names another column
    holding the turns. Non-assistant turns are masked; ``masking="last_assistant"`` trains only on the final
    assistant turn. Other arguments as in `sft_dataset`.
    """
    if conversation_style not in ("auto", "openai", "sharegpt"):
        raise DataError(
            f"unknown conversation_style {conversation_style!r}; use 'auto', 'openai' (messages) or 'sharegpt'"
        )
    fmt: str | ColumnFormat = "auto" if conversation_style == "auto" else conversation_style
    if conversation_column is not None:
        style = "sharegpt" if conversation_style == "sharegpt" else "openai"
        fmt = get_format(style)
        column_map = {**dict(column_map or {}), fmt.required[0]: conversation_column}
    return _message_dataset(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        format=fmt,
        kinds=("chat",),
        column_map=column_map,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt,
        masking=masking,
        role_map=role_map,
        packed=packed,
        split_across_pack=split_across_pack,
        max_seq_len=_max_seq_len(tokenizer, max_seq_len),
        filter_fn=filter_fn,
        val_split_ratio=val_split_ratio,
        val_split_seed=val_split_seed,
        eval_split=eval_split,
        subset=subset,
        lazy=lazy,
        num_proc=num_proc,
        load_dataset_kwargs=load_dataset_kwargs,
    )


def text_completion_dataset(
    tokenizer: Any,
    *,
    source: str,
    data_files: Any = None,
    split: str = "train",
    column: str = "text",
    add_eos: bool = True,
    packed: bool = False,
    split_across_pack: bool = True,
    max_seq_len: int | None = None,
    filter_fn: Callable[[Mapping[str, Any]], bool] | str | None = None,
    val_split_ratio: float | None = None,
    val_split_seed: int = 0,
    eval_split: str | None = None,
    subset: Subset = "train",
    lazy: bool | None = None,
    num_proc: int | None = None,
    **load_dataset_kwargs: Any,
) -> Dataset:
    """Plain text (continued pre-training, distillation on raw text): every token is trained.

    Each row's ``column`` is encoded with BOS (and EOS if ``add_eos``). Unpacked, long texts are truncated to
    ``max_seq_len``; packed with ``split_across_pack=True`` (the default here) long texts are not truncated but
    continue across packs. Other arguments as in `sft_dataset`.
    """
    max_seq_len = _max_seq_len(tokenizer, max_seq_len)
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
    if column not in rows.column_names:
        raise DataError(
            f"{where} has no column {column!r}; columns present: {rows.column_names}; set column='<your text column>'"
        )
    if not any(isinstance(t, str) and t.strip() for t in (rows[i][column] for i in range(len(rows)))):
        raise DataError(
            f"{where}: nothing to train: column {column!r} is empty or null in all {len(rows)} rows; "
            "give rows with text or set column='<your text column>'"
        )
    keep_whole = packed and split_across_pack
    if packed and lazy:
        raise DataError("packed=True encodes every example up front; it cannot be combined with lazy=True")
    if packed and max_seq_len is None:
        raise DataError("packed=True needs max_seq_len (set it on the dataset or the tokenizer)")
    ds = SFTDataset(
        rows,
        _text_encoder(tokenizer, column, add_eos=add_eos),
        max_seq_len=None if keep_whole else max_seq_len,
        lazy=False if packed else lazy,
        source=where,
        num_proc=num_proc,
        row_ids=row_ids,
    )
    if not packed:
        return ds
    return PackedDataset(
        ds, max_seq_len, padding_idx=getattr(tokenizer, "pad_id", 0) or 0, split_across_pack=split_across_pack
    )


# --------------------------------------------------------------------------------------------- named datasets


def alpaca_dataset(
    tokenizer: Any,
    *,
    source: str = "tatsu-lab/alpaca",
    data_files: Any = None,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    max_seq_len: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """Alpaca (``instruction``/``input``/``output``), rendered with the Alpaca prompt template.

    Defaults to the hub dataset ``tatsu-lab/alpaca``; ``source``/``data_files`` point it at local copies.
    Further keyword arguments as in `instruct_dataset`.
    """
    return instruct_dataset(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        format="alpaca",
        column_map=column_map,
        train_on_input=train_on_input,
        packed=packed,
        max_seq_len=max_seq_len,
        **kwargs,
    )


def alpaca_cleaned_dataset(
    tokenizer: Any,
    *,
    source: str = "yahma/alpaca-cleaned",
    data_files: Any = None,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    max_seq_len: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """Alpaca-cleaned (``yahma/alpaca-cleaned``); otherwise as `alpaca_dataset`."""
    return alpaca_dataset(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        column_map=column_map,
        train_on_input=train_on_input,
        packed=packed,
        max_seq_len=max_seq_len,
        **kwargs,
    )


def openorca_dataset(
    tokenizer: Any,
    *,
    source: str = "Open-Orca/OpenOrca",
    data_files: Any = None,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    max_seq_len: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """OpenOrca (``system_prompt``/``question``/``response``; an empty system prompt is left out).

    The full hub dataset has ~4M rows, so it is tokenized on access (see ``lazy``); a sliced ``split``
    (``"train[:50000]"``) keeps runs short.
    Further keyword arguments as in `instruct_dataset`.
    """
    return instruct_dataset(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        format="openorca",
        column_map=column_map,
        train_on_input=train_on_input,
        packed=packed,
        max_seq_len=max_seq_len,
        **kwargs,
    )


def dolly_dataset(
    tokenizer: Any,
    *,
    source: str = "databricks/databricks-dolly-15k",
    data_files: Any = None,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    max_seq_len: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """Dolly 15k (``instruction``/``context``/``response``; the context follows the instruction after a blank line).

    Further keyword arguments as in `instruct_dataset`.
    """
    return instruct_dataset(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        format="dolly",
        column_map=column_map,
        train_on_input=train_on_input,
        packed=packed,
        max_seq_len=max_seq_len,
        **kwargs,
    )


def ultrachat_dataset(
    tokenizer: Any,
    *,
    source: str = "HuggingFaceH4/ultrachat_200k",
    data_files: Any = None,
    split: str = "train_sft",
    column_map: Mapping[str, str] | None = None,
    masking: MaskingStyle = "all_assistant",
    train_on_input: bool = False,
    packed: bool = False,
    max_seq_len: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """UltraChat 200k (``messages``, OpenAI style; split ``train_sft``, evaluation split ``test_sft``).

    Further keyword arguments as in `chat_dataset`.
    """
    return chat_dataset(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        conversation_style="openai",
        column_map=column_map,
        masking=masking,
        train_on_input=train_on_input,
        packed=packed,
        max_seq_len=max_seq_len,
        **kwargs,
    )


def slimorca_dataset(
    tokenizer: Any,
    *,
    source: str = "Open-Orca/SlimOrca-Dedup",
    data_files: Any = None,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    masking: MaskingStyle = "all_assistant",
    train_on_input: bool = False,
    packed: bool = False,
    max_seq_len: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """SlimOrca (``conversations``, ShareGPT style with system/human/gpt turns).

    Further keyword arguments as in `chat_dataset`.
    """
    return chat_dataset(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        conversation_style="sharegpt",
        column_map=column_map,
        masking=masking,
        train_on_input=train_on_input,
        packed=packed,
        max_seq_len=max_seq_len,
        **kwargs,
    )
