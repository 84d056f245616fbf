"""Tiny checkpoints and local lm-eval tasks for the evaluation tests (no network)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "one", "two", "three", "big", "small", "fast", "slow"]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """HF model dirs (weights + tokenizer files): ``qwen2`` (byte-level BPE, no BOS) and ``llama3`` (tiktoken, BOS)."""
    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.models import make_tiny_hf_checkpoint
    from kdtune.testing.tokenizers import write_bpe_tokenizer, write_tiktoken_llama3_tokenizer

    root = tmp_path_factory.mktemp("eval_models")
    corpus = [_sentence(random.Random(i), 12) for i in range(50)]
    out = {}
    for name, write, family in (
        ("qwen2", lambda d: write_bpe_tokenizer(d, corpus, vocab_size=320, style="qwen2"), "qwen2"),
        ("llama3", lambda d: write_tiktoken_llama3_tokenizer(d, corpus, vocab_size=320), "llama"),
    ):
        tok_dir = write(root / f"{name}_tok")
        tok = load_hf_tokenizer(tok_dir)
        model_dir = root / name
        make_tiny_hf_checkpoint(
            model_dir, family=family, vocab_size=tok.vocab_size, dim=32, layers=2, heads=4, kv_heads=2, seed=7,
            eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, max_position_embeddings=4096,
        )  # fmt: skip
        for f in tok_dir.rglob("*"):
            if f.is_file():
                dest = model_dir / f.relative_to(tok_dir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
        out[name] = model_dir
    return out


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with three local lm-eval tasks over JSON-lines files: ``kd_mc`` (multiple choice, log-likelihood),
    ``kd_gen`` (generate_until; stop sequences written by :func:`write_gen_task`) and ``kd_ppl`` (rolling)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    rng = random.Random(0)
    mc, gen, ppl = [], [], []
    for i in range(12):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        choices = [" ".join(reversed(words)), " ".join(words), _sentence(rng, len(words)), rng.choice(WORDS)]
        mc.append({"question": "reverse: " + " ".join(words), "choices": choices, "label": i % 4})
        gen.append({"prompt": f"Say {' '.join(words)} again:", "answer": " " + " ".join(words)})
        # some long texts, so rolling windows and left truncation (max_seq_len=48 in the tests) are exercised
        ppl.append({"text": _sentence(rng, rng.choice([5, 30, 70]))})
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def data(name: str) -> str:
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / (name + '.jsonl')}\ntest_split: test\n"

    (root / "kd_mc.yaml").write_text(
        "task: kd_mc\n" + data("mc") + "output_type: multiple_choice\nfewshot_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "kd_ppl.yaml").write_text(
        "task: kd_ppl\n" + data("ppl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    write_gen_task(root, until=["\n"])
    return root


def write_gen_task(root: Path, until: list[str], max_gen_toks: int = 12) -> None:
    """(Re)write ``kd_gen.yaml`` in ``root`` with these stop sequences."""
    (root / "kd_gen.yaml").write_text(
        "task: kd_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'gen.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(until)}\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
