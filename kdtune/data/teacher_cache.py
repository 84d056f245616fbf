"""A cache of a teacher's top-k predictions for offline (logit-level) distillation: format, writer, reader, checks.

Layout of a cache directory (``recipes/cache_teacher_logits.py`` writes it)::

    manifest.json             what was cached and how (see ``CacheManifest``); ``complete: true`` once finished
    index.safetensors         merged index: example key -> (shard, offset, count), sorted by key
    shards/shard-00000.safetensors, ...
        values           [M, k]  bf16|fp32  the teacher's top-k log-probs at the cache temperature (``value_kind:
                                            logprobs``, ``logits / T - logZ_T``) or its raw top-k logits (``logits``)
        ids              [M, k]  int32      the top-k token ids, most likely first
        logz             [M]     fp32       logZ_T = logsumexp(logits / T) over the vocabulary (the tail's mass is
                                            ``1 - sum(exp(top-k log-probs))``)
        example_keys     [E, 16] uint8      key of every example of the shard, in order
        example_offsets  [E]     int64      first row of the example in values/ids/logz
        example_counts   [E]     int64      number of rows (trained positions) of the example

M is the number of trained positions of the shard (positions ``t`` with ``labels[t + 1] != -100``), E the number of
examples that have one. Shard ``i`` holds the dataset items ``[i * items_per_shard, (i + 1) * items_per_shard)``; under
``torchrun`` rank ``r`` writes the shards ``i`` with ``i % world_size == r``, so the cache (every byte of it) does not
depend on the number of processes, and rank 0 merges the shards' keys into ``index.safetensors`` at the end. Shards
are written to a temporary file and renamed (``os.replace``): a shard on disk is finished, and an interrupted run
resumes at the first missing shard and ends with the same bytes as an uninterrupted one.

Examples are matched by content, not by position: the key of an example (a document of a packed row, or a row) is a
hash of its token ids and of which of its positions are trained, up to its last trained label (trailing padding and
untrained tokens do not change it, nor does the first label, which packing masks). So the cache serves shuffled,
padded and packed batches of the same data (:meth:`TeacherLogitsCache.lookup`), and a cache built from other data,
another tokenizer or another ``max_seq_len`` is refused with one error naming the difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdtune.errors import ConfigError, DataError

__all__ = [
    "CACHE_FORMAT",
    "CacheManifest",
    "TeacherCacheWriter",
    "TeacherLogitsCache",
    "VALUE_DTYPES",
    "VALUE_KINDS",
    "batch_examples",
    "dataset_fingerprint",
    "dataset_max_seq_len",
    "example_key",
    "item_examples",
    "teacher_topk",
    "tokenizer_fingerprint",
    "weights_fingerprint",
]

log = logging.getLogger("kdtune")

CACHE_FORMAT = "kdtune-teacher-logits"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.safetensors"
SHARDS_DIR = "shards"
IGNORE_INDEX = -100
VALUE_KINDS: tuple[str, ...] = ("logprobs", "logits")
VALUE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
_KEY_BYTES = 16


# --------------------------------------------------------------------------------------------------- example keys
def example_key(tokens: np.ndarray, trained: np.ndarray) -> bytes:
    """The 16-byte key of one example.

    Args:
        tokens: ``[L]`` the example's token ids, cut after its last trained label.
        trained: ``[L]`` bool, whether position ``j``'s label is trained (entry 0 is ignored: the first label is never
            a target).
    """
    h = hashlib.blake2b(digest_size=_KEY_BYTES, person=b"kdtune-example1")
    h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(trained[1:], dtype=np.uint8).tobytes())
    return h.digest()


def _row_examples(
    tokens: np.ndarray, labels: np.ndarray, document_ids: np.ndarray | None, ignore_index: int, where: str
) -> list[tuple[bytes, int]]:
    """``(key, number of trained positions)`` of each example of one row with a trained position, in order."""
    trained = labels != ignore_index  # [T]
    if document_ids is None:
        bounds = [0, len(tokens)]
    else:
        change = np.flatnonzero(document_ids[1:] != document_ids[:-1]) + 1
        bounds = [0, *change.tolist(), len(tokens)]
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e < len(tokens) and trained[e]:
            raise DataError(
                f"{where}: the first label of a packed document (position {e}) is trained, so the previous document "
                "would predict across the boundary; pack with kdtune.data.PackedDataset (it masks that label)"
            )
        doc_trained = trained[s:e].copy()
        doc_trained[0] = False
        hits = np.flatnonzero(doc_trained)
        if hits.size == 0:
            continue
        last = int(hits[-1])
        out.append((example_key(tokens[s : s + last + 1], doc_trained[: last + 1]), int(hits.size)))
    return out


def item_examples(
    item: dict[str, Any], ignore_index: int = IGNORE_INDEX, where: str = "item"
) -> list[tuple[bytes, int]]:
    """``(key, count)`` of every example of a dataset item (a row, or a pack of documents), in order."""
    docs = item.get("document_ids")
    return _row_examples(
        np.asarray(item["tokens"], dtype=np.int64),
        np.asarray(item["labels"], dtype=np.int64),
        None if docs is None else np.asarray(docs, dtype=np.int64),
        ignore_index,
        where,
    )


def batch_examples(batch: dict[str, Tensor], ignore_index: int = IGNORE_INDEX) -> list[list[tuple[bytes, int]]]:
    """``(key, count)`` of every example of every row of a collated batch (``tokens``, ``labels`` ``[B, T]``, optional
    ``document_ids``); the counts of a row sum to its trained positions ``(labels[b, 1:] != ignore_index).sum()``."""
    tokens = batch["tokens"].detach().cpu().numpy()
    labels = batch["labels"].detach().cpu().numpy()
    docs = batch.get("document_ids")
    docs = None if docs is None else docs.detach().cpu().numpy()
    return [
        _row_examples(tokens[b], labels[b], None if docs is None else docs[b], ignore_index, f"batch row {b}")
        for b in range(tokens.shape[0])
    ]


def _iter_items(datasets: Sequence[Any]) -> Iterator[dict[str, Any]]:
    for ds in datasets:
        for i in range(len(ds)):
            yield ds[i]


def dataset_fingerprint(datasets: Sequence[Any], ignore_index: int = IGNORE_INDEX) -> tuple[str, int, int, int]:
    """Hash of the ordered example keys of ``datasets`` (e.g. ``[train, validation]``).

    Returns:
        ``(sha256 hex, number of items, number of examples, number of trained positions)``.
    """
    h = hashlib.sha256()
    items = examples = positions = 0
    for item in _iter_items(datasets):
        for key, count in item_examples(item, ignore_index, f"dataset item {items}"):
            h.update(key)
            h.update(count.to_bytes(8, "little"))
            examples += 1
            positions += count
        items += 1
    return h.hexdigest(), items, examples, positions


def dataset_max_seq_len(dataset: Any, tokenizer: Any = None) -> int | None:
    """The ``max_seq_len`` the dataset was truncated/packed to (its own, else the tokenizer's; None = no limit)."""
    found: list[int] = []

    def visit(ds: Any) -> None:
        if getattr(ds, "max_seq_len", None) is not None:
            found.append(int(ds.max_seq_len))
        for sub in getattr(ds, "datasets", None) or ():  # ConcatDataset
            visit(sub)

    visit(dataset)
    if found:
        return max(found)
    value = getattr(tokenizer, "max_seq_len", None)
    return None if value is None else int(value)


# --------------------------------------------------------------------------------------------------- fingerprints
_PROBE_TEXT = "Hello, world! Ünïcödé — 你好 🙂 12345 \t tabs\nnew line  spaces"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 of what the tokenizer does: its special ids and tokens, the text of every id, its chat template and
    the encoding of a probe text and conversation. ``max_seq_len`` is not part of it (the manifest records it)."""
    from kdtune.data.messages import Message

    vocab = int(getattr(tokenizer, "vocab_size", 0) or 0)
    pieces = []
    for i in range(vocab):
        try:
            pieces.append(tokenizer.decode([i], skip_special_tokens=False))
        except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode is part of its behaviour
            pieces.append(None)
    conversation = [Message("system", "Be brief."), Message("user", _PROBE_TEXT), Message("assistant", "Fine 🙂")]
    try:
        chat = tokenizer.tokenize_messages(conversation, add_eos=True)
        chat = [list(map(int, chat[0])), [bool(m) for m in chat[1]]]
    except Exception as e:  # noqa: BLE001 - a tokenizer without a chat template
        chat = f"error: {type(e).__name__}"
    described = {
        "class": type(tokenizer).__name__,
        "vocab_size": vocab,
        "bos_id": getattr(tokenizer, "bos_id", None),
        "eos_id": getattr(tokenizer, "eos_id", None),
        "pad_id": getattr(tokenizer, "pad_id", None),
        "stop_ids": [int(x) for x in getattr(tokenizer, "stop_ids", []) or []],
        "special_tokens": {
            str(k): int(v) for k, v in sorted((getattr(tokenizer, "special_tokens", None) or {}).items())
        },
        "chat_template": getattr(tokenizer, "chat_template", None),
        "pieces": pieces,
        "encode": [int(x) for x in tokenizer.encode(_PROBE_TEXT, add_bos=True, add_eos=True)],
        "chat": chat,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def weights_fingerprint(checkpoint_dir: str | os.PathLike[str] | None, checkpoint_files: Any = None) -> dict[str, Any]:
    """``{"checkpoint_dir", "files": {name: sha256}, "sha256"}`` of a checkpoint directory's weight files (None dir:
    a model that was not loaded from disk)."""
    if checkpoint_dir is None:
        return {"checkpoint_dir": None, "files": {}, "sha256": None}
    from kdtune.models._safetensors_io import resolve_weight_files

    files = {}
    for path in resolve_weight_files(Path(checkpoint_dir), checkpoint_files):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        files[path.name] = h.hexdigest()
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"checkpoint_dir": str(checkpoint_dir), "files": files, "sha256": combined}


# ------------------------------------------------------------------------------------------------------ manifest
@dataclass
class CacheManifest:
    """``manifest.json``: everything a cache was built from, and how its values are stored.

    Attributes:
        teacher: ``weights_fingerprint`` of the teacher's checkpoint (dir, sha256 per weight file, combined sha256).
        teacher_vocab_size: the teacher's output size.
        vocab_size: the vocabulary the teacher's distribution is normalised over (its first ``vocab_size`` logits: the
            student's vocabulary when the teacher's output is padded larger).
        tokenizer_sha256: :func:`tokenizer_fingerprint` of the data's tokenizer.
        dataset_fingerprint: :func:`dataset_fingerprint` of the cached datasets (training, then validation).
        num_items: dataset items (rows or packs) cached.
        num_examples: examples with at least one trained position.
        num_positions: trained positions (rows of all shards).
        max_seq_len: the data's ``max_seq_len`` (:func:`dataset_max_seq_len`).
        k: top-k entries per position.
        temperature: T of the stored log-probs and logZ.
        value_kind: ``logprobs`` or ``logits``.
        value_dtype: ``bf16`` or ``fp32``.
        bytes_per_token: bytes stored per trained position (values + ids + logZ).
        items_per_shard: dataset items per shard.
        num_shards: shards in ``shards/``.
        kdtune_version: version of the writer.
        complete: every shard and the index are written.
    """

    teacher: dict[str, Any]
    teacher_vocab_size: int
    vocab_size: int
    tokenizer_sha256: str
    dataset_fingerprint: str
    num_items: int
    num_examples: int
    num_positions: int
    max_seq_len: int | None
    k: int
    temperature: float
    value_kind: str
    value_dtype: str
    items_per_shard: int
    num_shards: int
    kdtune_version: str = ""
    bytes_per_token: int = 0
    format: str = CACHE_FORMAT
    format_version: int = FORMAT_VERSION
    complete: bool = False

    def __post_init__(self) -> None:
        if self.value_kind not in VALUE_KINDS:
            raise ConfigError(f"value_kind={self.value_kind!r} must be one of {', '.join(VALUE_KINDS)}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigError(f"value_dtype={self.value_dtype!r} must be one of {', '.join(VALUE_DTYPES)}")
        if not self.kdtune_version:
            from kdtune import __version__

            self.kdtune_version = __version__
        value_bytes = VALUE_DTYPES[self.value_dtype].itemsize
        self.bytes_per_token = self.k * (value_bytes + 4) + 4

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys) of the manifest."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> CacheManifest:
        """Read ``path`` (a ``manifest.json``), with a DataError naming it when it is not a cache manifest."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a readable teacher-logits manifest ({e}); rebuild the cache") from e
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise DataError(f"{path}: not a kdtune teacher-logits cache manifest (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{path}: cache format version {data.get('format_version')} is not {FORMAT_VERSION}, the version this "
                "kdtune reads; rebuild the cache with this kdtune"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def differences(self, other: CacheManifest, ignore: Iterable[str] = ("complete", "kdtune_version")) -> list[str]:
        """``"field: A != B"`` for every field that differs (``teacher`` compared by its combined sha256)."""
        out = []
        for f in dataclasses.fields(self):
            if f.name in ignore:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "teacher":
                a, b = a.get("sha256"), b.get("sha256")
            if a != b:
                out.append(f"{f.name}: {a!r} != {b!r}")
        return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_safetensors_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save

    _write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}))


# --------------------------------------------------------------------------------------------------------- writer
class TeacherCacheWriter:
    """Writes a cache directory shard by shard (atomically), resumable, one writer per rank.

    Args:
        root: the cache directory.
        manifest: what is being cached (``complete`` False).
        rank: this process's rank; it writes the shards ``i % world_size == rank``.
        world_size: number of writing processes.
        resume: continue a cache whose manifest matches ``manifest`` (else an existing cache is an error).
    """

    def __init__(
        self, root: str | os.PathLike[str], manifest: CacheManifest, *, rank: int = 0, world_size: int = 1, resume: bool
    ) -> None:
        self.root, self.manifest = Path(root), manifest
        self.rank, self.world_size = rank, world_size
        self.shards_dir = self.root / SHARDS_DIR
        path = self.root / MANIFEST_NAME
        if path.is_file():
            existing = CacheManifest.read(path)
            if not resume:
                raise ConfigError(
                    f"output_dir {self.root} already holds a teacher-logits cache"
                    f"{' (complete)' if existing.complete else ' (unfinished)'}; set resume_from_checkpoint=true to "
                    "continue it, or choose another output_dir"
                )
            diff = manifest.differences(existing)
            if diff:
                raise ConfigError(
                    f"resume_from_checkpoint: the cache in {self.root} was started with other settings ("
                    + "; ".join(diff)
                    + "); resume with the original config or choose another output_dir"
                )
        self.shards_dir.mkdir(parents=True, exist_ok=True)

    def write_manifest(self) -> None:
        """Write ``manifest.json`` (rank 0 only; call before any shard and again when complete)."""
        if self.rank == 0:
            _write_atomic(self.root / MANIFEST_NAME, self.manifest.to_json().encode())

    def shard_path(self, index: int) -> Path:
        """Path of shard ``index``."""
        return self.shards_dir / f"shard-{index:05d}.safetensors"

    def pending_shards(self) -> list[int]:
        """This rank's shards that are not on disk yet (stale temporary files of this rank's shards are removed)."""
        mine = range(self.rank, self.manifest.num_shards, self.world_size)
        for i in mine:
            for tmp in self.shards_dir.glob(self.shard_path(i).name + ".tmp-*"):
                tmp.unlink(missing_ok=True)
        return [i for i in mine if not self.shard_path(i).is_file()]

    def shard_items(self, index: int) -> range:
        """The dataset items of shard ``index``."""
        n = self.manifest.items_per_shard
        return range(index * n, min((index + 1) * n, self.manifest.num_items))

    def write_shard(
        self, index: int, values: Tensor, ids: Tensor, logz: Tensor, examples: Sequence[tuple[bytes, int]]
    ) -> Path:
        """Write shard ``index`` atomically.

        Args:
            values: ``[M, k]`` top-k values (stored in the manifest's value dtype).
            ids: ``[M, k]`` top-k ids.
            logz: ``[M]`` log-normalisers.
            examples: ``(key, count)`` of the shard's examples, in row order; counts sum to M.
        """
        m = values.shape[0]
        counts = torch.tensor([c for _, c in examples], dtype=torch.int64)
        if int(counts.sum()) != m or ids.shape != values.shape or logz.shape != (m,):
            raise ValueError(
                f"shard {index}: {m} value rows, ids {tuple(ids.shape)}, logz {tuple(logz.shape)}, but the examples "
                f"count {int(counts.sum())} positions"
            )
        offsets = torch.cumsum(counts, 0) - counts
        keys = torch.frombuffer(bytearray(b"".join(k for k, _ in examples)), dtype=torch.uint8).reshape(-1, _KEY_BYTES)
        path = self.shard_path(index)
        _save_safetensors_atomic(
            {
                "values": values.to(VALUE_DTYPES[self.manifest.value_dtype]).cpu(),
                "ids": ids.to(torch.int32).cpu(),
                "logz": logz.to(torch.float32).cpu(),
                "example_keys": keys,
                "example_offsets": offsets,
                "example_counts": counts,
            },
            path,
        )
        return path

    def finalize(self) -> None:
        """Rank 0, after every rank finished: merge the shards' keys into ``index.safetensors`` and mark the manifest
        complete."""
        if self.rank != 0:
            return
        from safetensors import safe_open

        missing = [i for i in range(self.manifest.num_shards) if not self.shard_path(i).is_file()]
        if missing:
            raise DataError(f"cannot finalise the cache {self.root}: shards {missing[:5]} are missing")
        keys, shard, offset, count = [], [], [], []
        for i in range(self.manifest.num_shards):
            with safe_open(str(self.shard_path(i)), framework="pt") as f:
                k = f.get_tensor("example_keys")
                keys.append(k.numpy())
                shard.append(np.full(k.shape[0], i, dtype=np.int32))
                offset.append(f.get_tensor("example_offsets").numpy())
                count.append(f.get_tensor("example_counts").numpy())
        all_keys = np.concatenate(keys) if keys else np.zeros((0, _KEY_BYTES), np.uint8)
        hi, lo = _key_halves(all_keys)
        order = np.lexsort((lo, hi))  # stable: among equal keys the first occurrence comes first
        hi, lo = hi[order], lo[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])  # duplicate examples: keep the first
        order = order[first]
        _save_safetensors_atomic(
            {
                "keys": torch.from_numpy(np.ascontiguousarray(all_keys[order])),
                "shard": torch.from_numpy(np.concatenate(shard)[order] if shard else np.zeros(0, np.int32)),
                "offset": torch.from_numpy(np.concatenate(offset)[order] if offset else np.zeros(0, np.int64)),
                "count": torch.from_numpy(np.concatenate(count)[order] if count else np.zeros(0, np.int64)),
            },
            self.root / INDEX_NAME,
        )
        self.manifest.complete = True
        self.write_manifest()


def _key_halves(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[E, 16]`` uint8 keys -> two ``[E]`` uint64 (big-endian halves, so sorting them sorts the bytes)."""
    keys = np.ascontiguousarray(keys, dtype=np.uint8).reshape(-1, _KEY_BYTES)
    both = keys.view(">u8").reshape(-1, 2).astype(np.uint64)
    return both[:, 0].copy(), both[:, 1].copy()


# ------------------------------------------------------------------------------------------------ teacher top-k
@torch.inference_mode()
def teacher_topk(
    teacher: torch.nn.Module,
    batch: dict[str, Tensor],
    *,
    k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    value_kind: str = "logprobs",
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's top-k at every trained position of a collated batch, in row-major order of
    ``labels[:, 1:] != ignore_index`` (the objective's order).

    The teacher body runs once; the output projection runs ``chunk_size`` positions at a time (fp32), so no
    ``[B, T, V]`` logits tensor exists.

    Args:
        teacher: a ``TransformerDecoder`` (``return_hidden=True`` and ``output_logits``).
        batch: ``tokens``, ``labels`` ``[B, T]`` (+ ``input_pos``, ``document_ids``) on the teacher's device.
        k: entries kept per position.
        temperature: T of the stored log-probs and logZ.
        vocab_size: normalise over the first ``vocab_size`` logits (None: all).
        value_kind: ``logprobs`` (``logits / T - logZ_T``) or ``logits`` (raw).
        chunk_size: positions per output-projection chunk.
        ignore_index: label of untrained positions.

    Returns:
        ``values [N, k]`` fp32, ``ids [N, k]`` int32, ``logz [N]`` fp32 (on CPU).
    """
    if value_kind not in VALUE_KINDS:
        raise ConfigError(f"value_kind={value_kind!r} must be one of {', '.join(VALUE_KINDS)}")
    kwargs = {key: batch[key] for key in ("input_pos", "document_ids") if key in batch}
    hidden = teacher(batch["tokens"], return_hidden=True, **kwargs)  # [B, T, D]
    mask = batch["labels"][:, 1:] != ignore_index  # [B, T-1]
    h = hidden[:, :-1][mask]  # [N, D]
    values, ids, logz = [], [], []
    for start in range(0, h.shape[0], chunk_size):
        logits = teacher.output_logits(h[start : start + chunk_size]).float()  # [n, V_t]
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        z = logits / temperature if temperature != 1.0 else logits
        lz = torch.logsumexp(z, -1)  # [n]
        top, top_ids = z.topk(k, dim=-1)  # [n, k], most likely first
        values.append((top - lz[:, None]) if value_kind == "logprobs" else logits.gather(-1, top_ids))
        ids.append(top_ids.to(torch.int32))
        logz.append(lz)
    if not values:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int32), torch.zeros(0)
    return torch.cat(values).cpu(), torch.cat(ids).cpu(), torch.cat(logz).cpu()


# --------------------------------------------------------------------------------------------------------- reader
@dataclass
class _Index:
    hi: np.ndarray
    lo: np.ndarray
    shard: np.ndarray
    offset: np.ndarray
    count: np.ndarray
    _opened: dict[int, Any] = field(default_factory=dict)


class TeacherLogitsCache:
    """Read access to a finished cache: run checks and the per-batch lookup.

    Args:
        path: the cache directory (``output_dir`` of ``cache_teacher_logits``).
        max_open_shards: shard files kept open (memory-mapped) at once.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_open_shards: int = 64) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise DataError(
                f"teacher_logits: {self.path} is not a teacher-logits cache (no {MANIFEST_NAME}); build it with "
                "`kdtune run cache_teacher_logits`"
            )
        self.manifest = CacheManifest.read(manifest_path)
        if not self.manifest.complete:
            done = len(list((self.path / SHARDS_DIR).glob("shard-*.safetensors")))
            raise DataError(
                f"teacher_logits: the cache {self.path} is unfinished ({done} of {self.manifest.num_shards} shards); "
                "rerun cache_teacher_logits with resume_from_checkpoint=true"
            )
        from safetensors import safe_open

        with safe_open(str(self.path / INDEX_NAME), framework="pt") as f:
            keys = f.get_tensor("keys").numpy()
            hi, lo = _key_halves(keys)
            self._index = _Index(
                hi, lo, f.get_tensor("shard").numpy(), f.get_tensor("offset").numpy(), f.get_tensor("count").numpy()
            )
        self.max_open_shards = max_open_shards

    @property
    def k(self) -> int:
        """Top-k entries per position."""
        return self.manifest.k

    @property
    def temperature(self) -> float:
        """Temperature of the cached log-probs."""
        return float(self.manifest.temperature)

    def __len__(self) -> int:
        return len(self._index.hi)

    # ------------------------------------------------------------------------------------------------ checks
    def check_run(
        self,
        *,
        tokenizer: Any = None,
        max_seq_len: int | None = None,
        temperature: float | None = None,
        student_vocab_size: int | None = None,
    ) -> None:
        """Refuse a cache that does not fit the run, with ONE error naming every difference.

        Args:
            tokenizer: the run's tokenizer (compared by :func:`tokenizer_fingerprint`).
            max_seq_len: the run's data ``max_seq_len`` (:func:`dataset_max_seq_len`).
            temperature: the run's KD temperature (the cache's log-probs are at one temperature).
            student_vocab_size: the student's output size; the cache must be normalised over
                ``min(student, teacher)`` vocabulary entries, as a live teacher's logits are sliced.
        """
        m, problems, fixes = self.manifest, [], []
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != m.tokenizer_sha256:
            problems.append("the tokenizer differs from the one the cache was built with")
            fixes.append("use the cache's tokenizer")
        if max_seq_len != m.max_seq_len and max_seq_len is not None:
            problems.append(f"max_seq_len is {max_seq_len} but the cache was built with {m.max_seq_len}")
            fixes.append(f"set max_seq_len={m.max_seq_len}")
        if temperature is not None and float(temperature) != float(m.temperature):
            problems.append(f"temperature is {temperature} but the cache holds the teacher at {m.temperature}")
            fixes.append(f"set temperature={m.temperature}")
        if student_vocab_size is not None:
            want = min(int(student_vocab_size), int(m.teacher_vocab_size))
            if want != m.vocab_size:
                problems.append(
                    f"the cache is normalised over {m.vocab_size} vocabulary entries but this student needs {want}"
                )
                fixes.append(f"rebuild with vocab_size={want}")
        if problems:
            raise DataError(
                f"teacher_logits: the cache {self.path} does not match this run: "
                + "; ".join(problems)
                + ". Either "
                + ", ".join(fixes)
                + ", or rebuild the cache with this run's settings (kdtune run cache_teacher_logits)"
            )

    def check_dataset(self, datasets: Sequence[Any], ignore_index: int = IGNORE_INDEX) -> None:
        """Refuse data whose examples are not all in the cache (one error: how many, the first missing item, and the
        fingerprints); data that is a reordering or subset of the cached data is accepted."""
        fp, items, _, _ = dataset_fingerprint(datasets, ignore_index)
        if fp == self.manifest.dataset_fingerprint:
            return
        missing, first = 0, None
        total = 0
        for i, item in enumerate(_iter_items(datasets)):
            for key, count in item_examples(item, ignore_index, f"dataset item {i}"):
                total += 1
                found = self._find(key)
                if found is None or int(self._index.count[found]) != count:
                    missing += 1
                    first = i if first is None else first
        if missing:
            raise DataError(
                f"teacher_logits: {missing} of {total} examples of this run's data are not in the cache {self.path} "
                f"(first: dataset item {first}); the cache was built from data with fingerprint "
                f"{self.manifest.dataset_fingerprint[:12]} ({self.manifest.num_items} items), this run's data has "
                f"{fp[:12]} ({items} items): rebuild the cache with this run's dataset settings"
            )
        log.info("teacher_logits: this run's data differs from the cached data but every example is in the cache")

    # ------------------------------------------------------------------------------------------------ lookup
    def _find(self, key: bytes) -> int | None:
        hi, lo = _key_halves(np.frombuffer(key, dtype=np.uint8))
        idx = self._index
        i = int(np.searchsorted(idx.hi, hi[0], side="left"))
        while i < len(idx.hi) and idx.hi[i] == hi[0]:
            if idx.lo[i] == lo[0]:
                return i
            i += 1
        return None

    def _shard(self, index: int) -> Any:
        opened = self._index._opened
        if index not in opened:
            from safetensors import safe_open

            if len(opened) >= self.max_open_shards:
                opened.pop(next(iter(opened)))
            f = safe_open(str(self.path / SHARDS_DIR / f"shard-{index:05d}.safetensors"), framework="pt")
            opened[index] = (f.get_slice("values"), f.get_slice("ids"), f.get_slice("logz"), f)
        return opened[index]

    def lookup(
        self, batch: dict[str, Tensor], *, device: torch.device | str | None = None, ignore_index: int = IGNORE_INDEX
    ) -> tuple[Tensor, Tensor]:
        """The teacher's top-k at the batch's trained positions, in the objective's order (row-major over
        ``labels[:, 1:] != ignore_index``).

        Args:
            batch: a collated batch (``tokens``, ``labels`` ``[B, T]``, optional ``document_ids``); any order,
                padding or packing of the cached examples.
            device: where the result goes (default: the batch's ``labels`` device).
            ignore_index: label of untrained positions.

        Returns:
            ``ids [N, k]`` int64 and ``logp [N, k]`` fp32: the teacher's log-probs at the cache temperature.

        Raises:
            DataError: an example of the batch is not in the cache.
        """
        parts_values, parts_ids, parts_logz = [], [], []
        for b, row in enumerate(batch_examples(batch, ignore_index)):
            for key, count in row:
                i = self._find(key)
                if i is None or int(self._index.count[i]) != count:
                    raise DataError(
                        f"teacher_logits: an example of batch row {b} ({count} trained tokens) is not in the cache "
                        f"{self.path}; the cache was built from other data, rebuild it with this run's dataset"
                    )
                values, ids, logz, _ = self._shard(int(self._index.shard[i]))
                start = int(self._index.offset[i])
                parts_values.append(values[start : start + count])
                parts_ids.append(ids[start : start + count])
                if self.manifest.value_kind == "logits":
                    parts_logz.append(logz[start : start + count])
        device = batch["labels"].device if device is None else device
        k = self.manifest.k
        if not parts_values:
            return torch.zeros(0, k, dtype=torch.long, device=device), torch.zeros(0, k, device=device)
        values = torch.cat(parts_values).float()
        if self.manifest.value_kind == "logits":
            t = self.temperature
            values = (values / t if t != 1.0 else values) - torch.cat(parts_logz)[:, None]
        return torch.cat(parts_ids).long().to(device), values.to(device)
