"""The quickstart's task generator and exact-match scorer."""

import json

import pytest

from kdtune.errors import DataError
from kdtune.quickstart.evaluate import accuracy, exact_match, normalize_answer
from kdtune.quickstart.tasks import TASKS, generate_examples, make_splits, read_jsonl, write_jsonl


def test_generator_is_deterministic_for_a_seed():
    assert generate_examples(200, seed=7) == generate_examples(200, seed=7)
    assert generate_examples(200, seed=7) != generate_examples(200, seed=8)


def test_answers_are_correct_by_construction():
    for ex in generate_examples(400, seed=3):
        op, arg = ex.prompt.split(" ", 1)
        assert ex.task == op
        if op == "first":
            assert ex.answer == arg[0]
        elif op == "reverse":
            assert ex.answer == arg[::-1]
        elif op == "count":
            assert ex.answer == str(len(arg))
        else:
            assert op == "last" and ex.answer == arg[-1]


def test_every_task_is_represented_equally():
    examples = generate_examples(400, seed=0)
    counts = {t: sum(ex.task == t for ex in examples) for t in TASKS}
    assert set(counts.values()) == {100}


def test_splits_are_disjoint_and_sized():
    splits = make_splits({"teacher_train": 300, "train": 50, "val": 20, "test": 40}, seed=1)
    assert {k: len(v) for k, v in splits.items()} == {"teacher_train": 300, "train": 50, "val": 20, "test": 40}
    prompts = [set(ex.prompt for ex in v) for v in splits.values()]
    for i in range(len(prompts)):
        for j in range(i + 1, len(prompts)):
            assert not prompts[i] & prompts[j]


def test_jsonl_round_trip_is_openai_chat_format(tmp_path):
    examples = generate_examples(5, seed=2)
    path = write_jsonl(examples, tmp_path / "d.jsonl")
    record = json.loads(path.read_text().splitlines()[0])
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert read_jsonl(path) == examples


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="unknown quickstart task"):
        generate_examples(3, seed=0, tasks=["multiply"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_jsonl(bad)


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("85", "85", True),
        (" 85\n", "85", True),
        ("8 5", "85", False),
        ("850", "85", False),
        ("", "85", False),
        ("abc", "ABC", False),
        ("a  b", "a b", True),
    ],
)
def test_exact_match_hand_cases(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected


def test_accuracy():
    assert accuracy(["1", "2", "x"], ["1", "2", "3"]) == pytest.approx(2 / 3)
    assert normalize_answer("  a \t b ") == "a b"
    with pytest.raises(ValueError):
        accuracy(["1"], ["1", "2"])
