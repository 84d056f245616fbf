"""Chat formatting: ids equal ``AutoTokenizer.apply_chat_template(..., tokenize=True)`` for each family's template;
masks exact on hand-checked examples; builtin formats equal the templates they mirror; errors are clear."""

from __future__ import annotations

import warnings

import pytest

from kdtune.data import Message, load_hf_tokenizer, mask_messages
from kdtune.data.chat_formats import get_chat_format
from kdtune.errors import DataError

transformers = pytest.importorskip("transformers")

CONVERSATIONS = {
    "multi_turn_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?\nShow work."},
        {"role": "assistant", "content": " 3 + 3 = 6 "},
    ],
    "single_turn": [
        {"role": "user", "content": "def f(x):\n    return x  # 日本 😀"},
        {"role": "assistant", "content": "It returns x unchanged."},
    ],
}
TEMPLATED = ["llama3", "llama3_json", "qwen2", "gpt2", "llama2", "llama2_legacy", "tinyllama", "mistral"]
NO_SYSTEM = {"mistral"}  # Mistral's template rejects a system role


def _hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(path))


def _ref_ids(ref, conv, add_generation_prompt):
    out = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out) if isinstance(out, list) else list(out["input_ids"])


def _conversations(kind):
    for name, conv in CONVERSATIONS.items():
        if kind in NO_SYSTEM:
            conv = [m for m in conv if m["role"] != "system"]
        yield name, conv


@pytest.mark.parametrize("kind", TEMPLATED)
def test_template_ids_equal_apply_chat_template(tok_dirs, kind):
    tok = load_hf_tokenizer(tok_dirs[kind])
    assert tok.chat_template is not None
    ref = _hf(tok_dirs[kind])
    for _name, conv in _conversations(kind):
        msgs = mask_messages([Message.from_dict(m) for m in conv])
        ids, mask = tok.tokenize_messages(msgs)
        assert ids == _ref_ids(ref, conv, False), (kind, _name)
        assert len(mask) == len(ids)
        # generation prompt after the last user turn
        ids, mask = tok.tokenize_messages(msgs[:-1], add_generation_prompt=True)
        assert ids == _ref_ids(ref, conv[:-1], True), (kind, _name)
        assert mask[-1], "the generation prompt is never trained"
        assert tok.render_chat(msgs) == ref.apply_chat_template(conv, tokenize=False)


def _trained(tok, ids, mask):
    return [i for i, m in zip(ids, mask) if not m]


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "llama3_json"])
def test_masks_hand_checked_special_token_formats(tok_dirs, kind):
    tok = load_hf_tokenizer(tok_dirs[kind])
    msgs = mask_messages([Message.from_dict(m) for m in CONVERSATIONS["multi_turn_system"]])
    ids, mask = tok.tokenize_messages(msgs)
    end = tok.token_to_id("<|im_end|>" if kind == "qwen2" else "<|eot_id|>")

    def enc(s):
        return tok.encode(s, add_bos=False, add_eos=False)

    # Llama 3's template trims content; ChatML keeps it verbatim
    a1, a2 = ("4.", " 3 + 3 = 6 ") if kind == "qwen2" else ("4.", "3 + 3 = 6")
    assert _trained(tok, ids, mask) == enc(a1) + [end] + enc(a2) + [end]
    # exact positions: every trained token is inside an assistant turn, right after its header
    header = (
        enc("<|im_start|>assistant\n") if kind == "qwen2" else enc("<|start_header_id|>assistant<|end_header_id|>\n\n")
    )
    first = next(i for i, m in enumerate(mask) if not m)
    assert ids[first - len(header) : first] == header and all(mask[first - len(header) : first])
    if kind == "qwen2":  # the newline after <|im_end|> is not trained
        last = max(i for i, m in enumerate(mask) if not m)
        assert ids[last] == end and ids[last + 1 :] == enc("\n") and mask[last + 1]


def test_masks_hand_checked_llama2_sentencepiece(tok_dirs):
    tok = load_hf_tokenizer(tok_dirs["llama2"])
    msgs = mask_messages(
        [
            Message("user", "Hi there"),
            Message("assistant", "Hello!"),
            Message("user", "Bye"),
            Message("assistant", "Bye."),
        ]
    )
    ids, mask = tok.tokenize_messages(msgs)
    # "<s>[INST] Hi there [/INST] Hello! </s><s>[INST] Bye [/INST] Bye. </s>": trained = " Hello! </s>" and " Bye. </s>"
    text = tok.render_chat(msgs)
    assert text == "<s>[INST] Hi there [/INST] Hello! </s><s>[INST] Bye [/INST] Bye. </s>"
    trained_text = tok.decode(_trained(tok, ids, mask), skip_special_tokens=False)
    assert trained_text.replace(" ", "") == "Hello!</s>Bye.</s>"
    assert mask[0] and mask[-1] is False and ids[-1] == tok.eos_id


def test_train_on_input_and_last_turn_only(tok_dirs):
    tok = load_hf_tokenizer(tok_dirs["qwen2"])
    conv = [Message.from_dict(m) for m in CONVERSATIONS["multi_turn_system"]]
    ids, mask = tok.tokenize_messages(mask_messages(conv, train_on_input=True))
    # everything but the assistant headers, the implicit glue newlines after assistant turns is trained
    header = tok.encode("<|im_start|>assistant\n", add_bos=False, add_eos=False)
    masked_ids = [i for i, m in zip(ids, mask) if m]
    assert masked_ids == header + tok.encode("\n", add_bos=False, add_eos=False) + header + tok.encode(
        "\n", add_bos=False, add_eos=False
    )
    ids, mask = tok.tokenize_messages(mask_messages(conv, train_on_assistant="last"))
    end = tok.token_to_id("<|im_end|>")
    assert _trained(tok, ids, mask) == tok.encode(" 3 + 3 = 6 ", add_bos=False, add_eos=False) + [end]


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "gpt2", "llama2"])
def test_add_eos_false_leaves_last_turn_open(tok_dirs, kind):
    tok = load_hf_tokenizer(tok_dirs[kind])
    msgs = mask_messages([Message("user", "Hi"), Message("assistant", "Hello")])
    closed, _ = tok.tokenize_messages(msgs, add_eos=True)
    open_, mask = tok.tokenize_messages(msgs, add_eos=False)
    assert closed[: len(open_)] == open_ and len(open_) < len(closed)
    assert not tok.is_special(open_[-1]) and not mask[-1]
    assert tok.decode(open_).rstrip().endswith("Hello")


def test_eos_appended_when_template_has_no_end_token(tmp_path, tok_dirs):
    tok = load_hf_tokenizer(
        tok_dirs["gpt2"], chat_template="{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    ids, mask = tok.tokenize_messages(mask_messages([Message("user", "Hi"), Message("assistant", "Yo")]))
    assert ids[-1] == tok.eos_id and not mask[-1]


# builtin format -> (directory whose own template it must reproduce exactly, messages filter)
BUILTIN_EQUALS_TEMPLATE = [
    ("llama3", "llama3"),
    ("qwen2", "qwen2"),  # ChatML + Qwen2's default system prompt
    ("plain", "gpt2"),  # DialoGPT: content + eos
    ("zephyr", "tinyllama"),
    ("mistral", "mistral"),
]


@pytest.mark.parametrize(("fmt", "kind"), BUILTIN_EQUALS_TEMPLATE)
def test_builtin_format_equals_template(tok_dirs, fmt, kind):
    with_template = load_hf_tokenizer(tok_dirs[kind])
    builtin = load_hf_tokenizer(tok_dirs[kind], chat_template=fmt)
    assert builtin.chat_template is None and builtin.chat_format.name == fmt
    for _name, conv in _conversations(kind):
        for convo in (conv, [m for m in conv if m["role"] != "system"]):
            if fmt == "mistral" and convo[0]["role"] == "system":
                continue  # Mistral's template has no system role
            msgs = mask_messages([Message.from_dict(m) for m in convo])
            assert builtin.tokenize_messages(msgs) == with_template.tokenize_messages(msgs), (fmt, _name)
            assert builtin.tokenize_messages(msgs[:-1], add_generation_prompt=True) == with_template.tokenize_messages(
                msgs[:-1], add_generation_prompt=True
            )


def test_chatml_builtin_equals_qwen_template_with_system(tok_dirs):
    with_template = load_hf_tokenizer(tok_dirs["qwen2"])
    chatml = load_hf_tokenizer(tok_dirs["qwen2"], chat_template="chatml")
    msgs = mask_messages([Message.from_dict(m) for m in CONVERSATIONS["multi_turn_system"]])
    assert chatml.tokenize_messages(msgs) == with_template.tokenize_messages(msgs)


def test_builtin_auto_choice_without_template(tmp_path, tok_dirs):
    import json
    import shutil

    expected = {"llama3": "llama3", "qwen2": "chatml", "gpt2": "plain", "llama2": "llama2"}
    for kind, fmt in expected.items():
        d = tmp_path / kind
        shutil.copytree(tok_dirs[kind], d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template")
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        tok = load_hf_tokenizer(d)
        assert tok.chat_template is None and tok.chat_format.name == fmt
        assert load_hf_tokenizer(tok_dirs[kind], chat_template="builtin").chat_format.name == fmt


def test_llama2_builtin_is_metas_reference_format(tok_dirs):
    tok = load_hf_tokenizer(tok_dirs["llama2"], chat_template="llama2")
    msgs = mask_messages(
        [Message("system", "Be nice."), Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Bye")]
    )
    ids, mask = tok.tokenize_messages(msgs)
    enc = tok.encode
    # Meta's llama/generation.py: bos + encode("[INST] {sys+user} [/INST]") + encode(answer) + eos, per dialog pair
    expected = (
        enc("[INST] <<SYS>>\nBe nice.\n<</SYS>>\n\nHi [/INST]", add_bos=True, add_eos=False)
        + enc("Hello", add_bos=False, add_eos=True)
        + enc("[INST] Bye [/INST]", add_bos=True, add_eos=False)
    )
    assert ids == expected
    assert _trained(tok, ids, mask) == enc("Hello", add_bos=False, add_eos=True)


def test_chat_template_from_file_and_string(tmp_path, tok_dirs):
    f = tmp_path / "t.jinja"
    f.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = load_hf_tokenizer(tok_dirs["qwen2"], chat_template=str(f))
    chatml = load_hf_tokenizer(tok_dirs["qwen2"], chat_template="chatml")
    msgs = mask_messages([Message("user", "a"), Message("assistant", "b")])
    assert tok.tokenize_messages(msgs) == chatml.tokenize_messages(msgs)
    inline = load_hf_tokenizer(tok_dirs["qwen2"], chat_template=f.read_text())
    assert inline.tokenize_messages(msgs) == chatml.tokenize_messages(msgs)


def test_truncation_to_max_seq_len(tok_dirs):
    full = load_hf_tokenizer(tok_dirs["qwen2"])
    tok = load_hf_tokenizer(tok_dirs["qwen2"], max_seq_len=10)
    msgs = mask_messages([Message.from_dict(m) for m in CONVERSATIONS["multi_turn_system"]])
    ids, mask = tok.tokenize_messages(msgs)
    fids, fmask = full.tokenize_messages(msgs)
    assert (ids, mask) == (fids[:10], fmask[:10])
    ids, _ = tok.tokenize_messages(msgs, truncate_to_max_seq_len=False)
    assert ids == fids


# ------------------------------------------------------------------------------------------------------------ errors
def test_unknown_role_is_a_clear_error():
    with pytest.raises(DataError, match="unknown message role 'assistent'.*did you mean 'assistant'"):
        Message("assistent", "hi")
    with pytest.raises(DataError, match="unknown message role"):
        Message.from_dict({"role": "narrator", "content": "x"})
    assert Message.from_dict({"from": "human", "value": "x"}).role == "user"
    assert Message.from_dict({"from": "gpt", "value": "x"}).role == "assistant"


def test_message_errors(tok_dirs):
    tok = load_hf_tokenizer(tok_dirs["qwen2"])
    with pytest.raises(DataError, match="content must be a string"):
        Message("user", ["a", "b"])
    with pytest.raises(DataError, match="system message may only be the first"):
        tok.tokenize_messages([Message("user", "a"), Message("system", "b")])
    with pytest.raises(DataError, match="empty conversation"):
        tok.tokenize_messages([])
    with pytest.raises(DataError, match="not kdtune.data.Message"):
        tok.tokenize_messages([{"role": "user", "content": "x"}])


def test_template_errors(tok_dirs):
    tok = load_hf_tokenizer(tok_dirs["llama2"])
    with pytest.raises(DataError, match="chat template: Conversation roles must alternate"):
        tok.tokenize_messages([Message("user", "a"), Message("user", "b")])
    with pytest.raises(DataError, match="does not compile"):
        load_hf_tokenizer(tok_dirs["qwen2"], chat_template="{% for m in messages %}").tokenize_messages(
            [Message("user", "a")]
        )


def test_loader_errors(tmp_path, tok_dirs):
    with pytest.raises(DataError, match="does not exist"):
        load_hf_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"no tokenizer files found.*config.json"):
        load_hf_tokenizer(tmp_path / "empty")
    with pytest.raises(DataError, match="unknown chat format 'vicuna'"):
        load_hf_tokenizer(tok_dirs["qwen2"], chat_template="vicuna")
    with pytest.raises(DataError, match="chat format 'llama3' needs special token"):
        load_hf_tokenizer(tok_dirs["gpt2"], chat_template="llama3")
    bad = tmp_path / "bad"
    (bad / "original").mkdir(parents=True)
    (bad / "original" / "tokenizer.model").write_text("SGVsbG8= 0\nnot a line\n")
    with pytest.raises(DataError, match=r"tokenizer.model:2: not a tiktoken rank line"):
        load_hf_tokenizer(bad)
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(DataError, match="invalid JSON"):
        load_hf_tokenizer(tmp_path / "badjson")
    import shutil

    spm_json_only = tmp_path / "spm_json_only"
    shutil.copytree(tok_dirs["llama2"], spm_json_only, ignore=shutil.ignore_patterns("tokenizer.model"))
    with pytest.raises(DataError, match="not byte-level BPE .*Metaspace.*put the model's tokenizer.model next to it"):
        load_hf_tokenizer(spm_json_only)
    tok = load_hf_tokenizer(tok_dirs["gpt2"])
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.decode([10**6])
    with pytest.raises(DataError, match="expects a string"):
        tok.encode(None)


def test_get_chat_format_names():
    for name in ("llama3", "llama2", "mistral", "chatml", "qwen2", "qwen2_5", "zephyr", "plain", "gpt2", "tinyllama"):
        assert get_chat_format(name).name


def test_openai_content_parts():
    m = Message.from_dict({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})
    assert m.content == "ab"
    with pytest.raises(DataError, match=r"content parts of type \['image_url'\]"):
        Message.from_dict({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]})
