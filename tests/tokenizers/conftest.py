"""Tokenizer directories written once per session with kdtune.testing.tokenizers (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdtune.testing.tokenizers import (
    write_bpe_tokenizer,
    write_sentencepiece_tokenizer,
    write_tiktoken_llama3_tokenizer,
)


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {
        "llama3": write_tiktoken_llama3_tokenizer(root / "llama3"),
        "qwen2": write_bpe_tokenizer(root / "qwen2", style="qwen2"),
        "gpt2": write_bpe_tokenizer(root / "gpt2", style="gpt2"),
        "llama2": write_sentencepiece_tokenizer(root / "llama2", style="llama2"),
        "llama2_legacy": write_sentencepiece_tokenizer(root / "llama2_legacy", style="llama2", legacy=True),
        "tinyllama": write_sentencepiece_tokenizer(root / "tinyllama", style="tinyllama"),
        "mistral": write_sentencepiece_tokenizer(root / "mistral", style="mistral", legacy=True),
    }
    # Llama 3 as fine-tunes often ship it: tokenizer.json without original/ (kdtune's own byte-level BPE path)
    dirs["llama3_json"] = root / "llama3_json"
    shutil.copytree(dirs["llama3"], dirs["llama3_json"], ignore=shutil.ignore_patterns("original"))
    # Qwen2 with only vocab.json + merges.txt (the slow-tokenizer files)
    dirs["qwen2_vm"] = root / "qwen2_vm"
    shutil.copytree(dirs["qwen2"], dirs["qwen2_vm"], ignore=shutil.ignore_patterns("tokenizer.json"))
    return dirs
