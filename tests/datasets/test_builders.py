"""Dataset builders on small local files: exact tokens/labels on hand-checked examples, file types, splits,
truncation, filtering, packing through the builder, and every user error."""

import json
import logging

import datasets
import pytest

from kdtune.data import (
    alpaca_cleaned_dataset,
    alpaca_dataset,
    chat_dataset,
    dolly_dataset,
    instruct_dataset,
    openorca_dataset,
    sft_dataset,
    slimorca_dataset,
    split_dataset,
    text_completion_dataset,
    ultrachat_dataset,
)
from kdtune.data.formats import ALPACA_PROMPT_NO_INPUT
from kdtune.errors import DataError

BOS, EOS, EOT, USER, ASSISTANT, SYSTEM = 1, 2, 8, 4, 5, 3
IGN = -100

PAIRS = [{"source": "hi", "target": "ok"}, {"source": "abc", "target": "xy"}, {"source": "q", "target": "answer"}]


def test_instruct_exact_tokens_and_labels(tok, chars, write_jsonl, cache_dir):
    ds = instruct_dataset(tok, source="json", data_files=write_jsonl(PAIRS), cache_dir=cache_dir)
    assert len(ds) == 3
    item = ds[0]
    # BOS <user> h i EOT <assistant> o k EOT EOS
    assert item["tokens"] == [BOS, USER, *chars("hi"), EOT, ASSISTANT, *chars("ok"), EOT, EOS]
    assert item["labels"] == [IGN, IGN, IGN, IGN, IGN, ASSISTANT, *chars("ok"), EOT, EOS]
    on_input = instruct_dataset(
        tok, source="json", data_files=write_jsonl(PAIRS), train_on_input=True, cache_dir=cache_dir
    )
    # BOS stays masked (the tokenizer masks it); everything else is trained
    assert on_input[0]["labels"] == [IGN] + on_input[0]["tokens"][1:]


def test_column_map_and_system_prompt(tok, chars, write_jsonl, cache_dir):
    path = write_jsonl([{"question": "hi", "answer": "ok"}])
    ds = instruct_dataset(
        tok,
        source="json",
        data_files=path,
        column_map={"source": "question", "target": "answer"},
        new_system_prompt="S",
        cache_dir=cache_dir,
    )
    assert ds[0]["tokens"] == [
        BOS,
        SYSTEM,
        *chars("S"),
        EOT,
        USER,
        *chars("hi"),
        EOT,
        ASSISTANT,
        *chars("ok"),
        EOT,
        EOS,
    ]
    assert ds[0]["labels"][:8] == [IGN] * 8


@pytest.mark.parametrize("kind", ["json_array", "csv", "parquet", "arrow", "local_path_csv"])
def test_file_types(tok, tmp_path, kind, cache_dir):
    ref = datasets.Dataset.from_list(PAIRS)
    if kind == "json_array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(PAIRS))
        source, files = "json", str(path)
    elif kind in ("csv", "local_path_csv"):
        path = tmp_path / "d.csv"
        ref.to_csv(str(path), index=False)
        source, files = ("csv", str(path)) if kind == "csv" else (str(path), None)
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        ref.to_parquet(str(path))
        source, files = "parquet", str(path)
    else:
        ref.save_to_disk(str(tmp_path / "saved"))
        files = [str(p) for p in sorted((tmp_path / "saved").glob("*.arrow"))]
        source = "arrow"
    ds = instruct_dataset(tok, source=source, data_files=files, cache_dir=cache_dir)
    assert [tok.decode(x["tokens"]) for x in ds] == [p["source"] + p["target"] for p in PAIRS]


def test_csv_empty_cells_are_empty_text(tok, tmp_path, chars, cache_dir):
    path = tmp_path / "alpaca.csv"
    path.write_text("instruction,input,output\nHi.,,Yo\n")
    ds = alpaca_dataset(tok, source=str(path), cache_dir=cache_dir)
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Hi.")
    assert ds[0]["tokens"] == [BOS, USER, *chars(prompt), EOT, ASSISTANT, *chars("Yo"), EOT, EOS]


def test_save_to_disk_dir_and_slicing(tok, tmp_path):
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "saved"))
    ds = sft_dataset(tok, str(tmp_path / "saved"), split="train[1:]")
    assert [tok.decode(x["tokens"]) for x in ds] == ["abcxy", "qanswer"]


def test_split_slicing(tok, write_jsonl, cache_dir):
    ds = instruct_dataset(tok, source="json", data_files=write_jsonl(PAIRS), split="train[:2]", cache_dir=cache_dir)
    assert len(ds) == 2
    ds = instruct_dataset(tok, source="json", data_files=write_jsonl(PAIRS), split="train[-1:]", cache_dir=cache_dir)
    assert tok.decode(ds[0]["tokens"]) == "qanswer"


def test_named_builders_on_local_files(tok, chars, write_jsonl, cache_dir):
    alpaca = write_jsonl([{"instruction": "Hi.", "input": "", "output": "Yo", "text": "ignored"}], "alpaca.jsonl")
    for builder in (alpaca_dataset, alpaca_cleaned_dataset):
        ds = builder(tok, source="json", data_files=alpaca, cache_dir=cache_dir)
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Hi.")
        assert ds[0]["tokens"] == [BOS, USER, *chars(prompt), EOT, ASSISTANT, *chars("Yo"), EOT, EOS]
    orca = write_jsonl([{"id": "1", "system_prompt": "Sy", "question": "Q", "response": "R"}], "orca.jsonl")
    ds = openorca_dataset(tok, source="json", data_files=orca, cache_dir=cache_dir)
    assert ds[0]["tokens"] == [BOS, SYSTEM, *chars("Sy"), EOT, USER, *chars("Q"), EOT, ASSISTANT, *chars("R"), EOT, EOS]
    dolly = write_jsonl([{"instruction": "I", "context": "C", "response": "R", "category": "qa"}], "dolly.jsonl")
    ds = dolly_dataset(tok, source="json", data_files=dolly, cache_dir=cache_dir)
    assert tok.decode(ds[0]["tokens"]) == "I\n\nCR"
    chat = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    uc = write_jsonl([{"prompt": "u", "prompt_id": "0", "messages": chat}], "uc.jsonl")
    ds = ultrachat_dataset(tok, source="json", data_files={"train_sft": uc}, cache_dir=cache_dir)
    assert ds[0]["labels"] == [IGN] * 4 + [ASSISTANT, *chars("a"), EOT, EOS]
    slim = write_jsonl([{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}], "s.jsonl")
    assert slimorca_dataset(tok, source="json", data_files=slim, cache_dir=cache_dir)[0] == ds[0]


def test_chat_multi_turn_masking(tok, chars, write_jsonl, cache_dir):
    conv = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    path = write_jsonl([{"messages": conv}])
    seg_u1, seg_a1 = [USER, *chars("u1"), EOT], [ASSISTANT, *chars("a1"), EOT]
    seg_u2, seg_a2 = [USER, *chars("u2"), EOT], [ASSISTANT, *chars("a2"), EOT]
    all_a = chat_dataset(tok, source="json", data_files=path, cache_dir=cache_dir)[0]
    assert all_a["tokens"] == [BOS, *seg_u1, *seg_a1, *seg_u2, *seg_a2, EOS]
    assert all_a["labels"] == [IGN, *[IGN] * 4, *seg_a1, *[IGN] * 4, *seg_a2, EOS]
    last = chat_dataset(tok, source="json", data_files=path, masking="last_assistant", cache_dir=cache_dir)[0]
    assert last["labels"] == [IGN] * 13 + [*seg_a2, EOS]
    # the same conversation given ShareGPT-style in another column
    sg = [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in conv]
    path2 = write_jsonl([{"dialog": sg}], "sg.jsonl")
    other = chat_dataset(
        tok,
        source="json",
        data_files=path2,
        conversation_style="sharegpt",
        conversation_column="dialog",
        cache_dir=cache_dir,
    )
    assert other[0] == all_a


def test_sft_dataset_autodetect_logs(tok, write_jsonl, caplog, cache_dir):
    path = write_jsonl([{"prompt": "p", "completion": "c"}])
    with caplog.at_level(logging.INFO, logger="kdtune.data"):
        ds = sft_dataset(tok, "json", data_files=path, cache_dir=cache_dir)
    assert "Detected dataset format 'prompt_completion'" in caplog.text
    assert tok.decode(ds[0]["tokens"]) == "pc"
    text = write_jsonl([{"text": "plain"}], "t.jsonl")
    ds = sft_dataset(tok, "json", data_files=text, cache_dir=cache_dir)
    assert ds[0]["tokens"] == ds[0]["labels"] == tok.encode("plain")


def test_text_completion(tok, chars, write_jsonl, cache_dir):
    path = write_jsonl([{"body": "abc"}, {"body": "de"}])
    ds = text_completion_dataset(tok, source="json", data_files=path, column="body", cache_dir=cache_dir)
    assert ds[0] == {"tokens": [BOS, *chars("abc"), EOS], "labels": [BOS, *chars("abc"), EOS]}
    ds = text_completion_dataset(tok, source="json", data_files=path, column="body", add_eos=False, cache_dir=cache_dir)
    assert ds[1]["tokens"] == [BOS, *chars("de")]
    with pytest.raises(DataError, match=r"no column 'text'; columns present: \['body'\]; set column="):
        text_completion_dataset(tok, source="json", data_files=path, cache_dir=cache_dir)


def test_truncation_warns_once_with_count(tok, write_jsonl, caplog, cache_dir):
    rows = [{"source": "a" * 20, "target": "b"}, {"source": "c", "target": "d"}, {"source": "e", "target": "f" * 30}]
    path = write_jsonl(rows)
    with caplog.at_level(logging.WARNING, logger="kdtune.data"):
        ds = instruct_dataset(tok, source="json", data_files=path, max_seq_len=12, cache_dir=cache_dir)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    # row 0: 27 tokens, its response cut away entirely -> dropped; row 2: 37 tokens -> truncated, kept
    assert "2 of 3 examples" in msg and "max_seq_len=12" in msg and "longest: 37 tokens" in msg
    assert "1 examples had no trained token left and were dropped" in msg
    assert len(ds) == 2 and [len(x["tokens"]) for x in ds] == [8, 12]
    assert ds.num_truncated == 2 and ds.num_dropped == 1
    # the tokenizer's own max_seq_len is the default
    tok.max_seq_len = 12
    assert len(instruct_dataset(tok, source="json", data_files=path, cache_dir=cache_dir)) == 2


def test_lazy_matches_eager(tok, write_jsonl, caplog, cache_dir):
    path = write_jsonl(PAIRS)
    eager = instruct_dataset(tok, source="json", data_files=path, max_seq_len=10, cache_dir=cache_dir)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdtune.data"):
        lazy = instruct_dataset(tok, source="json", data_files=path, max_seq_len=10, lazy=True, cache_dir=cache_dir)
        items = [lazy[i] for i in range(len(lazy))] + [lazy[2]]
    assert items[:3] == [eager[i] for i in range(3)]
    assert lazy.num_truncated == 2 and sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_lazy_is_automatic_for_large_datasets(tok, write_jsonl, monkeypatch, cache_dir):
    from kdtune.data.datasets import _sft

    monkeypatch.setattr(_sft, "EAGER_MAX_ROWS", 2)
    path = write_jsonl(PAIRS)
    assert instruct_dataset(tok, source="json", data_files=path, cache_dir=cache_dir).lazy
    assert not instruct_dataset(tok, source="json", data_files=path, lazy=False, cache_dir=cache_dir).lazy
    assert (
        len(instruct_dataset(tok, source="json", data_files=path, packed=True, max_seq_len=64, cache_dir=cache_dir))
        == 1
    )
    # rows are still checked at start-up in lazy mode
    bad = write_jsonl([*PAIRS, {"source": 1, "target": "x"}], "bad.jsonl")
    with pytest.raises(DataError, match="row 3: column 'source' should hold text"):
        instruct_dataset(tok, source="json", data_files=bad, cache_dir=cache_dir)


def test_validation_split_is_deterministic_and_disjoint(tok, write_jsonl, cache_dir):
    rows = [{"source": f"s{i}", "target": f"t{i}"} for i in range(20)]
    path = write_jsonl(rows)
    kw = dict(source="json", data_files=path, val_split_ratio=0.25, val_split_seed=3, cache_dir=cache_dir)
    train = [tok.decode(x["tokens"]) for x in instruct_dataset(tok, **kw)]
    val = [tok.decode(x["tokens"]) for x in instruct_dataset(tok, subset="validation", **kw)]
    assert len(train) == 15 and len(val) == 5
    assert sorted(train + val) == sorted(f"s{i}t{i}" for i in range(20))
    assert val == [tok.decode(x["tokens"]) for x in instruct_dataset(tok, subset="validation", **kw)]
    kw["val_split_seed"] = 4
    assert val != [tok.decode(x["tokens"]) for x in instruct_dataset(tok, subset="validation", **kw)]
    # a separate split of the source as the validation set
    dev = write_jsonl(rows[:2], "dev.jsonl")
    ds = instruct_dataset(
        tok,
        source="json",
        data_files={"train": path, "dev": dev},
        eval_split="dev",
        subset="validation",
        cache_dir=cache_dir,
    )
    assert len(ds) == 2
    with pytest.raises(DataError, match="needs a held-out set"):
        instruct_dataset(tok, source="json", data_files=path, subset="validation", cache_dir=cache_dir)
    a, b = split_dataset(list(range(10)), 0.3, seed=0)
    assert sorted(list(a) + list(b)) == list(range(10)) and len(b) == 3


def test_filter_fn(tok, write_jsonl, cache_dir):
    path = write_jsonl(PAIRS)
    ds = instruct_dataset(
        tok, source="json", data_files=path, filter_fn=lambda r: len(r["target"]) > 2, cache_dir=cache_dir
    )
    assert [tok.decode(x["tokens"]) for x in ds] == ["qanswer"]
    ds = instruct_dataset(tok, source="json", data_files=path, filter_fn="builtins.bool", cache_dir=cache_dir)
    assert len(ds) == 3
    with pytest.raises(DataError, match=r"empty after filter_fn \(3 rows before filtering\)"):
        instruct_dataset(tok, source="json", data_files=path, filter_fn=lambda r: False, cache_dir=cache_dir)
    with pytest.raises(DataError, match="cannot import 'nope.fn' \\(key 'filter_fn'\\)"):
        instruct_dataset(tok, source="json", data_files=path, filter_fn="nope.fn", cache_dir=cache_dir)


def test_packed_builder(tok, write_jsonl, cache_dir):
    ds = instruct_dataset(
        tok, source="json", data_files=write_jsonl(PAIRS), packed=True, max_seq_len=24, cache_dir=cache_dir
    )
    # lengths 10, 11, 13 -> [10 + 11 + 3 pad], [13 + 11 pad]
    assert len(ds) == 2
    assert ds[0]["document_ids"] == [0] * 10 + [1] * 11 + [2] * 3
    assert ds[1]["input_pos"] == list(range(13)) + list(range(11))
    long_text = write_jsonl([{"text": "x" * 30}], "long.jsonl")
    packed_text = text_completion_dataset(
        tok, source="json", data_files=long_text, packed=True, max_seq_len=16, cache_dir=cache_dir
    )
    assert len(packed_text) == 2  # 32 tokens, not truncated, continued across two packs


def test_errors(tok, tmp_path, write_jsonl, cache_dir):
    path = write_jsonl([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"could not detect the format .*\['question', 'answer'\].*column_map"):
        instruct_dataset(tok, source="json", data_files=path, cache_dir=cache_dir)
    with pytest.raises(
        DataError,
        match=r"has no column 'instruction' needed by format 'alpaca'; columns present: "
        r"\['question', 'answer'\]; point it at yours with column_map",
    ):
        alpaca_dataset(tok, source="json", data_files=path, cache_dir=cache_dir)
    with pytest.raises(DataError, match="unknown dataset format 'foo'"):
        sft_dataset(tok, "json", data_files=path, format="foo", cache_dir=cache_dir)
    with pytest.raises(DataError, match="'text' is a text format; this builder takes instruct formats"):
        instruct_dataset(tok, source="json", data_files=path, format="text", cache_dir=cache_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "c", "target": \n{"source": "e", "target": "f"}\n')
    with pytest.raises(DataError, match=rf"malformed JSON in {bad} line 2: Expecting value"):
        instruct_dataset(tok, source="json", data_files=str(bad), cache_dir=cache_dir)
    role = write_jsonl([{"messages": [{"role": "wizard", "content": "x"}]}], "role.jsonl")
    with pytest.raises(DataError, match=r"row 0: messages\[0\] has unknown role 'wizard'"):
        chat_dataset(tok, source="json", data_files=role, cache_dir=cache_dir)
    with pytest.raises(DataError, match="data file '.*missing.jsonl' \\(key 'data_files'\\) does not exist"):
        instruct_dataset(tok, source="json", data_files=str(tmp_path / "missing.jsonl"), cache_dir=cache_dir)
    with pytest.raises(DataError, match="source 'json' needs data_files"):
        instruct_dataset(tok, source="json", cache_dir=cache_dir)
    with pytest.raises(DataError, match="could not load dataset .*split 'validation'"):
        instruct_dataset(tok, source="json", data_files=write_jsonl(PAIRS), split="validation", cache_dir=cache_dir)
    no_answer = write_jsonl([{"messages": [{"role": "user", "content": "x"}]}], "noans.jsonl")
    with pytest.raises(DataError, match="nothing to train: none of its 1 rows has an assistant"):
        chat_dataset(tok, source="json", data_files=no_answer, cache_dir=cache_dir)


def test_builders_as_config_components(tok, write_jsonl, cache_dir):
    from omegaconf import OmegaConf

    from kdtune.config import instantiate, validate

    path = write_jsonl([{"q": "hi", "a": "ok"}])
    node = OmegaConf.create(
        {
            "dataset": {
                "_component_": "kdtune.data.instruct_dataset",
                "source": "json",
                "data_files": [path],
                "column_map": {"source": "q", "target": "a"},
                "cache_dir": cache_dir,
            }
        }
    )
    assert validate(node) == []
    ds = instantiate(node.dataset, tok)
    assert tok.decode(ds[0]["tokens"]) == "hiok"


def test_num_proc_matches_serial(tok, write_jsonl, caplog, cache_dir):
    rows = [{"source": "s" * (i % 7), "target": "t" * (1 + i % 5)} for i in range(40)]
    path = write_jsonl(rows)
    kw = dict(source="json", data_files=path, max_seq_len=12, cache_dir=cache_dir)
    serial = instruct_dataset(tok, **kw)
    caplog.clear()
    parallel = instruct_dataset(tok, num_proc=2, **kw)
    assert [parallel[i] for i in range(len(parallel))] == [serial[i] for i in range(len(serial))]
    assert (parallel.num_truncated, parallel.num_dropped) == (serial.num_truncated, serial.num_dropped)
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    chat = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}] * 40
    bad = write_jsonl([*chat, {"messages": []}], "bad.jsonl")
    with pytest.raises(DataError, match="row 40: column 'messages' holds an empty conversation"):
        chat_dataset(tok, source="json", data_files=bad, num_proc=2, cache_dir=cache_dir)


def test_errors_name_the_row_of_the_file_after_filtering(tok, write_jsonl, cache_dir):
    ok = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "keep": True}
    skip = {**ok, "keep": False}
    bad = {"messages": [{"role": "wizard", "content": "x"}], "keep": True}
    path = write_jsonl([ok, skip, skip, bad])
    with pytest.raises(DataError, match=r"row 3: messages\[0\] has unknown role 'wizard'"):
        chat_dataset(tok, source="json", data_files=path, filter_fn=lambda r: r["keep"], cache_dir=cache_dir)
