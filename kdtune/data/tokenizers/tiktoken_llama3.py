"""Llama 3 tokenizer: the tiktoken BPE rank file (``original/tokenizer.model``) with Llama 3's 256 special tokens."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import tiktoken

from kdtune.data.tokenizers._base import BaseTokenizer
from kdtune.data.tokenizers.bpe import LLAMA3_PATTERN
from kdtune.errors import DataError

NUM_RESERVED_SPECIAL_TOKENS = 256
# Llama 3.1+ names; Llama 3.0 called ids +4, +5, +8, +10 reserved_special_token_2..5 (the ids that matter are equal).
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """The 256 Llama 3 special tokens, numbered right after the base vocabulary."""
    names = list(LLAMA3_NAMED_SPECIALS) + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIALS))
    ]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken rank file: one ``<base64 token bytes> <rank>`` per line."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the tiktoken rank file ({e}).") from e
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except ValueError as e:
            raise DataError(
                f"{path}:{n + 1}: not a tiktoken rank line ({line[:40]!r}); expected '<base64> <rank>'. "
                "Is this a sentencepiece model? Then it belongs at <dir>/tokenizer.model, not original/."
            ) from e
    if not ranks:
        raise DataError(f"{path}: empty tiktoken rank file.")
    return ranks


class TikTokenLlama3Tokenizer(BaseTokenizer):
    """Llama 3 / 3.1 / 3.2 / 3.3 tokenizer on tiktoken's BPE engine.

    Args:
        path: the rank file (``original/tokenizer.model``).
        special_tokens: override the special-token table (e.g. read from ``tokenizer_config.json``); default: the
            standard 256 Llama 3 specials after the base vocabulary.
        ranks: the already-read rank table (default: read ``path``).
        **kwargs: :class:`BaseTokenizer` options (ids default to Llama 3's: bos ``<|begin_of_text|>``,
            eos ``<|eot_id|>`` for chat, pad ``<|finetune_right_pad_id|>``).
    """

    kind = "tiktoken"

    def __init__(
        self,
        path: str | Path,
        special_tokens: dict[str, int] | None = None,
        ranks: dict[bytes, int] | None = None,
        **kwargs: Any,
    ) -> None:
        path = Path(path)
        ranks = ranks if ranks is not None else read_tiktoken_ranks(path)
        self.num_base_tokens = max(ranks.values()) + 1
        specials = special_tokens or llama3_special_tokens(self.num_base_tokens)
        self._enc = tiktoken.Encoding(
            name=f"kdtune_llama3_{path.parent.parent.name}",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={},
        )
        kwargs.setdefault("bos_id", specials.get("<|begin_of_text|>"))
        kwargs.setdefault("eos_id", specials.get("<|eot_id|>", specials.get("<|end_of_text|>")))
        kwargs.setdefault("pad_id", specials.get("<|finetune_right_pad_id|>"))
        kwargs.setdefault("vocab_size", max([self.num_base_tokens - 1, *specials.values()]) + 1)
        kwargs.setdefault("skip_ids", set(specials.values()))
        kwargs.setdefault(
            "stop_ids", [specials[s] for s in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>") if s in specials]
        )
        super().__init__(special_tokens=specials, name_or_path=str(path), **kwargs)

    def _encode_ordinary(self, text: str, at_start: bool) -> list[int]:
        return self._enc.encode_ordinary(text)

    def _ordinary_token_bytes(self, token_id: int) -> bytes:
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except KeyError as e:
            raise DataError(f"token id {token_id} is not in the vocabulary of {self.name_or_path!r}.") from e

    def _decode_ordinary(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")
