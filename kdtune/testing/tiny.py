"""The files the ``configs/tiny/*`` configs read, made with one call (``kdtune make-tiny``): a byte-level BPE tokenizer,
a tiny Qwen2-style student and teacher whose vocabulary is exactly the tokenizer's, and learnable chat data; plus a
tiny OPT, T5 (flan-t5 layout) and BART student/teacher pair with the same tokenizer, source/target pairs and plain
text for the ``configs/tiny/kd_{opt,t5,bart}.yaml`` configs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from kdtune.fsio import atomic_directory, atomic_write_file

__all__ = ["DEFAULT_TINY_DIR", "TINY_CONFIG_KEYS", "TINY_FAMILIES", "make_tiny_assets", "tiny_examples"]

#: where the tiny configs look for their files
DEFAULT_TINY_DIR = "/tmp/kdtune-tiny"

#: config key -> the path under the tiny directory it names in configs/tiny/*.yaml
TINY_CONFIG_KEYS = {
    "checkpointer.checkpoint_dir": "student",
    "teacher_checkpointer.checkpoint_dir": "teacher",
    "dataset.data_files": "train.jsonl",
}

#: the extra families written under ``<dir>/<family>/{student,teacher}`` (configs/tiny/kd_<family>.yaml)
TINY_FAMILIES = ("opt", "t5", "bart")

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


def _family_ids(family: str, tokenizer: Any) -> dict[str, Any]:
    """The special-token ids of a tiny ``family`` config, taken from the shared tokenizer (no BOS, pad and EOS)."""
    pad, eos = tokenizer.pad_id, tokenizer.eos_id
    if family == "t5":
        return {"pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": pad}
    if family == "bart":
        return {"bos_token_id": None, "pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": eos}
    return {"bos_token_id": eos, "pad_token_id": pad, "eos_token_id": eos}


def make_tiny_assets(directory: str | Path = DEFAULT_TINY_DIR, *, num_examples: int = 72) -> dict[str, Path]:
    """Write ``student/``, ``teacher/`` (HF model directories with tokenizer files) and ``train.jsonl`` under
    ``directory``, and for each of ``TINY_FAMILIES`` ``<family>/student`` and ``<family>/teacher``, plus
    ``seq2seq.jsonl`` (``source``/``target`` pairs of the same task) and ``text.jsonl`` (a ``text`` column); the same
    files every time (seeded), replacing earlier ones atomically.

    The models' vocabulary size is the tokenizer's (special tokens included), so every token id the tokenizer emits
    has a row in the embedding. Student: dim 32 (tied embeddings, except T5); teacher: dim 64; both 2 layers (per stack), 4 heads
    (Qwen2: 2 KV heads). The encoder-decoder configs name the tokenizer's pad / EOS as their decoder start token.

    Args:
        directory: where to write (the tiny configs read ``/tmp/kdtune-tiny``).
        num_examples: rows of ``train.jsonl``, ``seq2seq.jsonl`` and ``text.jsonl``.

    Returns:
        ``{"student", "teacher", "data", "seq2seq_data", "text_data"}`` and ``"<family>_student"`` /
        ``"<family>_teacher"`` for each of ``TINY_FAMILIES``.
    """
    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.models import make_tiny_hf_checkpoint
    from kdtune.testing.tokenizers import write_bpe_tokenizer

    root = Path(directory).expanduser().absolute()
    corpus = [json.dumps(e) for e in tiny_examples(200, 1)] + _WORDS
    dims = {"dim": 32, "layers": 2, "heads": 4, "kv_heads": 2}
    paths: dict[str, Path] = {}
    tokenizer = None
    for family in ("qwen2", *TINY_FAMILIES):
        for name, dim, seed in (("student", 32, 0), ("teacher", 64, 1)):
            where = root / name if family == "qwen2" else root / family / name
            with atomic_directory(where) as tmp:
                write_bpe_tokenizer(tmp, corpus, vocab_size=_TOKENIZER_VOCAB, style="qwen2")
                if tokenizer is None:
                    tokenizer = load_hf_tokenizer(tmp)
                ids = _family_ids(family, tokenizer) if family != "qwen2" else {}
                make_tiny_hf_checkpoint(
                    tmp,
                    family=family,
                    vocab_size=tokenizer.vocab_size,
                    seed=seed,
                    tie=name == "student" and family != "t5",  # tiny T5 keeps flan-t5's untied head
                    **{**dims, "dim": dim},
                    **ids,
                )
            paths[name if family == "qwen2" else f"{family}_{name}"] = where
    examples = tiny_examples(num_examples, 0)
    data = root / "train.jsonl"
    atomic_write_file(data, "".join(json.dumps(e) + "\n" for e in examples))
    paths["data"] = data
    pairs = [{"source": e["messages"][0]["content"], "target": e["messages"][1]["content"]} for e in examples]
    paths["seq2seq_data"] = root / "seq2seq.jsonl"
    atomic_write_file(paths["seq2seq_data"], "".join(json.dumps(p) + "\n" for p in pairs))
    texts = [{"text": f"{p['source']} = {p['target']}."} for p in pairs]
    paths["text_data"] = root / "text.jsonl"
    atomic_write_file(paths["text_data"], "".join(json.dumps(t) + "\n" for t in texts))
    return paths
