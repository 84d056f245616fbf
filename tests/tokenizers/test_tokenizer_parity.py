"""Token ids and decoding equal the references on generated tokenizer files of every kind.

References: ``transformers.AutoTokenizer`` on the same directory (tokenizer.json / vocab.json+merges.txt), ``tiktoken``
itself on the Llama 3 rank file, the ``sentencepiece`` library on ``tokenizer.model``.
"""

from __future__ import annotations

import base64
import unicodedata
import warnings

import pytest

from kdtune.data import Tokenizer, load_hf_tokenizer
from kdtune.data.tokenizers import ByteLevelBPETokenizer, SentencePieceTokenizer, TikTokenLlama3Tokenizer

transformers = pytest.importorskip("transformers")

LONG = (
    "Distillation at scale: the student learns from the teacher's logits. " * 150
    + "x = [i ** 2 for i in range(10)]\n" * 80
    + "　全角スペースと日本語。" * 60
    + "🙂" * 100
)
TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn x**2  # square\n\n\nclass A:\n    pass\n",
    "tabs\t\tand\r\nCRLF\r\n and   runs    of     spaces",
    "trailing spaces   ",
    "emoji 😀🚀✨👩‍👩‍👧 and CJK 日本語のテキスト 中文文本 한국어",
    "numbers 12345678 3.14159 1,000,000 2024-05-01",
    "naïve café Straße e\u0301 ﬁ Ĳ",
    "it's we'll they'D I'M you're",
    "",
    "\n",
    "\n\n\n",
    "a",
    LONG,
    "thequickbrownfoxjumpsoverthelazydog" * 150,  # one 5k-letter pre-token (the O(n log n) merge path)
]
SPECIAL_TEXTS = {
    "llama3": [
        "<|begin_of_text|>Hi<|eot_id|> there<|start_header_id|>user<|end_header_id|>\n\nx",
        "<|eot_id|>",
        "a<|reserved_special_token_100|>b",
    ],
    "qwen2": ["<|im_start|>user\nHi<|im_end|>\n<|endoftext|>", "x<|im_end|>y", "<|im_start|>"],
    "gpt2": ["Hi<|endoftext|>there<|endoftext|>", "<|endoftext|> a"],
    "llama2": ["Hello</s><s>world", "a <s> b </s> c", "<unk>x"],
}
KINDS = {
    "llama3": TikTokenLlama3Tokenizer,
    "llama3_json": ByteLevelBPETokenizer,
    "qwen2": ByteLevelBPETokenizer,
    "qwen2_vm": ByteLevelBPETokenizer,
    "gpt2": ByteLevelBPETokenizer,
    "llama2": SentencePieceTokenizer,
    "llama2_legacy": SentencePieceTokenizer,
}


def _hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(path))


def _spm_whitespace_edge(text: str, legacy: bool) -> bool:
    """Texts whose whitespace runs sit next to the dummy prefix: HF's converted tokenizer.json and sentencepiece
    (the model's real tokenizer, which splits whitespace runs off words) disagree there, so HF is not the reference
    for them. With legacy=True a segment after a special token gets a dummy prefix too, so "> x" is such a run."""
    return text.strip() == "" or text.startswith("  ") or "  " in text or "\t" in text or (legacy and "> " in text)


@pytest.mark.parametrize("kind", list(KINDS))
def test_loader_picks_kind(tok_dirs, kind):
    tok = load_hf_tokenizer(tok_dirs[kind])
    assert type(tok) is KINDS[kind]
    assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize("kind", list(KINDS))
def test_ids_equal_transformers(tok_dirs, kind):
    tok = load_hf_tokenizer(tok_dirs[kind])
    ref = _hf(tok_dirs[kind])
    family = kind.split("_")[0]
    texts = TEXTS + SPECIAL_TEXTS.get(family, [])
    compared = 0
    for text in texts:
        if tok.kind == "sentencepiece" and _spm_whitespace_edge(text, tok.legacy):
            continue
        expected = ref.encode(text, add_special_tokens=False)
        assert tok.encode(text, add_bos=False, add_eos=False) == expected, (kind, text[:80])
        # HF's default special tokens (BOS for Llama; nothing for Qwen2/GPT-2) == kdtune's add_bos
        assert tok.encode(text, add_bos=True, add_eos=False) == ref.encode(text), (kind, text[:80])
        compared += 1
    assert compared >= 8
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id if tok.bos_id is not None else None, ref.eos_token_id)


@pytest.mark.parametrize("kind", list(KINDS))
def test_decode_equals_transformers(tok_dirs, kind):
    tok = load_hf_tokenizer(tok_dirs[kind])
    ref = _hf(tok_dirs[kind])
    family = kind.split("_")[0]
    for text in TEXTS + SPECIAL_TEXTS.get(family, []):
        if tok.kind == "sentencepiece" and _spm_whitespace_edge(text, tok.legacy):
            continue
        ids = tok.encode(text, add_bos=True, add_eos=True)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (
                kind,
                skip,
                text[:60],
            )


@pytest.mark.parametrize("kind", list(KINDS))
def test_decode_round_trip(tok_dirs, kind):
    tok = load_hf_tokenizer(tok_dirs[kind])
    for text in TEXTS:
        expected = unicodedata.normalize("NFC", text) if kind.startswith("qwen2") else text
        assert tok.decode(tok.encode(text)) == expected, (kind, text[:60])
    # a cut multi-byte character decodes to U+FFFD instead of raising
    ids = tok.encode("😀", add_bos=False, add_eos=False)
    if len(ids) > 1:
        assert "\ufffd" in tok.decode(ids[:1])


def test_llama3_equals_tiktoken(tok_dirs):
    tiktoken = pytest.importorskip("tiktoken")
    rank_file = tok_dirs["llama3"] / "original" / "tokenizer.model"
    ranks = {
        base64.b64decode(t): int(r) for t, r in (line.split() for line in rank_file.read_text().splitlines() if line)
    }
    n = len(ranks)
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    enc = tiktoken.Encoding(
        "ref_llama3", pat_str=pattern, mergeable_ranks=ranks, special_tokens={s: n + i for i, s in enumerate(names)}
    )
    tok = load_hf_tokenizer(tok_dirs["llama3"])
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 9, n + 4)
    assert tok.stop_ids == sorted([n + 1, n + 8, n + 9])
    for text in TEXTS + SPECIAL_TEXTS["llama3"]:
        assert tok.encode(text, add_bos=False, add_eos=False) == enc.encode(text, allowed_special="all"), text[:60]
        assert tok.encode(text) == [n] + enc.encode(text, allowed_special="all") + [n + 9]


def test_sentencepiece_equals_library(tok_dirs):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(tok_dirs["llama2"] / "tokenizer.model"))
    tok = load_hf_tokenizer(tok_dirs["llama2"])
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, sp.get_piece_size())
    for text in TEXTS:  # every text, whitespace runs included: sentencepiece is the model's own tokenizer
        assert tok.encode(text, add_bos=False, add_eos=False) == sp.encode(text), text[:60]
        assert tok.encode(text) == [1] + sp.encode(text) + [2]
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_special_ids_and_config(tok_dirs):
    qwen = load_hf_tokenizer(tok_dirs["qwen2"])
    assert qwen.bos_id is None  # Qwen2 has no BOS
    assert qwen.eos_id == qwen.token_to_id("<|im_end|>")
    assert qwen.pad_id == qwen.token_to_id("<|endoftext|>")
    assert qwen.encode("hi", add_bos=True, add_eos=True)[-1] == qwen.eos_id
    gpt2 = load_hf_tokenizer(tok_dirs["gpt2"])
    assert gpt2.bos_id is None and gpt2.eos_id == gpt2.pad_id == gpt2.token_to_id("<|endoftext|>")
    assert load_hf_tokenizer(tok_dirs["llama3_json"]).encode("Hi there") == load_hf_tokenizer(
        tok_dirs["llama3"]
    ).encode("Hi there")
    tok = load_hf_tokenizer(tok_dirs["llama3"], max_seq_len=7)
    assert tok.max_seq_len == 7


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "gpt2", "llama2"])
def test_tokenizers_pickle(tok_dirs, kind):
    """DataLoader workers started with spawn pickle the dataset and its tokenizer."""
    import pickle

    tok = load_hf_tokenizer(tok_dirs[kind])
    clone = pickle.loads(pickle.dumps(tok))
    text = "Hello <|im_end|> world </s> <|eot_id|> café"
    assert clone.encode(text) == tok.encode(text)
    assert clone.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_gpt2_minimal_config_ids_from_generation_config(tmp_path, tok_dirs):
    """openai-community/gpt2 ships tokenizer_config.json = {"model_max_length": 1024} and no special_tokens_map: EOS
    comes from generation_config.json, and there is no BOS to add."""
    import json
    import shutil

    d = tmp_path / "gpt2_min"
    shutil.copytree(tok_dirs["gpt2"], d)
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (d / "special_tokens_map.json").unlink()
    tok = load_hf_tokenizer(d)
    eot = tok.token_to_id("<|endoftext|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, eot, eot)
    assert tok.chat_template is None and tok.chat_format.name == "plain"
    ref = _hf(d)
    assert tok.encode("Hi there", add_eos=False) == ref.encode("Hi there")


def test_torchtune_style_entry_points(tok_dirs):
    from kdtune.data.tokenizers import llama2_tokenizer, llama3_tokenizer, qwen2_tokenizer

    tok = llama3_tokenizer(tok_dirs["llama3"] / "original" / "tokenizer.model", max_seq_len=64)
    assert tok.kind == "tiktoken" and tok.max_seq_len == 64
    assert tok.encode("hi") == load_hf_tokenizer(tok_dirs["llama3"]).encode("hi")
    q = qwen2_tokenizer(tok_dirs["qwen2"] / "vocab.json", merges_file=tok_dirs["qwen2"] / "merges.txt")
    assert q.kind == "bpe" and q.eos_id == q.token_to_id("<|im_end|>")
    assert llama2_tokenizer(tok_dirs["llama2"] / "tokenizer.model").kind == "sentencepiece"
    from kdtune.errors import DataError

    with pytest.raises(DataError, match="llama2_tokenizer expects a sentencepiece tokenizer but found bpe"):
        llama2_tokenizer(tok_dirs["qwen2"])
