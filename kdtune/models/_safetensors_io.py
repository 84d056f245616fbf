"""File-level helpers for HF checkpoint directories: finding weight files, reading them one at a time, writing sharded
safetensors (or ``.bin``) with an HF index, and replacing a directory atomically.

Nothing here knows about model families; ``kdtune.models.checkpointer`` does the name conversion.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from kdtune.errors import CheckpointError
from kdtune.fsio import atomic_directory, atomic_write_file

__all__ = [
    "ShardWriter",
    "WEIGHT_SUFFIXES",
    "atomic_directory",
    "check_weight_tensor",
    "list_weight_files",
    "parse_size",
    "read_json",
    "read_weight_file",
    "resolve_weight_files",
    "write_json_atomic",
]

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth")
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
# trainer/optimizer state that sits next to weights in some directories (never model weights)
_NOT_WEIGHTS = ("adapter_", "training_args", "optimizer", "scheduler", "rng_state", "scaler")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_size(size: str | int) -> int:
    """Bytes in a size like ``"5GB"`` (10^9, as HF), ``"200MB"``, ``"1GiB"`` (2^30) or an int.

    Raises:
        CheckpointError: the string is not a size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise CheckpointError(f"max_shard_size must be positive, got {size}; use e.g. '5GB'.")
        return size
    m = _SIZE_RE.match(str(size))
    if not m:
        raise CheckpointError(f"max_shard_size: cannot read {size!r} as a size; use e.g. '5GB', '200MB' or 1000000.")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if value < 1:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}; use e.g. '5GB'.")
    return int(value)


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file, with a CheckpointError naming the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-download or fix the file."
        ) from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (``kdtune.fsio.atomic_write_file``)."""
    atomic_write_file(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def list_weight_files(directory: Path) -> list[str]:
    """Names of the weight-looking files directly in ``directory`` (for error messages)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _files_from_index(directory: Path, index_name: str) -> list[str]:
    index = read_json(directory / index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{directory / index_name}: has no 'weight_map'; re-download the checkpoint.")
    return sorted(set(weight_map.values()))


def _expand_torchtune_format(spec: dict[str, Any]) -> list[str]:
    """torchtune's ``{filename_format: "model-{}-of-{}.safetensors", max_filename: "00004"}`` file list."""
    fmt, last = spec.get("filename_format"), spec.get("max_filename")
    if not isinstance(fmt, str) or not isinstance(last, str) or not last.isdigit() or fmt.count("{}") != 2:
        raise CheckpointError(
            "checkpoint_files: a mapping must be {filename_format: 'model-{}-of-{}.safetensors', max_filename: '00004'}."
        )
    width = len(last)
    return [fmt.format(str(i).zfill(width), last) for i in range(1, int(last) + 1)]


def resolve_weight_files(directory: Path, checkpoint_files: list[str] | dict[str, Any] | None) -> list[Path]:
    """The weight files to read, in order.

    With ``checkpoint_files`` None: the files of ``model.safetensors.index.json``, else ``model.safetensors``, else all
    ``*.safetensors``, else the ``pytorch_model.bin`` index / file, else all ``*.bin``/``*.pt``/``*.pth``. Given files
    may include an ``*.index.json`` (expanded) or be torchtune's ``filename_format`` mapping.

    Raises:
        CheckpointError: the directory is missing, a listed file is missing (the weight files present are named), or
            no weight file is found.
    """
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(
            f"checkpoint_dir {str(directory)!r} {what}; download the model first (e.g. `kdtune download <repo>`) "
            "or fix checkpoint_dir."
        )
    if checkpoint_files is None:
        names: list[str] = []
        for idx in _INDEX_NAMES[:1]:
            if (directory / idx).is_file():
                names = _files_from_index(directory, idx)
        if not names and (directory / _SINGLE_NAMES[0]).is_file():
            names = [_SINGLE_NAMES[0]]
        if not names:
            names = sorted(p.name for p in directory.glob("*.safetensors") if not p.name.startswith("adapter_"))
        if not names and (directory / _INDEX_NAMES[1]).is_file():
            names = _files_from_index(directory, _INDEX_NAMES[1])
        if not names and (directory / _SINGLE_NAMES[1]).is_file():
            names = [_SINGLE_NAMES[1]]
        if not names:
            names = sorted(
                p.name
                for p in directory.iterdir()
                if p.is_file() and p.name.endswith((".bin", ".pt", ".pth")) and not p.name.startswith(_NOT_WEIGHTS)
            )
        if not names:
            raise CheckpointError(
                f"checkpoint_dir {str(directory)!r} holds no weight files (*.safetensors, *.bin, *.pt); "
                f"files there: {sorted(p.name for p in directory.iterdir())[:20]}."
            )
    else:
        if isinstance(checkpoint_files, dict) or (
            hasattr(checkpoint_files, "keys") and hasattr(checkpoint_files, "get")
        ):
            names = _expand_torchtune_format(dict(checkpoint_files))
        elif isinstance(checkpoint_files, str):
            names = [checkpoint_files]
        else:
            names = [str(n) for n in checkpoint_files]
        if not names:
            raise CheckpointError("checkpoint_files is empty; list the weight files or leave it unset to auto-detect.")
        expanded: list[str] = []
        for n in names:
            if n.endswith(".index.json") and (directory / n).is_file():
                expanded.extend(_files_from_index(directory, n))
            else:
                expanded.append(n)
        names = list(dict.fromkeys(expanded))
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint_dir {str(directory)!r}: missing weight file(s) {missing[:5]}"
            f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}; weight files present: "
            f"{list_weight_files(directory) or 'none'}. Fix checkpoint_files or re-download."
        )
    return [directory / n for n in names]


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file on CPU: safetensors (memory-mapped) or a torch pickle (``weights_only=True``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e}); the file may be corrupt.") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}.")
    return obj


#: elements checked at a time for NaN/inf (bounds the temporary boolean mask to 16 MiB)
_FINITE_CHECK_ELEMENTS = 1 << 24


def check_weight_tensor(path: Path, name: str, tensor: torch.Tensor, *, expect_float: bool = True) -> None:
    """Refuse a weight that does not load as floating point or holds NaN/inf, naming the file and the tensor.

    Called per tensor while loading, so the cost is one summing pass over each tensor (NaN/inf make the sum
    non-finite), with no second copy of the weights; only a non-finite sum is examined element-wise, in slices of
    ``_FINITE_CHECK_ELEMENTS``.

    Args:
        path: the weight file the tensor comes from.
        name: the tensor's name as the file spells it (e.g. ``model.layers.0.mlp.up_proj.weight``).
        tensor: the tensor read from the file.
        expect_float: the model parameter it fills is floating point.

    Raises:
        CheckpointError: an integer/bool tensor where a float is expected, or NaN/inf values (with their count).
    """
    if not tensor.is_floating_point():
        if expect_float:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, not floating point, but the "
                "model's weight is; this is not a plain HF checkpoint of this model (a quantized export?): use the "
                "floating-point (bf16/fp16/fp32) weights."
            )
        return
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0 or bool(torch.isfinite(flat.sum())):
        return  # a NaN or inf anywhere makes the sum non-finite; one fast pass (~15 GB/s on one CPU core)
    # the sum is not finite: NaN/inf, or only an overflow of the sum (fp16); count exactly, a slice at a time
    for start in range(0, flat.numel(), _FINITE_CHECK_ELEMENTS):
        if bool(torch.isfinite(flat[start : start + _FINITE_CHECK_ELEMENTS]).all()):
            continue
        n_nan, n_inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
        raise CheckpointError(
            f"{path}: tensor {name!r} holds {n_nan} NaN and {n_inf} inf value(s) of {flat.numel()}; these weights are "
            "broken (saved from a diverged run, or a corrupt file): re-download them or use an earlier checkpoint."
        )


class ShardWriter:
    """Write tensors into HF-style shards as they come (``model-00001-of-0000N.safetensors`` + index), keeping at most
    one shard in memory. A single shard is written as ``model.safetensors`` with no index, as ``save_pretrained`` does.

    Args:
        directory: an existing (temporary) directory to write into.
        max_shard_size: bytes per shard (a tensor larger than this gets a shard of its own).
        safe_serialization: safetensors (True) or ``pytorch_model*.bin`` (False).
        prefix: file stem for the weights (``model`` / ``pytorch_model``; default by format).
    """

    def __init__(
        self, directory: Path, max_shard_size: int, safe_serialization: bool = True, prefix: str | None = None
    ):
        self.directory = directory
        self.max_shard_size = max_shard_size
        self.safe = safe_serialization
        self.prefix = prefix or ("model" if safe_serialization else "pytorch_model")
        self.ext = ".safetensors" if safe_serialization else ".bin"
        self._current: dict[str, torch.Tensor] = {}
        self._current_size = 0
        self._shards: list[list[str]] = []
        self.total_size = 0
        self._seen: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flushes the current shard to disk when ``tensor`` would overflow it."""
        if name in self._seen:
            raise ValueError(f"tensor {name!r} written twice")
        self._seen.add(name)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        # safetensors refuses views and shared storage: give each tensor its own compact storage.
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
            t = t.contiguous().clone()
        size = t.numel() * t.element_size()
        if self._current and self._current_size + size > self.max_shard_size:
            self._flush()
        self._current[name] = t
        self._current_size += size
        self.total_size += size

    def _tmp_name(self, i: int) -> str:
        return f".shard-{i:05d}{self.ext}"

    def _flush(self) -> None:
        if not self._current:
            return
        path = self.directory / self._tmp_name(len(self._shards))
        if self.safe:
            from safetensors.torch import save_file

            save_file(self._current, str(path), metadata={"format": "pt"})
        else:
            torch.save(self._current, str(path))
        self._shards.append(list(self._current))
        self._current = {}
        self._current_size = 0

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index; return the file names."""
        self._flush()
        n = len(self._shards)
        if n == 0:
            raise CheckpointError("nothing to save: the model has no tensors.")
        if n == 1:
            final = [f"{self.prefix}{self.ext}"]
        else:
            final = [f"{self.prefix}-{i + 1:05d}-of-{n:05d}{self.ext}" for i in range(n)]
        for i, name in enumerate(final):
            os.replace(self.directory / self._tmp_name(i), self.directory / name)
        if n > 1:
            weight_map = {k: final[i] for i, keys in enumerate(self._shards) for k in keys}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            write_json_atomic(self.directory / f"{self.prefix}{self.ext}.index.json", index)
        return final


def copy_non_weight_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the top-level non-weight files of an HF directory (tokenizer files, generation_config.json, README, ...)
    from ``src`` to ``dst``; weight files, weight indexes, adapter files, hidden files, sub-directories and ``skip``
    are left out. Returns the copied names."""
    copied: list[str] = []
    if not src.is_dir():
        return copied
    for p in sorted(src.iterdir()):
        name = p.name
        if not p.is_file() or name.startswith(".") or name in skip:
            continue
        if name.endswith(WEIGHT_SUFFIXES + (".index.json", ".gguf", ".msgpack", ".h5", ".ckpt", ".onnx")):
            continue
        if name.startswith("adapter_") or ".tmp-" in name:
            continue
        shutil.copy2(p, dst / name)
        copied.append(name)
    return copied
