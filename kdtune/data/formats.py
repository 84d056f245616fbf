"""Column formats of SFT / distillation data: turning one dataset row into a list of `Message`s.

A *format* names the columns a row must have and how they become messages. The formats kdtune knows:

=====================  ===========================================  ==================================================
name                   columns (canonical names)                    seen in
=====================  ===========================================  ==================================================
``openai``             ``messages`` (list of {role, content})       OpenAI / TRL conversational, UltraChat
``sharegpt``           ``conversations`` (list of {from, value})    ShareGPT, SlimOrca
``alpaca``             ``instruction``, ``input`` (opt), ``output``  Alpaca, Alpaca-cleaned (rendered with the Alpaca
                                                                    prompt template)
``dolly``              ``instruction``, ``context`` (opt),          databricks-dolly-15k
                       ``response``
``openorca``           ``system_prompt`` (opt), ``question``,       OpenOrca
                       ``response``
``source_target``      ``source``, ``target``                       instruction pairs (training-wizard style)
``prompt_completion``  ``prompt``, ``completion``                   TRL prompt-completion, MaxText
``text``               ``text``                                     plain text / continued pre-training
=====================  ===========================================  ==================================================

``column_map`` maps a canonical column name to the dataset's own column, e.g. ``{"source": "question"}``.
:func:`detect_format` picks the first format (in the order of the table) whose required columns are all present.

Masking: instruction formats produce one prompt turn (masked unless ``train_on_input``) and one assistant turn
(trained). Chat formats train on every assistant turn (``masking="all_assistant"``) or only the last one
(``masking="last_assistant"``); ``train_on_input=True`` also trains on the system / user / tool turns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kdtune.data.messages import ROLE_ALIASES, ROLES, Message
from kdtune.errors import DataError

logger = logging.getLogger("kdtune.data")

MaskingStyle = Literal["all_assistant", "last_assistant"]

#: Roles a `Message` may carry (kdtune.data.Message).
MESSAGE_ROLES: tuple[str, ...] = ROLES

#: Role names found in public chat datasets, mapped to kdtune's roles. Extend per dataset with ``role_map``.
DEFAULT_ROLE_MAP: dict[str, str] = {**{r: r for r in ROLES}, **ROLE_ALIASES}

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class ColumnFormat:
    """A named row layout.

    Attributes:
        name: Format name used in configs (``format=...``).
        kind: ``"instruct"`` (one prompt + one response), ``"chat"`` (a list of turns) or ``"text"`` (plain text).
        required: Canonical column names every row must have.
        optional: Canonical column names used when present.
    """

    name: str
    kind: Literal["instruct", "chat", "text"]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    def resolve_columns(self, column_map: Mapping[str, str] | None) -> dict[str, str]:
        """Canonical column name -> the dataset's column name, for required and optional columns."""
        column_map = dict(column_map or {})
        return {c: column_map.get(c, c) for c in self.required + self.optional}

    def matches(self, columns: Sequence[str], column_map: Mapping[str, str] | None = None) -> bool:
        """Whether every required column is present (after ``column_map``)."""
        cols = self.resolve_columns(column_map)
        return all(cols[c] in columns for c in self.required)


FORMATS: dict[str, ColumnFormat] = {
    f.name: f
    for f in (
        ColumnFormat("openai", "chat", ("messages",)),
        ColumnFormat("sharegpt", "chat", ("conversations",)),
        ColumnFormat("alpaca", "instruct", ("instruction", "output"), ("input",)),
        ColumnFormat("dolly", "instruct", ("instruction", "response"), ("context",)),
        ColumnFormat("openorca", "instruct", ("question", "response"), ("system_prompt",)),
        ColumnFormat("source_target", "instruct", ("source", "target")),
        ColumnFormat("prompt_completion", "instruct", ("prompt", "completion")),
        ColumnFormat("text", "text", ("text",)),
    )
}

#: Accepted spellings of format names.
FORMAT_ALIASES: dict[str, str] = {
    "messages": "openai",
    "chat": "openai",
    "conversations": "sharegpt",
    "input_output": "source_target",
    "instruction_output": "alpaca",
    "orca": "openorca",
    "completion": "prompt_completion",
    "text_completion": "text",
}


def get_format(name: str, *, key: str = "format") -> ColumnFormat:
    """Look up a format by name or alias.

    Raises:
        DataError: unknown name (lists the known ones).
    """
    canonical = FORMAT_ALIASES.get(name, name)
    if canonical not in FORMATS:
        raise DataError(
            f"unknown dataset format {name!r} (key {key!r}); known formats: {', '.join(FORMATS)} "
            f"(or 'auto' to detect it from the columns)"
        )
    return FORMATS[canonical]


def detect_format(
    columns: Sequence[str],
    column_map: Mapping[str, str] | None = None,
    *,
    kinds: Sequence[str] = ("instruct", "chat", "text"),
    source: str = "dataset",
) -> ColumnFormat:
    """Pick the format of a dataset from its column names (first match in `FORMATS` order) and log it.

    Args:
        columns: The dataset's column names.
        column_map: Canonical column name -> dataset column name.
        kinds: Restrict detection to these format kinds.
        source: Dataset name for messages.

    Raises:
        DataError: no format matches; lists the columns present and the expected layouts.
    """
    for fmt in FORMATS.values():
        if fmt.kind in kinds and fmt.matches(columns, column_map):
            used = {k: v for k, v in fmt.resolve_columns(column_map).items() if v in columns}
            logger.info("Detected dataset format %r for %s (columns %s)", fmt.name, source, used)
            return fmt
    expected = "; ".join(f"{f.name}: {'/'.join(f.required)}" for f in FORMATS.values() if f.kind in kinds)
    raise DataError(
        f"could not detect the format of {source}: columns present are {list(columns)}, expected one of "
        f"[{expected}]; rename yours with column_map (e.g. column_map={{'source': '<your prompt column>', "
        f"'target': '<your response column>'}}) or set format explicitly"
    )


def check_columns(
    fmt: ColumnFormat, columns: Sequence[str], column_map: Mapping[str, str] | None, *, source: str = "dataset"
) -> None:
    """Raise a `DataError` naming the first required column of ``fmt`` that the dataset lacks."""
    resolved = fmt.resolve_columns(column_map)
    for canonical in fmt.required:
        actual = resolved[canonical]
        if actual not in columns:
            mapped = f" (mapped from {canonical!r} by column_map)" if actual != canonical else ""
            raise DataError(
                f"{source} has no column {actual!r}{mapped} needed by format {fmt.name!r}; columns present: "
                f"{list(columns)}; point it at yours with column_map={{{canonical!r}: '<column>'}}"
            )


def _text(value: Any, *, where: str, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # CSV reads empty cells as NaN
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text" and "text" in part:
                parts.append(part["text"] or "")
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise DataError(
                    f"{where}: column {column!r} has a content part of type {kind!r}; only text parts are supported"
                )
        return "".join(parts)
    raise DataError(f"{where}: column {column!r} should hold text but holds {type(value).__name__} ({value!r:.60})")


@dataclass
class RowConverter:
    """Turns rows of one format into messages (callable as ``converter(row, index) -> list[Message]``).

    Args:
        fmt: The row format.
        column_map: Canonical column name -> dataset column name.
        train_on_input: Train on prompt / user / system turns too.
        masking: Which assistant turns of a chat are trained.
        new_system_prompt: Replace any system turn with this one (prepended).
        role_map: Extra dataset role name -> kdtune role (chat formats).
        source: Dataset name for error messages.
    """

    fmt: ColumnFormat
    column_map: Mapping[str, str] | None = None
    train_on_input: bool = False
    masking: MaskingStyle = "all_assistant"
    new_system_prompt: str | None = None
    role_map: Mapping[str, str] | None = None
    source: str = "dataset"

    def __post_init__(self) -> None:
        if self.fmt.kind == "text":
            raise DataError(f"format {self.fmt.name!r} is plain text; use text_completion_dataset for it")
        if self.masking not in ("all_assistant", "last_assistant"):
            raise DataError(
                f"unknown masking {self.masking!r} (key 'masking'); use 'all_assistant' or 'last_assistant'"
            )
        self._cols = self.fmt.resolve_columns(self.column_map)
        self._roles = {**DEFAULT_ROLE_MAP, **{str(k).lower(): v for k, v in (self.role_map or {}).items()}}
        for name, role in self._roles.items():
            if role not in MESSAGE_ROLES:
                raise DataError(f"role_map maps {name!r} to {role!r}, which is not one of {list(MESSAGE_ROLES)}")

    def __call__(self, row: Mapping[str, Any], index: int = 0) -> list[Message]:
        where = f"{self.source} row {index}"
        if self.fmt.kind == "chat":
            turns = self._chat_turns(row, where)
        else:
            turns = self._instruct_turns(row, where)
        return self._finish(turns)

    def _get(self, row: Mapping[str, Any], canonical: str, where: str) -> str:
        column = self._cols[canonical]
        return _text(row.get(column), where=where, column=column)

    def _instruct_turns(self, row: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
        name = self.fmt.name
        turns: list[tuple[str, str]] = []
        if name == "alpaca":
            instruction, inp = self._get(row, "instruction", where), self._get(row, "input", where)
            template = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT_NO_INPUT
            prompt, response = template.format(instruction=instruction, input=inp), self._get(row, "output", where)
        elif name == "dolly":
            instruction, context = self._get(row, "instruction", where), self._get(row, "context", where)
            prompt = f"{instruction}\n\n{context}" if context.strip() else instruction
            response = self._get(row, "response", where)
        elif name == "openorca":
            system = self._get(row, "system_prompt", where)
            if system.strip():
                turns.append(("system", system))
            prompt, response = self._get(row, "question", where), self._get(row, "response", where)
        elif name == "source_target":
            prompt, response = self._get(row, "source", where), self._get(row, "target", where)
        elif name == "prompt_completion":
            # TRL also allows conversational prompt/completion (lists of messages).
            p, c = row.get(self._cols["prompt"]), row.get(self._cols["completion"])
            if isinstance(p, list) and p and isinstance(p[0], Mapping):
                turns.extend(self._parse_turns(p, where, self._cols["prompt"]))
                completion = (
                    self._parse_turns(c, where, self._cols["completion"])
                    if isinstance(c, list)
                    else [("assistant", _text(c, where=where, column=self._cols["completion"]))]
                )
                return turns + completion
            prompt = _text(p, where=where, column=self._cols["prompt"])
            response = _text(c, where=where, column=self._cols["completion"])
        else:  # pragma: no cover - FORMATS and this switch are kept in step
            raise DataError(f"format {name!r} is not an instruction format")
        turns += [("user", prompt), ("assistant", response)]
        return turns

    def _chat_turns(self, row: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
        column = self._cols[self.fmt.required[0]]
        turns = row.get(column)
        if not isinstance(turns, list):
            raise DataError(
                f"{where}: column {column!r} should hold a list of messages but holds {type(turns).__name__}"
            )
        if not turns:
            raise DataError(f"{where}: column {column!r} holds an empty conversation; remove the row (filter_fn)")
        return self._parse_turns(turns, where, column)

    def _parse_turns(self, turns: list[Any], where: str, column: str) -> list[tuple[str, str]]:
        out = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, Mapping):
                raise DataError(f"{where}: {column}[{j}] should be a dict with role/content, got {turn!r:.60}")
            if "role" in turn or "content" in turn:
                raw_role, content = turn.get("role"), turn.get("content")
            elif "from" in turn or "value" in turn:
                raw_role, content = turn.get("from"), turn.get("value")
            else:
                raise DataError(
                    f"{where}: {column}[{j}] has keys {sorted(turn)}; expected 'role'+'content' (OpenAI) "
                    f"or 'from'+'value' (ShareGPT)"
                )
            role = self._roles.get(str(raw_role).lower())
            if role is None:
                raise DataError(
                    f"{where}: {column}[{j}] has unknown role {raw_role!r}; known roles: {sorted(self._roles)}; "
                    f"map it with role_map={{{raw_role!r}: 'user'|'assistant'|'system'|'tool'}}"
                )
            out.append((role, _text(content, where=where, column=f"{column}[{j}]")))
        return out

    def _finish(self, turns: list[tuple[str, str]]) -> list[Message]:
        if self.new_system_prompt is not None:
            turns = [("system", self.new_system_prompt)] + [t for t in turns if t[0] != "system"]
        last_assistant = max((i for i, (r, _) in enumerate(turns) if r == "assistant"), default=-1)
        messages = []
        for i, (role, content) in enumerate(turns):
            if role != "assistant":
                masked = not self.train_on_input
            else:
                masked = self.masking == "last_assistant" and i != last_assistant
            messages.append(Message(role=role, content=content, masked=masked))
        return messages


def make_row_converter(
    fmt: ColumnFormat | str,
    **kwargs: Any,
) -> Callable[[Mapping[str, Any], int], list[Message]]:
    """Build a `RowConverter` for a format (name or `ColumnFormat`); kwargs as in `RowConverter`."""
    if isinstance(fmt, str):
        fmt = get_format(fmt)
    return RowConverter(fmt, **kwargs)
