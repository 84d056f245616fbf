"""Render a model's own jinja ``chat_template`` and derive per-message masks from rendered prefixes.

The whole conversation is rendered once and tokenized once (so the ids equal HF ``apply_chat_template(...,
tokenize=True)``). Each message's character span is found by rendering prefixes of the conversation: message k spans
from the end of ``render(messages[:k], add_generation_prompt=<k is an assistant turn>)`` to the end of
``render(messages[:k + 1])``; an assistant's header (its generation prompt) therefore falls outside its span. A token
belongs to the span holding its first non-space character.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from kdtune.data.messages import Message
from kdtune.errors import DataError

if TYPE_CHECKING:
    from kdtune.data.tokenizers._base import BaseTokenizer


class TemplateError(DataError):
    """The chat template refused the conversation (its own ``raise_exception``) or failed to render."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> Any:
    """Compile a chat template in a sandboxed jinja2 environment configured like HF's."""
    try:
        from jinja2.exceptions import TemplateSyntaxError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency
        raise DataError("rendering a chat template needs jinja2: pip install 'jinja2>=3.1'.") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise DataError(
            f"chat_template does not compile (line {e.lineno}: {e.message}); fix tokenizer_config.json."
        ) from e


def render_template(
    tok: BaseTokenizer, messages: list[Message], add_generation_prompt: bool = False, **extra: Any
) -> str:
    """Render ``tok.chat_template`` for ``messages`` (dicts with role/content) like HF ``apply_chat_template``."""
    template = compile_template(tok.chat_template)
    ctx: dict[str, Any] = {
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "add_generation_prompt": add_generation_prompt,
        "tools": None,
        "documents": None,
    }
    ctx.update(tok.template_tokens)
    ctx.update(tok.template_kwargs)
    ctx.update(extra)
    try:
        return template.render(**ctx)
    except DataError:
        raise
    except Exception as e:  # jinja runtime errors (undefined attributes, type errors) inside the template
        raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    # fast path: whole prefix equal
    if b.startswith(a[:n]):
        return n
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _locate_turn(tok: BaseTokenizer, full: str, content: str, start: int) -> int | None:
    """End of a message found by its content: the content (as is, or stripped) at or after ``start``, plus an
    end-of-turn special token that follows it after nothing but spaces. None if the content is not there."""
    for c in (content, content.strip()):
        if not c:
            continue
        pos = full.find(c, start)
        if pos < 0:
            continue
        end = pos + len(c)
        m = tok._special_re.search(full, end) if tok._special_re is not None else None
        if m is not None and not full[end : m.start()].strip(" "):
            end = m.end()
        return end
    return None


def message_spans(
    tok: BaseTokenizer, messages: list[Message], full: str, add_generation_prompt: bool
) -> list[tuple[int, int]]:
    """Character span ``[start, end)`` of each message inside the fully rendered conversation ``full``.

    When a prefix of the conversation renders differently from the same messages inside the whole conversation (Qwen3
    drops the ``<think>`` block of earlier turns), the message's end is found from its content instead.
    """
    spans: list[tuple[int, int]] = []
    prev_end = 0
    for k, m in enumerate(messages):
        start = prev_end
        if m.role == "assistant" and k > 0:
            try:
                prompt = render_template(tok, messages[:k], add_generation_prompt=True)
                start = max(prev_end, _common_prefix_len(prompt, full))
            except DataError:
                start = prev_end
        if k == len(messages) - 1:
            end = len(full)
        else:
            try:
                rendered = render_template(tok, messages[: k + 1], add_generation_prompt=False)
                end = _common_prefix_len(rendered, full)
                consistent = end == len(rendered)
            except DataError:
                end, consistent = start, False
            if not consistent:
                located = _locate_turn(tok, full, m.content, start)
                if located is not None:
                    end = located
        end = max(end, start)
        raw_end = end
        if m.role == "assistant":
            # trailing whitespace after the end-of-turn token belongs to nobody (masked)
            end = start + len(full[start:end].rstrip())
        spans.append((start, end))
        prev_end = max(prev_end, raw_end)
    return spans


def _anchor(text: str, start: int, end: int) -> int:
    """Position of a token's first non-whitespace character (its start if it is all whitespace)."""
    for i in range(start, end):
        if not text[i].isspace():
            return i
    return start


def token_ranges(text: str, starts: list[int], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each character span, the contiguous range ``[lo, hi)`` of tokens whose anchor (first non-space character)
    lies in it. ``starts`` are the tokens' character starts (non-decreasing)."""
    n_tok = len(starts)
    n = len(text)

    def anchor(j: int) -> int:
        s = starts[j]
        e = starts[j + 1] if j + 1 < n_tok else n
        return _anchor(text, s, e) if s < n and text[s].isspace() else s

    out: list[tuple[int, int]] = []
    for a, b in spans:
        if b <= a:
            out.append((0, 0))
            continue
        lo = bisect_left(starts, a)
        hi = bisect_left(starts, b)
        if lo > 0 and a <= anchor(lo - 1) < b:  # a token starting before the span whose text begins inside it
            lo -= 1
        if hi > lo and anchor(hi - 1) >= b:  # the last token starts inside but its text begins after the span
            hi -= 1
        out.append((lo, hi))
    return out


def tokenize_with_template(
    tok: BaseTokenizer, messages: list[Message], add_eos: bool = True, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Tokenize a conversation through the jinja chat template; see the module docstring for the masking rule."""
    full = render_template(tok, messages, add_generation_prompt=add_generation_prompt)
    ids, starts = tok.encode_with_offsets(full, add_bos=False, add_eos=False)
    spans = message_spans(tok, messages, full, add_generation_prompt)
    ranges = token_ranges(full, starts, spans)
    mask = [True] * len(ids)
    for (lo, hi), m in zip(ranges, messages):
        if m.masked is False and hi > lo:
            mask[lo:hi] = [False] * (hi - lo)
    last = len(messages) - 1
    if messages[-1].role == "assistant" and not add_generation_prompt:
        mine = range(*ranges[last])
        if add_eos:
            if set(ids[mine.start : mine.stop]).isdisjoint(tok.special_tokens.values()):
                ids.append(tok.eos_id)
                mask.append(messages[-1].masked)
        else:
            # leave the final assistant turn open: drop its trailing end-of-turn tokens and everything after them
            cut = len(ids)
            for i in reversed(mine):
                if tok.is_special(ids[i]) or not tok.decode([ids[i]], skip_special_tokens=False).strip():
                    cut = i
                else:
                    break
            ids, mask = ids[:cut], mask[:cut]
    return ids, mask
