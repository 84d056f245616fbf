"""The files the ``configs/tiny/*`` configs read, made with one call (``kdtune make-tiny``): a byte-level BPE tokenizer,
a tiny Qwen2-style student and teacher whose vocabulary is exactly the tokenizer's, and learnable chat data."""

from __future__ import annotations

import json
import random
from pathlib import Path

from kdtune.fsio import atomic_directory, atomic_write_file

__all__ = ["DEFAULT_TINY_DIR", "TINY_CONFIG_KEYS", "make_tiny_assets", "tiny_examples"]

#: where the tiny configs look for their files
DEFAULT_TINY_DIR = "/tmp/kdtune-tiny"

#: config key -> the path under the tiny directory it names in configs/tiny/*.yaml
TINY_CONFIG_KEYS = {
    "checkpointer.checkpoint_dir": "student",
    "teacher_checkpointer.checkpoint_dir": "teacher",
    "dataset.data_files": "train.jsonl",
}

_WORDS = ["red", "blue", "green", "cat", "dog", "bird", "one", "two", "three", "big", "small", "fast", "slow"]
_TOKENIZER_VOCAB = 300  # byte-level BPE vocabulary before the special tokens


def tiny_examples(n: int, seed: int) -> list[dict]:
    """``n`` chats of a learnable task: the assistant repeats the user's words in reverse order."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 6))]
        out.append(
            {
                "messages": [
                    {"role": "user", "content": "reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return out


def make_tiny_assets(directory: str | Path = DEFAULT_TINY_DIR, *, num_examples: int = 72) -> dict[str, Path]:
    """Write ``student/``, ``teacher/`` (HF model directories with tokenizer files) and ``train.jsonl`` under
    ``directory``; the same files every time (seeded), replacing earlier ones atomically.

    The models' vocabulary size is the tokenizer's (special tokens included), so every token id the tokenizer emits
    has a row in the embedding. Student: dim 32, tied embeddings; teacher: dim 64; both 2 layers, 4 heads, 2 KV heads.

    Args:
        directory: where to write (the tiny configs read ``/tmp/kdtune-tiny``).
        num_examples: rows of ``train.jsonl``.

    Returns:
        ``{"student": ..., "teacher": ..., "data": ...}``.
    """
    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.models import make_tiny_hf_checkpoint
    from kdtune.testing.tokenizers import write_bpe_tokenizer

    root = Path(directory).expanduser().absolute()
    corpus = [json.dumps(e) for e in tiny_examples(200, 1)] + _WORDS
    dims = {"dim": 32, "layers": 2, "heads": 4, "kv_heads": 2}
    paths: dict[str, Path] = {}
    vocab_size = None
    for name, dim, seed in (("student", 32, 0), ("teacher", 64, 1)):
        with atomic_directory(root / name) as tmp:
            write_bpe_tokenizer(tmp, corpus, vocab_size=_TOKENIZER_VOCAB, style="qwen2")
            if vocab_size is None:
                vocab_size = load_hf_tokenizer(tmp).vocab_size
            make_tiny_hf_checkpoint(
                tmp, family="qwen2", vocab_size=vocab_size, seed=seed, tie=name == "student", **{**dims, "dim": dim}
            )
        paths[name] = root / name
    data = root / "train.jsonl"
    atomic_write_file(data, "".join(json.dumps(e) + "\n" for e in tiny_examples(num_examples, 0)))
    paths["data"] = data
    return paths
