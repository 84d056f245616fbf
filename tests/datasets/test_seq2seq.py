"""Seq2seq data: T5 (sentencepiece unigram, ``spiece.model``) and BART (byte-level BPE, RobertaProcessing) tokenizers
load via load_hf_tokenizer with the ids of the ``tokenizers``/``transformers`` references; seq2seq_dataset layouts,
column_map, truncation report; padded_collate with encoder_tokens."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kdtune.data import load_hf_tokenizer, padded_collate, seq2seq_dataset
from kdtune.errors import DataError

tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Summarize: the article says 42 things about café and naïve users!",
    "translate English to German: hello world, how are you?",
    "Numbers 12345 and 3.14 appear here; so do (brackets) and 'quotes'.",
    "Databricks Dolly has instruction, context and response columns.",
] * 20
TEXTS = [
    "Hello wörld 123, fox!",
    "The  quick\tbrown   fox",
    "café naïve <extra_id_0> tail",
    " leading and trailing spaces ",
    "summarize: Numbers 98765 jumped (over) 'the' dog.",
    "unseen ÄÖÜ ß 漢字 emoji 🙂",
]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if b < 0x80:
            return value, pos


def _length_delimited(buf: bytes, want: int) -> bytes:
    """Payload of the first length-delimited field ``want`` of a protobuf message (no protobuf package needed)."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 2:
            n, pos = _varint(buf, pos)
            if tag >> 3 == want:
                return buf[pos : pos + n]
            pos += n
        elif wire == 0:
            _, pos = _varint(buf, pos)
        else:
            pos += 8 if wire == 1 else 4
    raise AssertionError(f"field {want} not found")


def _precompiled_charsmap(model: bytes) -> bytes:
    """ModelProto.normalizer_spec (field 3) .precompiled_charsmap (field 2)."""
    return _length_delimited(_length_delimited(model, 3), 2)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("t5tok")
    (d / "c.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "c.txt"),
        model_prefix=str(d / "sp"),
        vocab_size=150,
        model_type="unigram",
        normalization_rule_name="nmt_nfkc",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(d / "sp.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    charsmap = _precompiled_charsmap((d / "sp.model").read_bytes())
    # the transformers-5 T5 tokenizer (tokenizers Unigram + the model's normalizer), as its converter builds it
    ref = transformers.T5Tokenizer(vocab=vocab, extra_ids=5, _spm_precompiled_charsmap=charsmap)
    out = d / "model"
    ref.save_pretrained(out)
    (out / "spiece.model").write_bytes((d / "sp.model").read_bytes())
    (out / "config.json").write_text(json.dumps({"model_type": "t5", "decoder_start_token_id": 0}))
    return out


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    out = tmp_path_factory.mktemp("barttok")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "BartTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_prefix_space": False,
            }
        )
    )
    (out / "config.json").write_text(json.dumps({"model_type": "bart", "decoder_start_token_id": 2}))
    return out


def test_t5_tokenizer_matches_transformers(t5_dir: Path) -> None:
    ours = load_hf_tokenizer(t5_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(t5_dir))
    assert ours.bos_id is None and ours.eos_id == 1 and ours.pad_id == 0 and ours.decoder_start_id == 0
    for text in TEXTS:
        assert ours.encode(text, add_bos=True, add_eos=True) == ref(text).input_ids, text


def test_bart_tokenizer_matches_tokenizers(bart_dir: Path) -> None:
    ours = load_hf_tokenizer(bart_dir)
    ref = tokenizers.Tokenizer.from_file(str(bart_dir / "tokenizer.json"))
    assert ours.bos_id == 0 and ours.eos_id == 2 and ours.pad_id == 1 and ours.decoder_start_id == 2
    for text in TEXTS:
        assert ours.encode(text, add_bos=True, add_eos=True) == ref.encode(text).ids, text
        assert ours.decode(ref.encode(text).ids) == ref.decode(ref.encode(text).ids)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_dolly_layout_and_item_contract(tmp_path: Path, bart_dir: Path) -> None:
    tok = load_hf_tokenizer(bart_dir)
    rows = [
        {
            "instruction": "Summarize the text.",
            "context": "The quick brown fox.",
            "response": "A fox.",
            "category": "x",
        },
        {"instruction": "Say hello", "context": "", "response": "hello world"},
    ]
    ds = seq2seq_dataset(tok, source="json", data_files=str(_write(tmp_path / "d.jsonl", rows)))
    assert len(ds) == 2
    item = ds[0]
    assert item["encoder_tokens"] == tok.encode("Summarize the text.\n\nThe quick brown fox.", True, True)
    target = tok.encode("A fox.", True, True)
    assert item["tokens"] == [2, *target] and item["labels"] == [-100, *target]
    assert ds[1]["encoder_tokens"] == tok.encode("Say hello", True, True)  # empty context: no blank line


@pytest.mark.parametrize(
    "row,column_map",
    [
        ({"input": "in text", "output": "out text"}, None),
        ({"document": "in text", "summary": "out text"}, None),
        ({"article": "in text", "highlights": "out text"}, None),
        ({"q": "in text", "a": "out text"}, {"source": "q", "target": "a"}),
    ],
)
def test_layouts_and_column_map(tmp_path: Path, t5_dir: Path, row: dict, column_map: dict | None) -> None:
    tok = load_hf_tokenizer(t5_dir)
    ds = seq2seq_dataset(
        tok,
        source="json",
        data_files=str(_write(tmp_path / "d.jsonl", [row])),
        column_map=column_map,
        source_prefix="summarize: ",
    )
    assert ds[0]["encoder_tokens"] == tok.encode("summarize: in text", True, True)
    assert ds[0]["encoder_tokens"][-1] == 1 and ds[0]["tokens"][0] == 0  # T5: </s> appended, start = pad
    assert ds[0]["labels"][1:] == tok.encode("out text", True, True)


def test_truncation_reported_once_and_eos_kept(tmp_path: Path, t5_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = load_hf_tokenizer(t5_dir)
    long = " ".join(["quick brown fox"] * 10)
    rows = [{"source": long, "target": long}, {"source": "fox", "target": "dog"}, {"source": long, "target": "x"}]
    with caplog.at_level(logging.WARNING, logger="kdtune.data"):
        ds = seq2seq_dataset(
            tok, source="json", data_files=str(_write(tmp_path / "d.jsonl", rows)), max_source_len=6, max_target_len=5
        )
    assert ds.num_truncated_source == 2 and ds.num_truncated_target == 1 and ds.num_truncated == 2
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3 sources" in warnings[0].getMessage()
    assert len(ds[0]["encoder_tokens"]) == 6 and ds[0]["encoder_tokens"][-1] == tok.eos_id
    assert len(ds[0]["labels"]) == 6 and ds[0]["labels"][-1] == tok.eos_id


def test_errors_are_one_clear_line(tmp_path: Path, t5_dir: Path) -> None:
    tok = load_hf_tokenizer(t5_dir)
    path = str(_write(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}]))
    with pytest.raises(DataError, match="column_map"):
        seq2seq_dataset(tok, source="json", data_files=path)
    with pytest.raises(DataError, match="not found"):
        seq2seq_dataset(tok, source="json", data_files=path, column_map={"source": "question", "target": "nope"})
    del tok.decoder_start_id
    with pytest.raises(DataError, match="decoder_start_id"):
        seq2seq_dataset(tok, source="json", data_files=path, column_map={"source": "question", "target": "answer"})


def test_padded_collate_pads_encoder_tokens() -> None:
    batch = [
        {"encoder_tokens": [5, 6, 7, 1], "tokens": [0, 8, 1], "labels": [-100, 8, 1]},
        {"encoder_tokens": [9, 1], "tokens": [0, 4, 5, 1], "labels": [-100, 4, 5, 1]},
    ]
    out = padded_collate(batch, pad_id=0)
    assert out["encoder_tokens"].tolist() == [[5, 6, 7, 1], [9, 1, 0, 0]]
    assert out["encoder_padding_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert out["encoder_padding_mask"].dtype == torch.bool
    assert out["tokens"].tolist() == [[0, 8, 1, 0], [0, 4, 5, 1]]
    assert out["labels"].tolist() == [[-100, 8, 1, -100], [-100, 4, 5, 1]]
