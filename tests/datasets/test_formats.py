"""Row formats: detection from columns, rows -> messages, masking policies, and their errors."""

import logging

import pytest

from kdtune.data.formats import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    RowConverter,
    check_columns,
    detect_format,
    get_format,
)
from kdtune.errors import DataError


def _tuples(messages):
    return [(m.role, m.content, m.masked) for m in messages]


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["messages"], "openai"),
        (["conversations", "id"], "sharegpt"),
        (["instruction", "input", "output", "text"], "alpaca"),  # tatsu-lab/alpaca also has "text"
        (["instruction", "output"], "alpaca"),
        (["instruction", "context", "response", "category"], "dolly"),
        (["id", "system_prompt", "question", "response"], "openorca"),
        (["source", "target"], "source_target"),
        (["prompt", "completion"], "prompt_completion"),
        (["text", "meta"], "text"),
        (["prompt", "prompt_id", "messages"], "openai"),  # UltraChat
    ],
)
def test_detect_format(columns, expected, caplog):
    with caplog.at_level(logging.INFO, logger="kdtune.data"):
        assert detect_format(columns, source="ds").name == expected
    assert f"Detected dataset format {expected!r}" in caplog.text


def test_detect_with_column_map_and_kinds():
    assert detect_format(["q", "a"], {"source": "q", "target": "a"}).name == "source_target"
    assert detect_format(["text", "prompt", "completion"], kinds=("text",)).name == "text"


def test_detect_unknown_lists_columns():
    with pytest.raises(DataError, match=r"columns present are \['question', 'answer'\].*column_map"):
        detect_format(["question", "answer"], source="ds")


def test_unknown_format_name():
    with pytest.raises(DataError, match="unknown dataset format 'alpacca'.*known formats: openai"):
        get_format("alpacca")
    assert get_format("messages").name == "openai"


def test_missing_column_error():
    fmt = get_format("source_target")
    with pytest.raises(DataError, match=r"has no column 'target'.*columns present: \['source', 'answer'\].*column_map"):
        check_columns(fmt, ["source", "answer"], None, source="ds")
    with pytest.raises(DataError, match=r"no column 'resp' \(mapped from 'target' by column_map\)"):
        check_columns(fmt, ["source", "answer"], {"target": "resp"}, source="ds")


def test_source_target_masking():
    conv = RowConverter(get_format("source_target"))
    assert _tuples(conv({"source": "Q", "target": "A"})) == [("user", "Q", True), ("assistant", "A", False)]
    conv = RowConverter(get_format("source_target"), train_on_input=True, new_system_prompt="S")
    assert _tuples(conv({"source": "Q", "target": "A"})) == [
        ("system", "S", False),
        ("user", "Q", False),
        ("assistant", "A", False),
    ]


def test_alpaca_template():
    conv = RowConverter(get_format("alpaca"))
    with_input = conv({"instruction": "Add.", "input": "1 2", "output": "3"})
    assert with_input[0].content == ALPACA_PROMPT_WITH_INPUT.format(instruction="Add.", input="1 2")
    assert with_input[0].content.endswith("### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n")
    no_input = conv({"instruction": "Hi.", "input": "", "output": "Hello"})
    assert no_input[0].content == ALPACA_PROMPT_NO_INPUT.format(instruction="Hi.")
    assert _tuples(no_input)[1] == ("assistant", "Hello", False)
    # a null input (common in JSON exports) is an empty input
    assert conv({"instruction": "Hi.", "input": None, "output": "x"})[0].content == no_input[0].content


def test_dolly_and_openorca():
    dolly = RowConverter(get_format("dolly"))
    assert _tuples(dolly({"instruction": "Sum up.", "context": "Text.", "response": "Ok"})) == [
        ("user", "Sum up.\n\nText.", True),
        ("assistant", "Ok", False),
    ]
    assert dolly({"instruction": "Why?", "context": "", "response": "x"})[0].content == "Why?"
    orca = RowConverter(get_format("openorca"))
    assert _tuples(orca({"system_prompt": "Be brief.", "question": "Q", "response": "R"})) == [
        ("system", "Be brief.", True),
        ("user", "Q", True),
        ("assistant", "R", False),
    ]
    assert [m.role for m in orca({"system_prompt": "", "question": "Q", "response": "R"})] == ["user", "assistant"]


def test_prompt_completion_conversational():
    conv = RowConverter(get_format("prompt_completion"))
    row = {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}
    assert _tuples(conv(row)) == [("user", "Q", True), ("assistant", "A", False)]
    assert _tuples(conv({"prompt": "Q", "completion": "A"})) == [("user", "Q", True), ("assistant", "A", False)]


CHAT = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "content": "a2"},
]


def test_chat_masking_policies():
    all_a = RowConverter(get_format("openai"))
    assert [m.masked for m in all_a({"messages": CHAT})] == [True, True, False, True, False]
    last = RowConverter(get_format("openai"), masking="last_assistant")
    assert [m.masked for m in last({"messages": CHAT})] == [True, True, True, True, False]
    inp = RowConverter(get_format("openai"), train_on_input=True)
    assert [m.masked for m in inp({"messages": CHAT})] == [False] * 5
    new_sys = RowConverter(get_format("openai"), new_system_prompt="NEW")
    out = new_sys({"messages": CHAT})
    assert [(m.role, m.content) for m in out[:2]] == [("system", "NEW"), ("user", "u1")] and len(out) == 5


def test_sharegpt_roles_and_content_parts():
    conv = RowConverter(get_format("sharegpt"))
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"},
        ]
    }
    assert _tuples(conv(row)) == [("system", "S", True), ("user", "hi", True), ("assistant", "yo", False)]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert RowConverter(get_format("openai"))(parts)[0].content == "ab"


def test_unknown_role_and_role_map():
    conv = RowConverter(get_format("sharegpt"), source="ds")
    row = {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}
    with pytest.raises(DataError, match=r"ds row 7: conversations\[0\] has unknown role 'narrator'.*role_map"):
        conv(row, 7)
    mapped = RowConverter(get_format("sharegpt"), role_map={"narrator": "user"})
    assert [m.role for m in mapped(row)] == ["user", "assistant"]
    with pytest.raises(DataError, match="not one of"):
        RowConverter(get_format("sharegpt"), role_map={"narrator": "judge"})


def test_bad_cells():
    conv = RowConverter(get_format("openai"), source="ds")
    with pytest.raises(DataError, match="should hold a list of messages"):
        conv({"messages": "hello"}, 3)
    with pytest.raises(DataError, match="expected 'role'\\+'content'"):
        conv({"messages": [{"speaker": "a", "text": "b"}]})
    with pytest.raises(DataError, match="content part of type 'image_url'"):
        conv({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]})
    with pytest.raises(DataError, match="should hold text but holds int"):
        RowConverter(get_format("source_target"))({"source": 5, "target": "x"})
    with pytest.raises(DataError, match="unknown masking"):
        RowConverter(get_format("openai"), masking="first")
