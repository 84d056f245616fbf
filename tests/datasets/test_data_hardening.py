"""Data files a user can get wrong: undecodable bytes (file and line named), empty files, nothing to train."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kdtune.data.datasets import chat_dataset, instruct_dataset, text_completion_dataset
from kdtune.data.datasets._load import check_text_file
from kdtune.errors import DataError


def chat_row(answer: str | None, question: str = "hi") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def test_undecodable_jsonl_names_file_and_line(tok, tmp_path: Path, cache_dir: str) -> None:
    good = jsonl_bytes([chat_row("yo"), chat_row("ok")])
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        good + b'{"messages": [{"role": "user", "content": "h\xff\xfei"}]}\n' + jsonl_bytes([chat_row("a")])
    )
    with pytest.raises(DataError) as e:
        chat_dataset(tok, source=str(path), cache_dir=cache_dir)
    assert str(e.value).startswith(f"data file {path} (key 'source') line 3 is not UTF-8 text (byte 0xff at column")
    with pytest.raises(DataError, match=r"\(key 'data_files'\) line 3 is not UTF-8"):
        chat_dataset(tok, source="json", data_files=str(path), cache_dir=cache_dir)


def test_undecodable_csv_names_file_and_line(tok, tmp_path: Path, cache_dir: str) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(b"instruction,input,output\nhi,,yo\nh\xe9llo,,latin-1 here\n")
    with pytest.raises(
        DataError, match=r"train.csv \(key 'source'\) line 3 is not UTF-8 text \(byte 0xe9 at column 2\)"
    ):
        instruct_dataset(tok, source=str(path), cache_dir=cache_dir)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf\n"])
def test_empty_data_file_is_named(tok, tmp_path: Path, cache_dir: str, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^data file {path} \(key 'source'\) (is empty|holds only blank lines)"):
        chat_dataset(tok, source=str(path), cache_dir=cache_dir)


def test_check_text_file_across_chunks_matches_a_line_by_line_reference(tmp_path: Path) -> None:
    rnd = random.Random(0)
    words = ["a", "é", "日本", "😀", "x" * 7, "ü"]
    lines = ["".join(rnd.choice(words) for _ in range(rnd.randint(0, 12))) for _ in range(300)]
    data = "\n".join(lines).encode("utf-8")
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    for chunk in (1, 3, 7, 64, 1 << 20):  # multi-byte characters split across reads are fine
        check_text_file(str(path), chunk_bytes=chunk)
    raw = data.split(b"\n")
    for bad_line in (1, 150, 300):
        broken = list(raw)
        broken[bad_line - 1] = broken[bad_line - 1] + b"\x80"
        path.write_bytes(b"\n".join(broken))
        # reference: the first line that does not decode on its own
        expected = next(i + 1 for i, line in enumerate(broken) if not _decodes(line))
        for chunk in (5, 64, 1 << 20):
            with pytest.raises(DataError, match=rf" line {expected} is not UTF-8"):
                check_text_file(str(path), chunk_bytes=chunk)


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_every_assistant_message_empty_is_refused(tok, tmp_path: Path, cache_dir: str) -> None:
    path = tmp_path / "noans.jsonl"
    path.write_bytes(jsonl_bytes([chat_row(""), chat_row(None), chat_row("   ")]))
    with pytest.raises(DataError) as e:
        chat_dataset(tok, source=str(path), cache_dir=cache_dir)
    assert "noans.jsonl" in str(e.value)
    assert "nothing to train: none of its 3 rows has an assistant (trained) message that is not empty or null" in str(
        e.value
    )
    # one real answer is enough (the empty ones train end-of-turn tokens, as before)
    path.write_bytes(jsonl_bytes([chat_row(""), chat_row(None), chat_row("fine")]))
    assert len(chat_dataset(tok, source=str(path), cache_dir=cache_dir)) == 3
    # training on the input too: the user turns are something to train
    path.write_bytes(jsonl_bytes([chat_row(""), chat_row(None)]))
    assert len(chat_dataset(tok, source=str(path), cache_dir=cache_dir, train_on_input=True)) == 2


def test_instruct_with_empty_outputs_is_refused(tok, write_jsonl, cache_dir: str) -> None:
    rows = [{"instruction": "say hi", "input": "", "output": ""}, {"instruction": "x", "input": "", "output": None}]
    with pytest.raises(DataError, match="nothing to train"):
        instruct_dataset(tok, source="json", data_files=write_jsonl(rows), cache_dir=cache_dir)


def test_text_completion_with_only_empty_texts_is_refused(tok, write_jsonl, cache_dir: str) -> None:
    with pytest.raises(DataError, match=r"nothing to train: column 'text' is empty or null in all 2 rows"):
        text_completion_dataset(
            tok, source="json", data_files=write_jsonl([{"text": ""}, {"text": None}]), cache_dir=cache_dir
        )
    ds = text_completion_dataset(
        tok, source="json", data_files=write_jsonl([{"text": ""}, {"text": "ab"}]), cache_dir=cache_dir
    )
    assert len(ds) == 2
