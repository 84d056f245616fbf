"""Fixtures of the distributed tests: tiny HF model dirs + tokenizer + chat data, and a torchrun launcher."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "one", "two", "three", "big", "small", "fast", "slow"]


def _chats(n: int, seed: int) -> list[dict]:
    """Chat data: the assistant repeats the user's words in reverse order."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        out.append(
            {
                "messages": [
                    {"role": "user", "content": "reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return out


@pytest.fixture(scope="session")
def dist_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``student`` (qwen2, dim 32, tied), ``teacher`` (dim 64), ``teacher_big_vocab`` (other tokenizer), ``data``."""
    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.models import make_tiny_hf_checkpoint
    from kdtune.testing.tokenizers import write_bpe_tokenizer

    root = tmp_path_factory.mktemp("dist_tiny")
    corpus = [json.dumps(e) for e in _chats(200, 1)] + WORDS
    write_bpe_tokenizer(root / "tok", corpus, vocab_size=300, style="qwen2")
    vocab = load_hf_tokenizer(root / "tok").vocab_size
    dims = {"dim": 32, "layers": 2, "heads": 4, "kv_heads": 2}
    paths: dict[str, Path] = {}
    for name, d, seed, tie in (("student", dims, 0, True), ("teacher", {**dims, "dim": 64}, 1, False)):
        make_tiny_hf_checkpoint(root / name, family="qwen2", vocab_size=vocab, seed=seed, tie=tie, **d)
        for f in (root / "tok").iterdir():
            shutil.copy2(f, root / name / f.name)
        paths[name] = root / name
    write_bpe_tokenizer(root / "tok2", ["completely different text 0123456789 xyz"] * 20, vocab_size=400, style="gpt2")
    v2 = load_hf_tokenizer(root / "tok2").vocab_size
    make_tiny_hf_checkpoint(root / "other_teacher", family="qwen2", vocab_size=v2, seed=3, **dims)
    for f in (root / "tok2").iterdir():
        shutil.copy2(f, root / "other_teacher" / f.name)
    paths["other_teacher"] = root / "other_teacher"
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in _chats(72, 0)) + "\n")
    paths["data"] = data
    return paths
