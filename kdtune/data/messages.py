"""Chat messages: the ``Message`` dataclass every tokenizer and chat format consumes, plus role checks and masking.

Masking follows torchtune: each message carries ``masked``; when a conversation is tokenized every token that
belongs to a message (its header, content and end token) gets that message's flag, and ``True`` means "not trained".
Dataset builders decide which messages are masked (``mask_messages`` below implements the usual policies).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kdtune.errors import DataError

Role = Literal["system", "user", "assistant", "ipython", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "ipython", "tool")

# Names other toolkits use for the same roles (ShareGPT, OpenAI function calling, ...), mapped to kdtune roles.
ROLE_ALIASES: dict[str, str] = {
    "human": "user",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "function": "tool",
    "observation": "tool",
}


@dataclass
class Message:
    """One turn of a conversation.

    Attributes:
        role: who speaks: ``"system"``, ``"user"``, ``"assistant"``, ``"ipython"`` or ``"tool"``.
        content: the text of the turn.
        masked: ``True`` if the tokens of this message are not trained on (prompt side).
    """

    role: Role
    content: str
    masked: bool = False

    def __post_init__(self) -> None:
        check_role(self.role)
        if not isinstance(self.content, str):
            raise DataError(
                f"Message content must be a string, got {type(self.content).__name__} for role {self.role!r}; "
                "convert it to text (e.g. join a list of parts) before building the Message."
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], masked: bool | None = None) -> Message:
        """Build a message from an OpenAI-style dict ``{"role": ..., "content": ...}`` (ShareGPT role names accepted).

        Args:
            d: mapping with ``role`` and ``content`` keys (``from``/``value`` as in ShareGPT also accepted).
            masked: explicit mask flag; default ``d.get("masked", False)``.

        Returns:
            The message.
        """
        role = d.get("role", d.get("from"))
        content = d.get("content", d.get("value"))
        if isinstance(content, list):  # OpenAI content parts: keep the text parts, in order
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                kinds = sorted({str(p.get("type")) if isinstance(p, dict) else type(p).__name__ for p in content})
                raise DataError(
                    f"message content parts of type {kinds} are not supported; kdtune trains on text, so keep only "
                    "'text' parts (or a plain string) in the data."
                )
            content = "".join(p.get("text", "") for p in content)
        if role is None or content is None:
            raise DataError(
                f"message {dict(d)!r} has no role/content; expected keys 'role' and 'content' "
                "(or ShareGPT 'from' and 'value')."
            )
        return cls(
            role=normalize_role(str(role)),
            content=content,
            masked=bool(d.get("masked", False)) if masked is None else masked,
        )


def normalize_role(role: str) -> str:
    """Map a role name (case-insensitive, ShareGPT aliases such as ``human``/``gpt``) to a kdtune role.

    Raises:
        DataError: the role is unknown.
    """
    r = role.strip().lower()
    r = ROLE_ALIASES.get(r, r)
    check_role(r)
    return r


def check_role(role: str) -> None:
    """Raise a clear ``DataError`` if ``role`` is not one of :data:`ROLES`."""
    if role not in ROLES:
        close = difflib.get_close_matches(str(role), list(ROLES) + list(ROLE_ALIASES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(
            f"unknown message role {role!r}{hint}; roles must be one of {', '.join(ROLES)} "
            f"(aliases: {', '.join(sorted(ROLE_ALIASES))}); fix the data or map the role with a message transform."
        )


def validate_messages(messages: Iterable[Message]) -> list[Message]:
    """Check a conversation: a list of :class:`Message`, not empty, system only first.

    Returns:
        The messages as a list.

    Raises:
        DataError: on a non-Message item, an empty conversation or a misplaced system message.
    """
    msgs = list(messages)
    if not msgs:
        raise DataError("empty conversation: tokenize_messages needs at least one message.")
    for i, m in enumerate(msgs):
        if not isinstance(m, Message):
            raise DataError(
                f"message {i} is a {type(m).__name__}, not kdtune.data.Message; build it with Message(role=..., "
                "content=...) or Message.from_dict(d)."
            )
        if m.role == "system" and i != 0:
            raise DataError(f"message {i} has role 'system'; a system message may only be the first message.")
    return msgs


def mask_messages(
    messages: list[Message],
    train_on_input: bool = False,
    train_on_assistant: Literal["all", "last"] = "all",
) -> list[Message]:
    """Set ``masked`` on each message according to the usual training policies (in place, also returned).

    Args:
        messages: the conversation.
        train_on_input: if True, system/user/tool turns are trained on too; otherwise they are masked.
        train_on_assistant: ``"all"`` trains every assistant turn, ``"last"`` only the final assistant turn.

    Returns:
        The same list.
    """
    if train_on_assistant not in ("all", "last"):
        raise DataError(f"train_on_assistant={train_on_assistant!r}; use 'all' or 'last'.")
    last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    for i, m in enumerate(messages):
        if m.role == "assistant":
            m.masked = train_on_assistant == "last" and i != last_assistant
        else:
            m.masked = not train_on_input
    return messages
