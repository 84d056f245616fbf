"""Byte-level BPE (GPT-2, Qwen2/2.5/3, Llama 3's ``tokenizer.json``), implemented from the file formats.

Text goes through: added/special tokens split out (base class) -> normalizer (NFC for Qwen) -> regex
pre-tokenization -> every byte mapped to a printable unicode character (the GPT-2 byte<->unicode table) -> merges
applied lowest rank first inside each pre-token -> vocabulary ids.
"""

from __future__ import annotations

import heapq
import json
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import regex

from kdtune.data.tokenizers._base import BaseTokenizer
from kdtune.errors import DataError

_HEAP_MIN_LEN = 48  # pre-tokens longer than this use the O(n log n) merge loop

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable unicode character table used by every byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


class _Normalizer:
    """A picklable chain of unicode normalisation steps (``NFC``/``NFD``/``NFKC``/``NFKD``/``Lowercase``)."""

    def __init__(self, steps: list[str]) -> None:
        self.steps = steps

    def __call__(self, text: str) -> str:
        for step in self.steps:
            text = text.lower() if step == "Lowercase" else unicodedata.normalize(step, text)
        return text


def _normalizer_steps(spec: dict[str, Any] | None, where: str) -> list[str]:
    if not spec:
        return []
    kind = spec.get("type")
    if kind in ("NFC", "NFD", "NFKC", "NFKD", "Lowercase"):
        return [kind]
    if kind == "Sequence":
        return [step for n in spec.get("normalizers", []) for step in _normalizer_steps(n, where)]
    raise DataError(
        f"{where}: normalizer type {kind!r} is not supported for byte-level BPE (supported: NFC/NFD/NFKC/NFKD, "
        "Lowercase, Sequence); please report this tokenizer."
    )


def _make_normalizer(spec: dict[str, Any] | None, where: str) -> Callable[[str], str] | None:
    steps = _normalizer_steps(spec, where)
    return _Normalizer(steps) if steps else None


class _PreTokenizer:
    """Regex splitting + byte-level mapping, built from a ``tokenizer.json`` ``pre_tokenizer`` node."""

    def __init__(self, spec: dict[str, Any] | None, where: str) -> None:
        self.steps: list[tuple[str, Any]] = []
        self.byte_level = False
        self.add_prefix_space = False
        self._add(spec, where)
        if not self.byte_level:
            raise DataError(
                f"{where}: pre_tokenizer has no ByteLevel step, so this is not a byte-level BPE tokenizer "
                "(sentencepiece-style tokenizer.json needs tokenizer.model next to it)."
            )

    def _add(self, spec: dict[str, Any] | None, where: str) -> None:
        if not spec:
            return
        kind = spec.get("type")
        if kind == "Sequence":
            for s in spec.get("pretokenizers", []):
                self._add(s, where)
        elif kind == "Split":
            pat = spec.get("pattern", {})
            if "Regex" in pat:
                rx = regex.compile(pat["Regex"])
            else:
                rx = regex.compile(regex.escape(pat.get("String", "")))
            behavior = spec.get("behavior", "Isolated")
            if behavior not in ("Isolated", "Removed") or spec.get("invert", False):
                raise DataError(f"{where}: Split behavior {behavior!r} (invert={spec.get('invert')}) is not supported.")
            self.steps.append((behavior, rx))
        elif kind == "ByteLevel":
            self.byte_level = True
            self.add_prefix_space = bool(spec.get("add_prefix_space", False))
            if spec.get("use_regex", True):
                self.steps.append(("Isolated", regex.compile(GPT2_PATTERN)))
        elif kind == "Digits":
            self.steps.append(("Isolated", regex.compile(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+")))
        else:
            raise DataError(f"{where}: pre_tokenizer type {kind!r} is not supported for byte-level BPE.")

    def split(self, text: str) -> list[tuple[str, int]]:
        """Pieces of ``text`` with their character offsets."""
        pieces = [(text, 0)]
        for behavior, rx in self.steps:
            out: list[tuple[str, int]] = []
            for piece, off in pieces:
                pos = 0
                for m in rx.finditer(piece):
                    if m.start() > pos:
                        out.append((piece[pos : m.start()], off + pos))
                    if behavior == "Isolated" and m.end() > m.start():
                        out.append((m.group(0), off + m.start()))
                    pos = m.end()
                if pos < len(piece):
                    out.append((piece[pos:], off + pos))
            pieces = out
        return pieces


class ByteLevelBPETokenizer(BaseTokenizer):
    """Byte-level BPE with merges by rank; reads ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``.

    Construct with :meth:`from_tokenizer_json` or :meth:`from_vocab_merges`; normally through
    ``kdtune.data.load_hf_tokenizer``.
    """

    kind = "bpe"

    def __init__(
        self,
        *,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pre_tokenizer: _PreTokenizer,
        normalizer: Callable[[str], str] | None = None,
        ignore_merges: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab = vocab
        self._id_to_token = {i: t for t, i in vocab.items()}
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.pre_tokenizer = pre_tokenizer
        self.normalizer = normalizer
        self.ignore_merges = ignore_merges
        self._b2u = bytes_to_unicode()
        self._u2b = unicode_to_bytes()
        self._cache: dict[str, list[int]] = {}
        self._piece_cache: dict[str, list[int]] = {}
        super().__init__(**kwargs)

    # ------------------------------------------------------------------------------------------------- loading
    @staticmethod
    def read_tokenizer_json(path: Path) -> dict[str, Any]:
        """Parse a ``tokenizer.json`` with a clear error."""
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read tokenizer.json ({e}); re-download the tokenizer files.") from e

    @classmethod
    def parse_tokenizer_json(
        cls, data: dict[str, Any], where: str
    ) -> tuple[dict[str, int], list[tuple[str, str]], _PreTokenizer, Callable[[str], str] | None, bool]:
        """Vocab, merges, pre-tokenizer, normalizer and ``ignore_merges`` of a byte-level BPE ``tokenizer.json``."""
        model = data.get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise DataError(f"{where}: model type {model.get('type')!r} is not BPE; kdtune reads byte-level BPE here.")
        vocab = model.get("vocab") or {}
        merges: list[tuple[str, str]] = []
        for m in model.get("merges") or []:
            if isinstance(m, str):
                a, _, b = m.partition(" ")
            else:
                a, b = m
            merges.append((a, b))
        pre = _PreTokenizer(data.get("pre_tokenizer"), where)
        norm = _make_normalizer(data.get("normalizer"), where)
        return vocab, merges, pre, norm, bool(model.get("ignore_merges", False))

    @staticmethod
    def read_vocab_merges(vocab_path: Path, merges_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """Read ``vocab.json`` and ``merges.txt`` (the ``#version`` header line is skipped)."""
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            lines = merges_path.read_text(encoding="utf-8").split("\n")
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{vocab_path.parent}: cannot read vocab.json/merges.txt ({e}).") from e
        merges = []
        for n, line in enumerate(lines):
            if not line or (n == 0 and line.startswith("#version")):
                continue
            a, sep, b = line.partition(" ")
            if not sep:
                raise DataError(f"{merges_path}:{n + 1}: malformed merge line {line!r} (expected 'left right').")
            merges.append((a, b))
        return vocab, merges

    # ------------------------------------------------------------------------------------------------ encoding
    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-token (already mapped to byte-unicode characters)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if self.ignore_merges and word in self.vocab:
            out = [self.vocab[word]]
        elif len(word) > _HEAP_MIN_LEN:
            out = [self.vocab[p] for p in self._bpe_heap(word) if p in self.vocab]
        else:
            parts = list(word)
            ranks = self.ranks
            while len(parts) > 1:
                best, best_i = None, -1
                for i in range(len(parts) - 1):
                    r = ranks.get((parts[i], parts[i + 1]))
                    if r is not None and (best is None or r < best):
                        best, best_i = r, i
                if best is None:
                    break
                a, b = parts[best_i], parts[best_i + 1]
                merged: list[str] = []
                i = 0
                while i < len(parts):
                    if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                        merged.append(a + b)
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            # a symbol missing from the vocab (only possible with an incomplete byte alphabet) is dropped, like HF
            out = [self.vocab[p] for p in parts if p in self.vocab]
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[word] = out
        return out

    def _bpe_heap(self, word: str) -> list[str]:
        """BPE for long pre-tokens in O(n log n): a heap of candidate pairs ordered by (rank, position), symbols in
        a linked list, stale heap entries skipped by version numbers (the same merge order as the simple loop)."""
        ranks = self.ranks
        sym = list(word)
        n = len(sym)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        ver = [0] * n
        heap: list[tuple[int, int, int, int, int]] = []
        for i in range(n - 1):
            r = ranks.get((sym[i], sym[i + 1]))
            if r is not None:
                heap.append((r, i, i + 1, 0, 0))
        heapq.heapify(heap)
        while heap:
            _, i, j, vi, vj = heapq.heappop(heap)
            if ver[i] != vi or ver[j] != vj or nxt[i] != j or not sym[i] or not sym[j]:
                continue
            sym[i] = sym[i] + sym[j]
            sym[j] = ""
            ver[i] += 1
            ver[j] += 1
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
            h = prv[i]
            if h >= 0:
                r = ranks.get((sym[h], sym[i]))
                if r is not None:
                    heapq.heappush(heap, (r, h, i, ver[h], ver[i]))
            if k < n:
                r = ranks.get((sym[i], sym[k]))
                if r is not None:
                    heapq.heappush(heap, (r, i, k, ver[i], ver[k]))
        return [x for x in sym if x]

    def _prepare(self, text: str, at_start: bool) -> str:
        if self.normalizer is not None:
            text = self.normalizer(text)
        if self.pre_tokenizer.add_prefix_space and at_start and not text.startswith(" "):
            text = " " + text
        return text

    def _encode_ordinary(self, text: str, at_start: bool) -> list[int]:
        text = self._prepare(text, at_start)
        b2u = self._b2u
        cache = self._piece_cache
        ids: list[int] = []
        for piece, _ in self.pre_tokenizer.split(text):
            out = cache.get(piece)
            if out is None:
                out = self._bpe("".join([b2u[b] for b in piece.encode("utf-8")]))
                if len(cache) > 200_000:
                    cache.clear()
                cache[piece] = out
            ids.extend(out)
        return ids

    def _encode_ordinary_with_offsets(self, text: str, at_start: bool) -> tuple[list[int], list[int]]:
        prepared = self._prepare(text, at_start)
        if prepared != text:  # normalisation changed the text: offsets are only known per whole segment
            ids = self._encode_ordinary(text, at_start)
            return ids, [0] * len(ids)
        return super()._encode_ordinary_with_offsets(text, at_start)

    def _ordinary_token_bytes(self, token_id: int) -> bytes:
        tok = self._id_to_token.get(token_id)
        if tok is None:
            raise DataError(f"token id {token_id} is not in the vocabulary of {self.name_or_path!r}.")
        u2b = self._u2b
        return bytes(u2b[c] for c in tok if c in u2b)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string (byte-unicode form) or special token of an id."""
        return self._id_to_special.get(token_id, self._id_to_token.get(token_id))
