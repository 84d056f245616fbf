"""``kdtune.handoff.write_chat_template``: a final/ dir's ``apply_chat_template`` gives exactly the ids kdtune trained
on, for the model's own jinja template and for every builtin chat format with a jinja equivalent."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from kdtune.data import Message, load_hf_tokenizer, mask_messages
from kdtune.errors import DataError
from kdtune.handoff import write_chat_template

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?\nShow work."},
        {"role": "assistant", "content": " 3 + 3 = 6 "},
    ],
    [
        {"role": "user", "content": "def f(x):\n    return x  # 日本 😀"},
        {"role": "assistant", "content": "It returns x unchanged."},
    ],
]

# (tokenizer dir, chat_template= argument of load_hf_tokenizer)
CASES = [
    ("llama3", "auto"), ("qwen2", "auto"), ("gpt2", "auto"), ("tinyllama", "auto"), ("mistral", "auto"),
    ("llama3", "builtin"), ("llama3_json", "builtin"), ("qwen2", "builtin"), ("qwen2", "chatml"),
    ("qwen2", "qwen2_5"), ("gpt2", "builtin"), ("gpt2", "plain"), ("tinyllama", "zephyr"), ("mistral", "mistral"),
]  # fmt: skip


def _ids(out) -> list[int]:
    return list(out) if isinstance(out, list) else list(out["input_ids"])


@pytest.mark.parametrize(("kind", "choice"), CASES)
def test_final_dir_template_reproduces_training_ids(tok_dirs, tmp_path, kind, choice) -> None:
    tok = load_hf_tokenizer(tok_dirs[kind], chat_template=choice)
    final = tmp_path / "final"
    shutil.copytree(tok_dirs[kind], final)
    cfg = json.loads((final / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)  # as if the base model had none (or another one): the run's own must win
    (final / "tokenizer_config.json").write_text(json.dumps(cfg))
    (final / "chat_template.jinja").unlink(missing_ok=True)
    path = write_chat_template(tok, final)
    assert path.read_text() == json.loads((final / "tokenizer_config.json").read_text())["chat_template"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoTokenizer.from_pretrained(str(final))
    for conv in CONVERSATIONS:
        if kind == "mistral":
            conv = [m for m in conv if m["role"] != "system"]
        msgs = mask_messages([Message.from_dict(m) for m in conv])
        ids, _ = tok.tokenize_messages(msgs)
        assert ids == _ids(ref.apply_chat_template(conv, tokenize=True)), (kind, choice)
        if choice not in ("plain", "mistral") and not (kind in ("gpt2", "mistral") and choice in ("auto", "builtin")):
            ids, _ = tok.tokenize_messages(msgs[:-1], add_generation_prompt=True)
            assert ids == _ids(ref.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True))


def test_llama2_builtin_format_has_no_jinja_equivalent(tok_dirs, tmp_path) -> None:
    tok = load_hf_tokenizer(tok_dirs["llama2"], chat_template="builtin")
    with pytest.raises(DataError, match="no jinja equivalent"):
        write_chat_template(tok, tmp_path)
