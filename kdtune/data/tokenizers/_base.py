"""The ``Tokenizer`` protocol and the shared machinery of kdtune's tokenizers.

Every concrete tokenizer only knows how to encode/decode *ordinary* text (no special tokens). This base class adds:
special/added tokens split out of the text first (as the HF tokenizers do), BOS/EOS, decoding with or without special
tokens, token character offsets (used to compute chat masks from a rendered template), chat formatting with
per-message masks (a jinja ``chat_template`` or a builtin format), and truncation to ``max_seq_len``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import accumulate
from typing import Any, Protocol, runtime_checkable

from kdtune.data.messages import Message, validate_messages
from kdtune.errors import DataError

_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))  # UTF-8 continuation bytes (10xxxxxx)


@runtime_checkable
class Tokenizer(Protocol):
    """What datasets, recipes and generation need from a tokenizer (see docs/design.md)."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Text to ids."""
        ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids to text."""
        ...

    def tokenize_messages(
        self, messages: list[Message], add_eos: bool = True, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """A conversation to ``(ids, mask)``; ``mask[i]`` True = token i is not trained on."""
        ...


def truncate(
    ids: list[int], mask: list[bool] | None, max_seq_len: int | None, eos_id: int | None = None
) -> tuple[list[int], list[bool] | None]:
    """Cut ``ids`` (and ``mask``) to at most ``max_seq_len`` tokens.

    Args:
        ids: token ids.
        mask: per-token mask (same length) or None.
        max_seq_len: the limit; None or a non-positive value means no limit.
        eos_id: if given and the sequence was cut, its last token is replaced by ``eos_id`` so a truncated example
            still ends like a finished one (torchtune's behaviour when end tokens are requested).

    Returns:
        The (possibly) shortened ``(ids, mask)``; new lists, the inputs are not modified.
    """
    if max_seq_len is None or max_seq_len <= 0 or len(ids) <= max_seq_len:
        return list(ids), None if mask is None else list(mask)
    out = list(ids[:max_seq_len])
    out_mask = None if mask is None else list(mask[:max_seq_len])
    if eos_id is not None and out:
        out[-1] = eos_id
    return out, out_mask


class BaseTokenizer:
    """Shared implementation; subclasses implement ``_encode_ordinary`` / ``_ordinary_token_bytes`` / decoding.

    Attributes:
        bos_id: beginning-of-sequence id, or None when the tokenizer has none (Qwen2, GPT-2 without one).
        eos_id: end-of-sequence id (for chat models: the end-of-turn token the model stops on).
        pad_id: padding id (never trained on).
        vocab_size: number of ids (base vocabulary + added/special tokens).
        max_seq_len: if set, ``tokenize_messages`` truncates to it.
        special_tokens: every added/special token string the text is split on, mapped to its id.
        chat_template: the jinja chat template used by ``tokenize_messages`` (None: a builtin format is used).
        chat_format: the builtin format used when there is no template.
        name_or_path: the directory this tokenizer was loaded from (for messages).
    """

    kind: str = "base"

    def __init__(
        self,
        *,
        special_tokens: dict[str, int],
        skip_ids: set[int],
        bos_id: int | None,
        eos_id: int,
        pad_id: int | None = None,
        vocab_size: int,
        max_seq_len: int | None = None,
        chat_template: str | None = None,
        chat_format: Any = None,
        template_tokens: dict[str, str | None] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        stop_ids: Sequence[int] = (),
        name_or_path: str = "",
    ) -> None:
        self.special_tokens = dict(special_tokens)
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}
        self._skip_ids = set(skip_ids)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.chat_template = chat_template
        self.chat_format = chat_format
        self.template_tokens = dict(template_tokens or {})
        self.template_kwargs = dict(template_kwargs or {})
        self.stop_ids = sorted({eos_id, *stop_ids})
        self.name_or_path = name_or_path
        self._lead_counts: dict[int, int] = {}
        if self.special_tokens:
            alternatives = sorted(self.special_tokens, key=len, reverse=True)
            self._special_re: re.Pattern[str] | None = re.compile("|".join(re.escape(s) for s in alternatives))
        else:
            self._special_re = None

    # ----------------------------------------------------------------------------------------------- subclass API
    def _encode_ordinary(self, text: str, at_start: bool) -> list[int]:
        """Ids of ``text`` that contains no special token. ``at_start``: the segment starts the whole input."""
        raise NotImplementedError

    def _encode_ordinary_with_offsets(self, text: str, at_start: bool) -> tuple[list[int], list[int]]:
        """Ids and the character offset (in ``text``) where each token starts. Default: from the tokens' bytes.

        The character index at a byte position is the number of UTF-8 lead bytes before it, and that count is a
        property of each token alone (cached per id), so no per-character scan of the text is needed.
        """
        ids = self._encode_ordinary(text, at_start)
        return ids, self._starts_from_ids(ids, 0)

    def _starts_from_ids(self, ids: list[int], shift: int) -> list[int]:
        """Character start of each token, given that the tokens' bytes are ``shift`` chars longer than the text
        at its start (a sentencepiece dummy prefix)."""
        lead = self._lead_counts
        counts = [lead.get(i) for i in ids]
        if None in counts:
            for j, i in enumerate(ids):
                if counts[j] is None:
                    counts[j] = lead[i] = len(self._ordinary_token_bytes(i).translate(None, _CONTINUATION_BYTES))
        starts = list(accumulate(counts[:-1], initial=-shift)) if ids else []
        if shift:
            starts = [x if x > 0 else 0 for x in starts]
        return starts

    def _ordinary_token_bytes(self, token_id: int) -> bytes:
        """The bytes one ordinary token stands for."""
        raise NotImplementedError

    def _decode_ordinary(self, ids: list[int]) -> str:
        """Text of a run of ordinary ids."""
        return b"".join(self._ordinary_token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------------------------------ public API
    def _split_special(self, text: str) -> list[tuple[str, bool, int]]:
        """Split text into ``(piece, is_special, char_offset)`` segments."""
        if self._special_re is None:
            return [(text, False, 0)] if text else []
        out: list[tuple[str, bool, int]] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append((text[pos : m.start()], False, pos))
            out.append((m.group(0), True, m.start()))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], False, pos))
        return out

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Encode text to ids. Special/added token strings inside ``text`` become their ids (as in HF tokenizers).

        Args:
            text: the text.
            add_bos: prepend ``bos_id`` (no-op when the tokenizer has no BOS).
            add_eos: append ``eos_id``.

        Returns:
            The ids.
        """
        ids, _ = self.encode_with_offsets(text, add_bos=add_bos, add_eos=add_eos)
        return ids

    def encode_with_offsets(
        self, text: str, add_bos: bool = False, add_eos: bool = False
    ) -> tuple[list[int], list[int]]:
        """Encode and also return, for every id, the character offset in ``text`` where the token starts.

        Returns:
            ``(ids, starts)``; BOS gets offset 0 and EOS offset ``len(text)``.
        """
        if not isinstance(text, str):
            raise DataError(
                f"tokenizer.encode expects a string, got {type(text).__name__}; convert the column to text."
            )
        ids: list[int] = []
        starts: list[int] = []
        if add_bos and self.bos_id is not None:
            ids.append(self.bos_id)
            starts.append(0)
        for piece, is_special, offset in self._split_special(text):
            if is_special:
                ids.append(self.special_tokens[piece])
                starts.append(offset)
            else:
                seg_ids, seg_starts = self._encode_ordinary_with_offsets(piece, at_start=offset == 0)
                ids.extend(seg_ids)
                starts.extend(map(offset.__add__, seg_starts) if offset else seg_starts)
        if add_eos:
            ids.append(self.eos_id)
            starts.append(len(text))
        return ids, starts

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ids to text.

        Args:
            ids: token ids (a list or a 1-D tensor's ``.tolist()``).
            skip_special_tokens: drop special tokens (BOS/EOS/chat markers) from the text.

        Returns:
            The text (invalid UTF-8 from a cut multi-byte character becomes U+FFFD).
        """
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._id_to_special:
                if skip_special_tokens and i in self._skip_ids:
                    continue  # dropped before decoding, as HF does: the bytes around it decode together
                if run:
                    parts.append(self._decode_ordinary(run))
                    run = []
                parts.append(self._id_to_special[i])
            else:
                if not 0 <= i < self.vocab_size:
                    raise DataError(
                        f"token id {i} is outside the vocabulary (size {self.vocab_size}) of {self.name_or_path!r}."
                    )
                run.append(i)
        if run:
            parts.append(self._decode_ordinary(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        """Id of a special/added token string, or None."""
        return self.special_tokens.get(token)

    def special_token_text(self, token_id: int) -> str | None:
        """The string of a special/added token id, or None."""
        return self._id_to_special.get(token_id)

    def is_special(self, token_id: int) -> bool:
        """True for ids of special/added tokens."""
        return token_id in self._id_to_special

    # ------------------------------------------------------------------------------------------------------ chat
    def tokenize_messages(
        self,
        messages: list[Message],
        add_eos: bool = True,
        add_generation_prompt: bool = False,
        truncate_to_max_seq_len: bool = True,
    ) -> tuple[list[int], list[bool]]:
        """Format a conversation with the model's chat format and tokenize it with per-token masks.

        With a jinja ``chat_template`` (from ``tokenizer_config.json``) the ids equal the model's own
        ``apply_chat_template(..., tokenize=True)``; otherwise the builtin ``chat_format`` is used.

        Args:
            messages: the conversation (``Message`` objects; their ``masked`` flags decide what is trained).
            add_eos: close the final assistant turn with its end token (the template's own, else ``eos_id``).
                False leaves a final assistant turn open (for continuing it).
            add_generation_prompt: append the assistant header after the last message (for generation).
            truncate_to_max_seq_len: cut to ``self.max_seq_len`` if that is set.

        Returns:
            ``(ids, mask)`` with ``mask[i]`` True where token i is not trained on: tokens of masked messages, every
            assistant header, and template text outside any message.
        """
        messages = validate_messages(messages)
        if self.chat_template is not None:
            from kdtune.data.tokenizers._jinja import tokenize_with_template

            ids, mask = tokenize_with_template(
                self, messages, add_eos=add_eos, add_generation_prompt=add_generation_prompt
            )
        else:
            if self.chat_format is None:
                raise DataError(
                    f"tokenizer {self.name_or_path!r} has no chat template or chat format; pass chat_template=..."
                )
            ids, mask = self.chat_format.tokenize(
                self, messages, add_eos=add_eos, add_generation_prompt=add_generation_prompt
            )
        if truncate_to_max_seq_len and self.max_seq_len:
            ids, mask_t = truncate(ids, mask, self.max_seq_len)
            mask = mask_t if mask_t is not None else []
        return ids, mask

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text (jinja template rendered, or the builtin format's text)."""
        messages = validate_messages(messages)
        if self.chat_template is not None:
            from kdtune.data.tokenizers._jinja import render_template

            return render_template(self, messages, add_generation_prompt=add_generation_prompt)
        ids, _ = self.chat_format.tokenize(self, messages, add_eos=True, add_generation_prompt=add_generation_prompt)
        return self.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        fmt = "jinja chat_template" if self.chat_template is not None else getattr(self.chat_format, "name", None)
        return (
            f"{type(self).__name__}({self.name_or_path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, chat={fmt})"
        )
