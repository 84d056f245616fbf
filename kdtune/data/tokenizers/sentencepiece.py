"""SentencePiece tokenizer (``tokenizer.model``): Llama 2, TinyLlama, Mistral, CodeLlama and friends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sentencepiece as spm

from kdtune.data.tokenizers._base import BaseTokenizer
from kdtune.errors import DataError


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _write_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _proto_fields(buf: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """Split a protobuf message into ``(field, wire_type, raw_field_bytes, payload)``."""
    fields, pos = [], 0
    while pos < len(buf):
        start = pos
        tag, pos = _read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            payload = b""
        elif wire == 1:
            pos += 8
            payload = b""
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            payload = buf[pos : pos + n]
            pos += n
        elif wire == 5:
            pos += 4
            payload = b""
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((field, wire, buf[start:pos], payload))
    return fields


def model_proto_without_dummy_prefix(model: bytes) -> bytes:
    """The serialized sentencepiece ``ModelProto`` with ``normalizer_spec.add_dummy_prefix = false``.

    Done on the wire format (ModelProto field 3 = NormalizerSpec, its field 3 = add_dummy_prefix) so no protobuf
    package is needed.
    """
    out = bytearray()
    for field, wire, raw, payload in _proto_fields(model):
        if field == 3 and wire == 2:
            spec = bytearray()
            for f2, w2, raw2, _ in _proto_fields(payload):
                if not (f2 == 3 and w2 == 0):
                    spec += raw2
            spec += _write_varint((3 << 3) | 0) + _write_varint(0)
            out += _write_varint((3 << 3) | 2) + _write_varint(len(spec)) + bytes(spec)
        else:
            out += raw
    return bytes(out)


class SentencePieceTokenizer(BaseTokenizer):
    """A sentencepiece model with HF-style special-token handling.

    Special/added token strings in the text (``<s>``, ``</s>``, chat markers) are split out first. The model's dummy
    prefix (a leading ``▁``) is added only to the segment at the very start of the input when ``legacy=False``
    (HF's current Llama behaviour), and to every segment when ``legacy=True`` (HF's legacy behaviour).

    Args:
        path: the ``tokenizer.model`` file.
        added_tokens: extra added/special tokens (content -> id), e.g. from ``tokenizer_config.json``.
        legacy: see above.
        **kwargs: :class:`BaseTokenizer` options; ids default to the model's own bos/eos/pad/unk.
    """

    kind = "sentencepiece"

    def __init__(
        self,
        path: str | Path,
        added_tokens: dict[str, int] | None = None,
        legacy: bool = False,
        skip_ids: set[int] | None = None,
        **kwargs: Any,
    ) -> None:
        path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(
                f"{path}: not a sentencepiece model ({e}). A Llama 3 tiktoken rank file belongs at original/tokenizer.model."
            ) from e
        self.legacy = legacy
        sp = self.sp
        specials: dict[str, int] = {}
        for i in (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()):
            if i >= 0:
                specials[sp.id_to_piece(i)] = i
        specials.update(added_tokens or {})
        try:
            self._sp_inner = spm.SentencePieceProcessor(model_proto=model_proto_without_dummy_prefix(path.read_bytes()))
        except (ValueError, IndexError, RuntimeError) as e:
            raise DataError(f"{path}: cannot read the sentencepiece model's normalizer settings ({e}).") from e
        self._sp_size = sp.get_piece_size()
        self._adds_dummy_prefix = sp.id_to_piece(sp.encode("a")[0]).startswith("\u2581")
        kwargs.setdefault("bos_id", sp.bos_id() if sp.bos_id() >= 0 else None)
        eos = sp.eos_id()
        kwargs.setdefault("eos_id", eos)
        kwargs.setdefault("pad_id", sp.pad_id() if sp.pad_id() >= 0 else None)
        kwargs.setdefault("vocab_size", max([self._sp_size - 1, *specials.values()]) + 1)
        skip = (
            set(skip_ids)
            if skip_ids is not None
            else {i for i in (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) if i >= 0}
        )
        super().__init__(special_tokens=specials, skip_ids=skip, name_or_path=str(path), **kwargs)

    def _encode_ordinary(self, text: str, at_start: bool) -> list[int]:
        # The dummy prefix only at the very start of the input (HF legacy=False), or on every segment (legacy=True).
        sp = self.sp if (at_start or self.legacy) else self._sp_inner
        return sp.encode(text)

    def _encode_ordinary_with_offsets(self, text: str, at_start: bool) -> tuple[list[int], list[int]]:
        ids = self._encode_ordinary(text, at_start)
        # the pieces spell " " + text when the dummy prefix was added (identity normalization, as Llama models use)
        shift = 1 if (at_start or self.legacy) and self._adds_dummy_prefix and text else 0
        return ids, self._starts_from_ids(ids, shift)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Decode ids to text (byte-fallback pieces joined into characters; the dummy-prefix space removed)."""
        ids = [int(i) for i in ids]
        text = super().decode(ids, skip_special_tokens=skip_special_tokens)
        first = next((i for i in ids if not (skip_special_tokens and i in self._skip_ids)), None)
        if first is not None and not self.is_special(first) and text.startswith(" "):
            text = text[1:]
        return text

    def _ordinary_token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self._sp_size:
            raise DataError(f"token id {token_id} is not in the vocabulary of {self.name_or_path!r}.")
        if self.sp.is_byte(token_id):
            return bytes([int(self.sp.id_to_piece(token_id)[3:5], 16)])
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return b""
        return self.sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8")
