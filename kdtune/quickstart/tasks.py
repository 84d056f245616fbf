"""The quickstart's built-in task family: small, procedurally generated, exactly checkable.

Every example is a one-turn chat (``{"messages": [user, assistant]}``, the OpenAI format real SFT datasets use) whose
answer is fully determined by the prompt, so a model's greedy answer can be scored by exact match. Generation is
deterministic for a seed: the same seed always yields the same examples in the same order, on every machine.
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kdtune.errors import DataError

_LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class TaskExample:
    """One generated example: the task it comes from, the user's prompt and the only correct answer."""

    task: str
    prompt: str
    answer: str

    def to_chat(self) -> dict:
        """The example as an OpenAI-style chat record (what ``kdtune.data.chat_dataset`` reads)."""
        return {
            "task": self.task,
            "messages": [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}],
        }


def _word(rng: random.Random, min_len: int, max_len: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(min_len, max_len)))


def _first(rng: random.Random) -> TaskExample:
    word = _word(rng, 2, 8)
    return TaskExample("first", f"first {word}", word[0])


def _count(rng: random.Random) -> TaskExample:
    word = _word(rng, 2, 9)
    return TaskExample("count", f"count {word}", str(len(word)))


def _last(rng: random.Random) -> TaskExample:
    word = _word(rng, 2, 8)
    return TaskExample("last", f"last {word}", word[-1])


def _reverse(rng: random.Random) -> TaskExample:
    word = _word(rng, 2, 4)
    return TaskExample("reverse", f"reverse {word}", word[::-1])


TASKS: dict[str, Callable[[random.Random], TaskExample]] = {
    "first": _first,
    "count": _count,
    "last": _last,
    "reverse": _reverse,
}


def generate_examples(num_examples: int, seed: int, tasks: Iterable[str] = tuple(TASKS)) -> list[TaskExample]:
    """Generate ``num_examples`` examples, cycling through ``tasks`` so each is equally represented.

    Args:
        num_examples: how many examples to return.
        seed: the random seed; the output is a pure function of (num_examples, seed, tasks).
        tasks: names from :data:`TASKS`.

    Returns:
        The examples, in a seeded shuffled order.
    """
    task_names = list(tasks)
    unknown = [t for t in task_names if t not in TASKS]
    if unknown or not task_names:
        raise DataError(f"unknown quickstart task(s) {unknown or '(none given)'}; choose from {sorted(TASKS)}")
    rng = random.Random(seed)
    examples = [TASKS[task_names[i % len(task_names)]](rng) for i in range(num_examples)]
    rng.shuffle(examples)
    return examples


def make_splits(sizes: dict[str, int], seed: int, tasks: Iterable[str] = tuple(TASKS)) -> dict[str, list[TaskExample]]:
    """Generate disjoint splits: no prompt of one split appears in another.

    Args:
        sizes: split name -> number of examples, e.g. ``{"teacher_train": 8000, "train": 400, "val": 200, "test": 400}``.
            Splits are filled in the order given, so earlier splits are never affected by later sizes.
        seed: the random seed.
        tasks: names from :data:`TASKS`.
    """
    pool = generate_examples(sum(sizes.values()) * 4, seed, tasks)
    seen: set[str] = set()
    unique = []
    for example in pool:
        if example.prompt not in seen:
            seen.add(example.prompt)
            unique.append(example)
    if len(unique) < sum(sizes.values()):
        raise DataError(f"the task family has only {len(unique)} distinct prompts; ask for fewer examples")
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = unique[start : start + size]
        start += size
    return splits


def make_prompt_pool(
    size: int, seed: int, exclude: Iterable[str], tasks: Iterable[str] = tuple(TASKS)
) -> list[TaskExample]:
    """``size`` examples whose prompts are distinct and not in ``exclude`` (the other splits): the unlabelled pool.

    Drawn from their own seed, so the pool's size never changes the labelled splits (and their cached runs).
    """
    seen = set(exclude)
    pool: list[TaskExample] = []
    for example in generate_examples(size * 2, seed, tasks):
        if example.prompt not in seen:
            seen.add(example.prompt)
            pool.append(example)
    if len(pool) < size:
        raise DataError(f"only {len(pool)} new distinct prompts for a pool of {size}; ask for fewer")
    return pool[:size]


def write_prompts_jsonl(examples: list[TaskExample], path: str | Path) -> Path:
    """Write only the prompts (a one-message chat each, no answer): what an unlabelled pool looks like."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(
                json.dumps({"task": example.task, "messages": [{"role": "user", "content": example.prompt}]}) + "\n"
            )
    os.replace(tmp, path)
    return path


def write_jsonl(examples: list[TaskExample], path: str | Path) -> Path:
    """Write examples as chat JSON lines, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.to_chat()) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | Path) -> list[TaskExample]:
    """Read examples written by :func:`write_jsonl`."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                user, assistant = record["messages"]
                examples.append(TaskExample(record.get("task", "?"), user["content"], assistant["content"]))
            except (json.JSONDecodeError, KeyError, ValueError) as err:
                raise DataError(f"{path}:{line_no}: not a quickstart example ({err})") from None
    return examples


def corpus_for_tokenizer() -> list[str]:
    """Text covering every character the tasks can produce (the tokenizer is character level: 256 bytes, no merges,
    so this only documents the alphabet; a larger ``vocab_size`` would learn merges from it)."""
    return [" ".join(TASKS), _LETTERS, string.digits]
