"""Shared fixtures of the recipe tests: a tiny tokenizer, tiny student/teacher HF model dirs and local chat data."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "one", "two", "three", "big", "small", "fast", "slow"]


def _examples(n: int, seed: int) -> list[dict]:
    """Learnable chat data: the assistant repeats the user's words in reverse order."""
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


def _copy_tokenizer(tok_dir: Path, model_dir: Path) -> None:
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, model_dir / f.name)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths: ``tokenizer``, ``student`` (dim 32), ``teacher`` (dim 64), ``teacher_padded`` (vocab + 64),
    ``other_tok_teacher`` (a different tokenizer), ``data`` (jsonl, 72 chats)."""
    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.models import make_tiny_hf_checkpoint
    from kdtune.testing.tokenizers import write_bpe_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    corpus = [json.dumps(e) for e in _examples(200, 1)] + WORDS
    write_bpe_tokenizer(root / "tok", corpus, vocab_size=300, style="qwen2")
    vocab = load_hf_tokenizer(root / "tok").vocab_size
    dims = {"dim": 32, "layers": 2, "heads": 4, "kv_heads": 2}
    paths = {"tokenizer": root / "tok"}
    for name, v, d, seed in (
        ("student", vocab, dims, 0),
        ("teacher", vocab, {**dims, "dim": 64}, 1),
        ("teacher_padded", vocab + 64, {**dims, "dim": 64}, 2),
    ):
        make_tiny_hf_checkpoint(root / name, family="qwen2", vocab_size=v, seed=seed, tie=name == "student", **d)
        _copy_tokenizer(root / "tok", root / name)
        paths[name] = root / name
    # a teacher whose tokenizer is different (other corpus, other vocab)
    write_bpe_tokenizer(root / "tok2", ["completely different text 0123456789 xyz"] * 20, vocab_size=400, style="gpt2")
    v2 = load_hf_tokenizer(root / "tok2").vocab_size
    make_tiny_hf_checkpoint(root / "other_tok_teacher", family="qwen2", vocab_size=v2, seed=3, **dims)
    _copy_tokenizer(root / "tok2", root / "other_tok_teacher")
    paths["other_tok_teacher"] = root / "other_tok_teacher"
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in _examples(72, 0)) + "\n")
    paths["data"] = data
    return paths


@pytest.fixture
def overrides(tiny: dict[str, Path]):
    """``overrides(out_dir, teacher="teacher")``: overrides pointing a configs/tiny config at the fixture's files."""

    def make(out: Path, teacher: str | None = "teacher") -> list[str]:
        ov = [
            f"output_dir={out}",
            f"checkpointer.checkpoint_dir={tiny['student']}",
            f"dataset.data_files={tiny['data']}",
        ]
        if teacher is not None:
            ov.append(f"teacher_checkpointer.checkpoint_dir={tiny[teacher]}")
        return ov

    return make


@pytest.fixture(scope="session")
def recipe():
    """``recipe(name)``: the recipe script ``recipes/<name>.py`` imported as a module (its ``train``/``main``)."""
    import importlib.util

    cache = {}

    def load(name: str):
        if name not in cache:
            spec = importlib.util.spec_from_file_location(f"_recipe_{name}", ROOT / "recipes" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            cache[name] = module
        return cache[name]

    return load


@pytest.fixture
def tiny_cfg(overrides):
    """``tiny_cfg(kind, out_dir, *extra, teacher="teacher")``: configs/tiny/<kind>.yaml with overrides applied."""
    from kdtune.config import apply_overrides, load_config

    def make(kind: str, out: Path, *extra: str, teacher: str | None = "teacher"):
        cfg = load_config(ROOT / "configs" / "tiny" / f"{kind}.yaml")
        return apply_overrides(cfg, [*overrides(out, teacher if kind == "kd" else None), *extra])

    return make
