"""Builtin chat formats, used when a tokenizer directory has no jinja ``chat_template`` (or when asked by name).

Each format turns a conversation into pieces: text or raw ids, each owned by a message or by nobody. Consecutive text
pieces are tokenized as one string (special-token strings inside become their ids), exactly as a rendered template
would be. A token is trained on only if its owner is a message
with ``masked=False``; headers of assistant turns (the generation prompt) are owned by nobody, so never trained.

Formats (``chat_template=`` name): ``llama3``, ``llama2``, ``mistral``, ``chatml``, ``qwen2``, ``qwen2_5``,
``zephyr`` (TinyLlama-chat), ``plain`` (content + EOS per message: GPT-2 / DialoGPT).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdtune.data.messages import Message
from kdtune.errors import DataError

if TYPE_CHECKING:
    from kdtune.data.tokenizers._base import BaseTokenizer

Piece = tuple[str | list[int], int | None]  # (text or ids, owning message index or None)


class ChatFormat:
    """Base class: subclasses implement :meth:`pieces`."""

    name: str = ""
    #: special tokens the format needs in the vocabulary
    required_tokens: tuple[str, ...] = ()

    def pieces(
        self, tok: BaseTokenizer, messages: list[Message], add_eos: bool, add_generation_prompt: bool
    ) -> list[Piece]:
        """The conversation as pieces; see the module docstring."""
        raise NotImplementedError

    def check(self, tok: BaseTokenizer) -> None:
        """Raise if the tokenizer lacks a special token the format needs."""
        missing = [t for t in self.required_tokens if tok.token_to_id(t) is None]
        if missing:
            raise DataError(
                f"chat format {self.name!r} needs special token(s) {missing} that tokenizer {tok.name_or_path!r} does "
                "not have; pick another chat_template (e.g. 'plain') or use the model's own template."
            )

    def tokenize(
        self, tok: BaseTokenizer, messages: list[Message], add_eos: bool = True, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Format and tokenize: ``(ids, mask)``.

        Consecutive text pieces are joined and tokenized as ONE string (as a template would be), and each token goes
        to the piece holding its first non-space character; an id piece (possibly empty) ends a run of text.
        """
        self.check(tok)
        ids: list[int] = []
        mask: list[bool] = []

        def owner_masked(owner: int | None) -> bool:
            return True if owner is None else messages[owner].masked

        run: list[tuple[str, int | None]] = []

        def flush() -> None:
            if not run:
                return
            text = "".join(t for t, _ in run)
            bounds, pos = [], 0
            for t, owner in run:
                bounds.append((pos + len(t), owner))
                pos += len(t)
            run_ids, starts = tok.encode_with_offsets(text, add_bos=False, add_eos=False)
            ends = starts[1:] + [len(text)]
            for i, s, e in zip(run_ids, starts, ends):
                a = next((j for j in range(s, max(s, e)) if not text[j].isspace()), s)
                owner = next((o for b, o in bounds if a < b), bounds[-1][1])
                ids.append(i)
                mask.append(owner_masked(owner))
            run.clear()

        for value, owner in self.pieces(tok, messages, add_eos, add_generation_prompt):
            if isinstance(value, list):
                flush()
                ids.extend(value)
                mask.extend([owner_masked(owner)] * len(value))
            elif value:
                run.append((value, owner))
        flush()
        return ids, mask


def _close_last(messages: list[Message], k: int, add_eos: bool) -> bool:
    """Whether message k gets its end token: always, except a final assistant turn with add_eos=False."""
    return add_eos or k != len(messages) - 1 or messages[k].role != "assistant"


class Llama3Format(ChatFormat):
    """``<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` (content trimmed)."""

    name = "llama3"
    required_tokens = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def pieces(self, tok, messages, add_eos, add_generation_prompt):  # noqa: D102
        out: list[Piece] = []
        if tok.bos_id is not None:
            out.append(([tok.bos_id], 0))
        for k, m in enumerate(messages):
            role = "ipython" if m.role == "tool" else m.role  # Llama 3.1 puts tool results under "ipython"
            header = f"<|start_header_id|>{role}<|end_header_id|>\n\n"
            out.append((header, None if m.role == "assistant" else k))
            out.append((m.content.strip(), k))
            if _close_last(messages, k, add_eos):
                out.append(("<|eot_id|>", k))
        if add_generation_prompt:
            out.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", None))
        return out


class Llama2Format(ChatFormat):
    """Meta's reference Llama 2 chat format: ``<s>[INST] <<SYS>>\\nsys\\n<</SYS>>\\n\\nuser [/INST] answer </s>``.

    Like Meta's code, the instruction and the answer are encoded as separate pieces.
    """

    name = "llama2"
    inst = ("[INST]", "[/INST]")
    system_wrap = ("<<SYS>>\n", "\n<</SYS>>\n\n")

    def pieces(self, tok, messages, add_eos, add_generation_prompt):  # noqa: D102
        out: list[Piece] = []
        system = ""
        start = 0
        if messages[0].role == "system":
            system = self.system_wrap[0] + messages[0].content.strip() + self.system_wrap[1]
            start = 1
        first_user = True
        for k in range(start, len(messages)):
            m = messages[k]
            if m.role == "assistant":
                out.append(([], None))  # Meta encodes the answer on its own
                out.append((m.content.strip(), k))
                if _close_last(messages, k, add_eos):
                    out.append(([tok.eos_id], k))
            else:
                content = m.content.strip()
                if first_user and system:
                    content = system + content
                first_user = False
                bos = [tok.bos_id] if tok.bos_id is not None else []
                out.append((bos, k))
                out.append((f"{self.inst[0]} {content} {self.inst[1]}", k))
        return out


class MistralFormat(ChatFormat):
    """Mistral instruct (v0.1/v0.2 template): ``<s>[INST] user [/INST]answer</s>[INST] user2 [/INST]``.

    One BOS at the start; the whole conversation is tokenized as one text, like the template. Mistral has no system
    role: a system message is prepended to the first user turn followed by a blank line.
    """

    name = "mistral"

    def pieces(self, tok, messages, add_eos, add_generation_prompt):  # noqa: D102
        out: list[Piece] = []
        if tok.bos_id is not None:
            out.append(([tok.bos_id], 0))
        system = ""
        start = 0
        if messages[0].role == "system":
            system, start = messages[0].content + "\n\n", 1
        eos = tok.special_token_text(tok.eos_id) or ""
        for k in range(start, len(messages)):
            m = messages[k]
            if m.role == "assistant":
                out.append((m.content + (eos if _close_last(messages, k, add_eos) else ""), k))
            else:
                content = (system + m.content) if system and k == start else m.content
                out.append((f"[INST] {content} [/INST]", k))
        return out


class ChatMLFormat(ChatFormat):
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` (Qwen2/2.5/3 and other ChatML models)."""

    name = "chatml"
    required_tokens = ("<|im_start|>", "<|im_end|>")
    default_system: str | None = None

    def pieces(self, tok, messages, add_eos, add_generation_prompt):  # noqa: D102
        out: list[Piece] = []
        if self.default_system is not None and messages[0].role != "system":
            out.append((f"<|im_start|>system\n{self.default_system}<|im_end|>\n", None))
        for k, m in enumerate(messages):
            out.append((f"<|im_start|>{m.role}\n", None if m.role == "assistant" else k))
            out.append((m.content, k))
            if _close_last(messages, k, add_eos):
                out.append(("<|im_end|>", k))
                out.append(("\n", None if m.role == "assistant" else k))
        if add_generation_prompt:
            out.append(("<|im_start|>assistant\n", None))
        return out


class Qwen2Format(ChatMLFormat):
    """Qwen2-Instruct: ChatML with the default system prompt ``You are a helpful assistant.``."""

    name = "qwen2"
    default_system = "You are a helpful assistant."


class Qwen2_5Format(ChatMLFormat):
    """Qwen2.5-Instruct: ChatML with Qwen2.5's default system prompt."""

    name = "qwen2_5"
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class ZephyrFormat(ChatFormat):
    """Zephyr / TinyLlama-chat: ``<|role|>\\ncontent</s>\\n``; the role markers are plain text."""

    name = "zephyr"

    def pieces(self, tok, messages, add_eos, add_generation_prompt):  # noqa: D102
        eos = tok.special_token_text(tok.eos_id) or ""
        out: list[Piece] = []
        for k, m in enumerate(messages):
            text = f"<|{m.role}|>\n"
            if m.role == "assistant":
                out.append((text, None))
                text = ""
            text += m.content
            if _close_last(messages, k, add_eos):
                text += eos
            out.append((text, k))
            out.append(("\n", None if m.role == "assistant" else k))
        if add_generation_prompt:
            out.append(("<|assistant|>\n", None))
        return out


class PlainFormat(ChatFormat):
    """Each message's content followed by EOS (GPT-2 / DialoGPT style)."""

    name = "plain"

    def pieces(self, tok, messages, add_eos, add_generation_prompt):  # noqa: D102
        out: list[Piece] = []
        for k, m in enumerate(messages):
            out.append((m.content, k))
            if _close_last(messages, k, add_eos):
                out.append(([tok.eos_id], k))
        return out


CHAT_FORMATS: dict[str, type[ChatFormat]] = {
    cls.name: cls
    for cls in (
        Llama3Format,
        Llama2Format,
        MistralFormat,
        ChatMLFormat,
        Qwen2Format,
        Qwen2_5Format,
        ZephyrFormat,
        PlainFormat,
    )
}
CHAT_FORMATS["gpt2"] = PlainFormat
CHAT_FORMATS["tinyllama"] = ZephyrFormat


def get_chat_format(name: str) -> ChatFormat:
    """A builtin chat format by name.

    Raises:
        DataError: unknown name (the known names are listed).
    """
    cls = CHAT_FORMATS.get(name.lower())
    if cls is None:
        raise DataError(
            f"unknown chat format {name!r}; use 'auto' (the model's own template), 'builtin', or one of "
            f"{', '.join(sorted(CHAT_FORMATS))}."
        )
    return cls()
