"""Fixtures for dataset tests: a hand-checkable character-level tokenizer and small data files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

PAD, BOS, EOS, EOT = 0, 1, 2, 8
HEADERS = {"system": 3, "user": 4, "assistant": 5, "ipython": 6, "tool": 7}
UNK = 9
OFFSET = 16


class CharTokenizer:
    """Character-level tokenizer implementing kdtune's Tokenizer protocol.

    Chat format: ``BOS`` then, per message, ``<role header> chars... EOT``, then ``EOS`` (masked like the last
    message). Every token of a message carries that message's ``masked``; BOS is masked.
    Character c maps to ``ord(c) + 16`` (ASCII), anything else to UNK, so ids are easy to write by hand.
    """

    bos_id, eos_id, pad_id, vocab_size = BOS, EOS, PAD, 512

    def __init__(self, max_seq_len: int | None = None) -> None:
        self.max_seq_len = max_seq_len

    def _chars(self, text: str) -> list[int]:
        return [ord(c) + OFFSET if ord(c) + OFFSET < self.vocab_size else UNK for c in text]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return [BOS] * add_bos + self._chars(text) + [EOS] * add_eos

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - OFFSET) for i in ids if i >= OFFSET)

    def tokenize_messages(
        self, messages: list[Any], add_eos: bool = True, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        ids, mask = [BOS], [True]
        for m in messages:
            seg = [HEADERS[m.role], *self._chars(m.content), EOT]
            ids += seg
            mask += [m.masked] * len(seg)
        if add_eos:
            ids.append(EOS)
            mask.append(messages[-1].masked)
        return ids, mask


def c(text: str) -> list[int]:
    """Character ids of ``text`` (as CharTokenizer encodes them)."""
    return [ord(ch) + OFFSET for ch in text]


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer(max_seq_len=None)


@pytest.fixture
def chars():
    return c


@pytest.fixture
def write_jsonl(tmp_path: Path):
    def write(rows: list[dict[str, Any]], name: str = "data.jsonl") -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    """A private `datasets` cache so tests never share or leave cache files."""
    return str(tmp_path / "hf_cache")
