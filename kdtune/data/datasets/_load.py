"""Loading rows through `datasets` (hub name, builder + data_files, a local file or a saved dataset directory),
with the user-caused failures turned into one-line `DataError`s, plus a deterministic held-out split."""

from __future__ import annotations

import glob
import importlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from kdtune.errors import DataError

#: File extension -> `datasets` packaged builder.
EXTENSION_BUILDERS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
PACKAGED_BUILDERS = ("json", "csv", "parquet", "arrow", "text")

T = TypeVar("T")


def _data_file_list(data_files: Any) -> list[str]:
    """Flatten ``data_files`` (str, list, or split -> str/list) into a list of local paths (globs expanded)."""
    paths: list[str] = []
    for item in _as_list(data_files):
        item = os.path.expanduser(str(item))
        matches = sorted(glob.glob(item)) if any(ch in item for ch in "*?[") else [item]
        paths.extend(p for p in matches if os.path.isfile(p))
    return paths


def find_json_error(path: str) -> tuple[int, str] | None:
    """Find the first malformed line of a JSON-lines (or JSON array / object) file.

    Returns:
        ``(line_number, message)`` (1-based) for the first problem, or None when the file parses.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return raw[: e.start].count(b"\n") + 1, f"not UTF-8 text ({e.reason})"
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return e.lineno, e.msg
        return None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            try:  # one pretty-printed JSON object is fine too
                json.loads(text)
                return None
            except json.JSONDecodeError:
                return lineno, e.msg
        if not isinstance(value, dict):
            return lineno, f"expected a JSON object per line, got {type(value).__name__}"
    return None


#: packaged builders that read their files as UTF-8 text (checked by `check_text_file` before loading)
TEXT_BUILDERS = ("json", "csv", "text")


def check_text_file(path: str, *, key: str = "data_files", chunk_bytes: int = 1 << 22) -> None:
    """Refuse a local data file that is empty or not UTF-8 text, naming the file (and the line of the first bad byte).

    Reads the file once, a chunk at a time (memory stays at ``chunk_bytes``), so it is cheap next to tokenizing it.

    Args:
        path: the data file.
        key: the config key that names it, for the message.
        chunk_bytes: read size.

    Raises:
        DataError: the file is empty / holds only blank lines, or holds bytes that are not UTF-8.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"data file {path} (key {key!r}) is empty (0 bytes); give a file with rows or remove it")
    line = 1  # 1-based number of the first line of `pending`
    pending = b""
    blank = True
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            data = pending + chunk
            if chunk:
                cut = data.rfind(b"\n") + 1  # decode whole lines only: no UTF-8 sequence is split
                if cut == 0:
                    pending = data
                    continue
                part, pending = data[:cut], data[cut:]
            else:
                part, pending = data, b""
            try:
                text = part.decode("utf-8")
            except UnicodeDecodeError as e:
                bad_line = line + part[: e.start].count(b"\n")
                column = e.start - (part.rfind(b"\n", 0, e.start) + 1) + 1
                raise DataError(
                    f"data file {path} (key {key!r}) line {bad_line} is not UTF-8 text (byte 0x{part[e.start]:02x} "
                    f"at column {column}); re-save the file as UTF-8 or fix that line"
                ) from None
            if blank and text.strip("\ufeff \t\r\n"):
                blank = False
            line += part.count(b"\n")
            if not chunk:
                break
    if blank:
        raise DataError(f"data file {path} (key {key!r}) holds only blank lines; give a file with rows or remove it")


def _first_line(e: BaseException) -> str:
    msgs = [str(e).strip()]
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in msgs[0]:
        msgs.append(str(cause).strip())
    return ": ".join(m.splitlines()[0] for m in msgs if m)


def resolve_source(source: str, data_files: Any) -> tuple[str, Any]:
    """Map a local file path given as ``source`` to ``(builder, data_files)``; anything else is returned as is."""
    path = os.path.expanduser(source)
    ext = os.path.splitext(path)[1].lower()
    if data_files is None and ext in EXTENSION_BUILDERS and (os.path.isfile(path) or any(c in path for c in "*?[")):
        return EXTENSION_BUILDERS[ext], path
    return source, data_files


def load_rows(
    source: str,
    *,
    data_files: Any = None,
    split: str = "train",
    **load_dataset_kwargs: Any,
) -> Any:
    """Load one split of a dataset as a `datasets.Dataset`.

    Args:
        source: A hub name (``"yahma/alpaca-cleaned"``), a packaged builder (``json``, ``csv``, ``parquet``,
            ``arrow``, ``text``) used with ``data_files``, a local data file (``data/train.jsonl``), or a directory
            written by `datasets.Dataset.save_to_disk`.
        data_files: Files for a packaged builder (str, list, or split -> files).
        split: Split name, with `datasets` slicing allowed (``"train[:95%]"``, ``"train[100:200]"``).
        **load_dataset_kwargs: Passed to `datasets.load_dataset` (``name``, ``revision``, ``cache_dir``, ...).

    Raises:
        DataError: the source cannot be loaded; for JSON files the file and line of the first malformed line.
    """
    import datasets

    if load_dataset_kwargs.get("streaming"):
        raise DataError("streaming=True is not supported by kdtune's map-style datasets; remove 'streaming'")
    files_key = "data_files" if data_files is not None else "source"
    builder, data_files = resolve_source(source, data_files)
    local_dir = os.path.expanduser(builder)
    if (
        data_files is None
        and os.path.isdir(local_dir)
        and (
            os.path.isfile(os.path.join(local_dir, "state.json"))
            or os.path.isfile(os.path.join(local_dir, "dataset_dict.json"))
        )
    ):
        return _load_from_disk(local_dir, split)
    if builder in PACKAGED_BUILDERS and not data_files:
        raise DataError(f"source {builder!r} needs data_files (key 'data_files'), e.g. data_files='train.jsonl'")
    if builder in PACKAGED_BUILDERS:
        missing = [
            p
            for p in _as_list(data_files)
            if "://" not in p and not any(c in p for c in "*?[") and not os.path.exists(os.path.expanduser(p))
        ]
        if missing:
            raise DataError(f"data file {missing[0]!r} (key 'data_files') does not exist; check the path")
        if builder in TEXT_BUILDERS:
            for path in _data_file_list(data_files):
                check_text_file(path, key=files_key)
    try:
        rows = datasets.load_dataset(builder, data_files=data_files, split=split, **load_dataset_kwargs)
    except Exception as e:
        if builder == "json":
            for path in _data_file_list(data_files):
                problem = find_json_error(path)
                if problem is not None:
                    raise DataError(
                        f"malformed JSON in {path} line {problem[0]}: {problem[1]}; fix or remove that line"
                    ) from e
        raise DataError(
            f"could not load dataset {source!r} (split {split!r}): {_first_line(e)}; check the source name, "
            f"split and data_files"
        ) from e
    if isinstance(rows, datasets.DatasetDict):  # split=None
        raise DataError(f"dataset {source!r}: set split (key 'split') to one of {list(rows)}")
    return rows


def _as_list(data_files: Any) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, Mapping):
        out: list[str] = []
        for v in data_files.values():
            out += [v] if isinstance(v, str) else list(v)
        return out
    return list(data_files)


def _load_from_disk(path: str, split: str) -> Any:
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        name = split.split("[")[0]
        if name not in loaded:
            raise DataError(f"dataset directory {path} has no split {name!r} (key 'split'); splits: {list(loaded)}")
        loaded = loaded[name]
    if "[" in split:
        # Re-use `datasets`' own slice parser on the loaded split.
        instr = datasets.ReadInstruction.from_spec(split)
        (abs_instr,) = instr.to_absolute({split.split("[")[0]: len(loaded)})
        loaded = loaded.select(range(abs_instr.from_, abs_instr.to))
    return loaded


def resolve_callable(fn: Callable[..., T] | str | None, *, key: str) -> Callable[..., T] | None:
    """Accept a callable or a dotted path ``"package.module.function"`` (as written in YAML configs)."""
    if fn is None or callable(fn):
        return fn
    if isinstance(fn, str) and "." in fn:
        module_name, _, attr = fn.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise DataError(f"cannot import {fn!r} (key {key!r}): {e}; give a dotted path to a function") from e
        if callable(obj):
            return obj
    raise DataError(f"{key} must be a callable or a dotted path to one, got {fn!r}")


def split_indices(n: int, val_ratio: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic train / validation index split.

    Args:
        n: Number of examples.
        val_ratio: Fraction held out for validation, in (0, 1); at least one example is held out.
        seed: Seed of the permutation; the same (n, val_ratio, seed) always gives the same split.

    Returns:
        ``(train_indices, val_indices)``, each in increasing order.
    """
    if not 0.0 < float(val_ratio) < 1.0:
        raise DataError(f"val_split_ratio must be in (0, 1), got {val_ratio!r}")
    n_val = max(1, int(round(n * float(val_ratio))))
    if n_val >= n:
        raise DataError(
            f"val_split_ratio={val_ratio} holds out {n_val} of {n} examples, leaving none to train on; lower it"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def split_dataset(dataset: Any, val_ratio: float, seed: int = 0) -> tuple[Any, Any]:
    """Split a dataset into (train, validation) deterministically.

    Works on a `datasets.Dataset` (returns ``.select``-ed datasets) or any sized `torch.utils.data.Dataset`
    (returns `torch.utils.data.Subset`s). Examples keep their original order inside each part.

    Args:
        dataset: The dataset to split.
        val_ratio: Fraction held out for validation, in (0, 1).
        seed: Permutation seed.
    """
    train_idx, val_idx = split_indices(len(dataset), val_ratio, seed)
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        return dataset.select(train_idx), dataset.select(val_idx)
    from torch.utils.data import Subset

    return Subset(dataset, train_idx), Subset(dataset, val_idx)
