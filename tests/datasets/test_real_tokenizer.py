"""Integration with kdtune's real tokenizers (a generated Qwen2-style byte-level BPE with its ChatML template)."""

import pytest

from kdtune.data import chat_dataset, instruct_dataset
from kdtune.data.messages import Message

testing_tok = pytest.importorskip("kdtune.testing.tokenizers")
load_hf_tokenizer = pytest.importorskip("kdtune.data.tokenizers").load_hf_tokenizer


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return testing_tok.write_bpe_tokenizer(tmp_path_factory.mktemp("qwen_tok"), vocab_size=300, style="qwen2")


def test_chat_dataset_with_chatml(qwen_dir, write_jsonl, cache_dir):
    tok = load_hf_tokenizer(qwen_dir)
    conv = [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42."},
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "2, of course."},
    ]
    ds = chat_dataset(tok, source="json", data_files=write_jsonl([{"messages": conv}]), cache_dir=cache_dir)
    item = ds[0]
    ids, mask = tok.tokenize_messages([Message(**m, masked=m["role"] != "assistant") for m in conv], add_eos=True)
    assert item["tokens"] == ids
    # exactly the assistant turns (content + end-of-turn token) are trained
    trained = [t for t, lab in zip(item["tokens"], item["labels"]) if lab != -100]
    assert item["labels"] == [-100 if m else t for t, m in zip(ids, mask)]
    text = tok.decode(trained, skip_special_tokens=False)
    assert "42." in text and "2, of course." in text and "What is" not in text and "And 1" not in text
    assert text.count("<|im_end|>") == 2


def test_truncation_not_hidden_by_tokenizer(qwen_dir, write_jsonl, cache_dir, caplog):
    tok = load_hf_tokenizer(qwen_dir, max_seq_len=16)
    rows = [{"source": "Knowledge distillation " * 5, "target": "trains a small student."}]
    ds = instruct_dataset(tok, source="json", data_files=write_jsonl(rows), train_on_input=True, cache_dir=cache_dir)
    assert len(ds[0]["tokens"]) == 16 and ds.num_truncated == 1
    assert "1 of 1 examples" in caplog.text


@pytest.mark.parametrize("kind", ["qwen2_bpe", "llama3_tiktoken", "tinyllama_sentencepiece"])
def test_chat_dataset_tokens_equal_hf_chat_template(kind, tmp_path, write_jsonl, cache_dir):
    """The tokens a chat dataset yields equal transformers' `apply_chat_template` of the same conversation."""
    transformers = pytest.importorskip("transformers")
    writers = {
        "qwen2_bpe": lambda d: testing_tok.write_bpe_tokenizer(d, style="qwen2"),
        "llama3_tiktoken": testing_tok.write_tiktoken_llama3_tokenizer,
        "tinyllama_sentencepiece": lambda d: testing_tok.write_sentencepiece_tokenizer(d, style="tinyllama"),
    }
    tok_dir = writers[kind](tmp_path / kind)
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42."},
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "2, of course."},
    ]
    ds = chat_dataset(
        load_hf_tokenizer(tok_dir), source="json", data_files=write_jsonl([{"messages": conv}]), cache_dir=cache_dir
    )
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir)).apply_chat_template(conv, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert ds[0]["tokens"] == list(ref)


def test_template_error_names_the_row(tmp_path, write_jsonl, cache_dir):
    """Mistral's template rejects a system turn; the error says which row of which file."""
    from kdtune.errors import DataError

    tok = load_hf_tokenizer(testing_tok.write_sentencepiece_tokenizer(tmp_path / "mistral", style="mistral"))
    ok = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "system", "content": "s"}, *ok["messages"]]}
    path = write_jsonl([ok, bad])
    with pytest.raises(DataError, match=r"data.jsonl \(split 'train'\) row 1: .*"):
        chat_dataset(tok, source="json", data_files=path, cache_dir=cache_dir)
