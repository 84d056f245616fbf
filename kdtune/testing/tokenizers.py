"""Write small but real tokenizer directories (the files an HF repo of each family has) for tests and the quickstart.

No network and no ``transformers``: the sentencepiece library trains the sentencepiece model; a small byte-level BPE
trainer here learns merges for the tiktoken and byte-level BPE kinds. The written directories load with kdtune's
``load_hf_tokenizer`` and with HF ``AutoTokenizer`` / ``tokenizers`` (used as references in kdtune's tests).
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import regex

from kdtune.data.tokenizers.bpe import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, bytes_to_unicode
from kdtune.data.tokenizers.tiktoken_llama3 import llama3_special_tokens
from kdtune.fsio import atomic_write_file

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DIALOGPT_CHAT_TEMPLATE = "{% for message in messages %}{{ message.content }}{{ eos_token }}{% endfor %}"
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

DEFAULT_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student model to match a large teacher model.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "User: What is 12 + 30?\nAssistant: 12 + 30 = 42.",
    "Hello, world! Hello again; hello once more.",
    "import torch\nx = torch.zeros(4, 8)\nfor i in range(10):\n\tx += i\n",
    "Temperature scaling softens the teacher's distribution: p = softmax(z / T).",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159",
    "Él está aquí. Ça va? Straße, naïve café, résumé.",
    "日本語のテキストと中文文本。 Emoji: 😀🚀✨",
)


def _atomic_write(path: Path, data: str | bytes) -> None:
    atomic_write_file(path, data)  # umask modes (mkstemp would leave 0o600 files)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def train_byte_bpe(corpus: Sequence[str], pattern: str, num_merges: int) -> list[tuple[bytes, bytes]]:
    """Learn up to ``num_merges`` byte-level BPE merges on ``corpus`` (pre-tokenized with ``pattern``).

    Deterministic: the most frequent adjacent pair wins, ties broken by the smallest pair. A pair whose result is
    already a token is skipped, so every learned token has exactly one merge (which keeps the tiktoken rank file and
    the HF merges list equivalent).

    Returns:
        The merges, in order, as ``(left_bytes, right_bytes)``.
    """
    rx = regex.compile(pattern)
    words: Counter[tuple[bytes, ...]] = Counter()
    for text in corpus:
        for piece in rx.findall(text):
            words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    known = {bytes([b]) for b in range(256)}
    merges: list[tuple[bytes, bytes]] = []
    banned: set[tuple[bytes, bytes]] = set()
    while len(merges) < num_merges:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for w, c in words.items():
            for i in range(len(w) - 1):
                pairs[(w[i], w[i + 1])] += c
        best = None
        for pair, _c in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
            if pair in banned:
                continue
            if pair[0] + pair[1] in known:
                banned.add(pair)
                continue
            best = pair
            break
        if best is None:
            break
        merges.append(best)
        known.add(best[0] + best[1])
        a, b = best
        new_words: Counter[tuple[bytes, ...]] = Counter()
        for w, c in words.items():
            if len(w) < 2:
                new_words[w] += c
                continue
            out: list[bytes] = []
            i = 0
            while i < len(w):
                if i < len(w) - 1 and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


def _byte_vocab_order() -> list[int]:
    """Byte values in GPT-2 vocabulary order (printable bytes first), as GPT-2/Qwen vocab.json number them."""
    return list(bytes_to_unicode().keys())


def _u(b: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def _added_token_entry(i: int, content: str, special: bool = True) -> dict[str, Any]:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _byte_level(use_regex: bool, trim_offsets: bool = False) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": trim_offsets, "use_regex": use_regex}


def _bpe_model(vocab: dict[str, int], merges: list[str], ignore_merges: bool) -> dict[str, Any]:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": "",
        "end_of_word_suffix": "",
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": ignore_merges,
        "vocab": vocab,
        "merges": merges,
    }


def _all_split_merges(ranks: dict[bytes, int]) -> list[str]:
    """HF-style merges from tiktoken ranks: every split of every token into two tokens, ordered by the token's rank."""
    merges: list[tuple[int, int, int, str]] = []
    for tok, r in ranks.items():
        if len(tok) < 2:
            continue
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in ranks and right in ranks:
                merges.append((r, ranks[left], ranks[right], f"{_u(left)} {_u(right)}"))
    merges.sort()
    return [m[3] for m in merges]


def write_tiktoken_llama3_tokenizer(
    out_dir: str | Path,
    corpus: Sequence[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    instruct: bool = True,
    model_max_length: int = 131072,
) -> Path:
    """Write a Llama 3 style tokenizer: ``original/tokenizer.model`` (tiktoken ranks), ``tokenizer.json``,
    ``tokenizer_config.json`` (with the Llama 3 chat template), ``special_tokens_map.json`` and
    ``generation_config.json``.

    Args:
        out_dir: directory to write (created).
        corpus: texts to learn the merges from.
        vocab_size: base vocabulary size (all 256 bytes + learned merges); the 256 special tokens follow it.
        instruct: EOS is ``<|eot_id|>`` (instruct) instead of ``<|end_of_text|>`` (base).
        model_max_length: written to ``tokenizer_config.json``.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    merges = train_byte_bpe(corpus, LLAMA3_PATTERN, max(0, vocab_size - 256))
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for a, b in merges:
        ranks[a + b] = len(ranks)
    n_base = len(ranks)
    lines = [f"{base64.b64encode(tok).decode()} {r}" for tok, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    _atomic_write(out / "original" / "tokenizer.model", "\n".join(lines) + "\n")

    specials = llama3_special_tokens(n_base)
    bos, eos = "<|begin_of_text|>", "<|eot_id|>" if instruct else "<|end_of_text|>"
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token_entry(i, s) for s, i in specials.items()],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
                _byte_level(use_regex=False),
            ],
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [
                        {"SpecialToken": {"id": bos, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": bos, "type_id": 1}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {bos: {"id": bos, "ids": [specials[bos]], "tokens": [bos]}},
                },
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": _bpe_model({_u(t): r for t, r in ranks.items()}, _all_split_merges(ranks), ignore_merges=True),
    }
    _write_json(out / "tokenizer.json", tokenizer_json)
    _write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": {
                str(i): {k: v for k, v in _added_token_entry(i, s).items() if k != "id"} for s, i in specials.items()
            },
            "bos_token": bos,
            "chat_template": LLAMA3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": eos,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(out / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos})
    eos_ids = (
        [specials["<|end_of_text|>"], specials["<|eom_id|>"], specials["<|eot_id|>"]]
        if instruct
        else specials["<|end_of_text|>"]
    )
    _write_json(out / "generation_config.json", {"bos_token_id": specials[bos], "eos_token_id": eos_ids})
    return out


def write_bpe_tokenizer(
    out_dir: str | Path,
    corpus: Sequence[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    style: Literal["qwen2", "gpt2"] = "qwen2",
    chat_template: str | None = "default",
    model_max_length: int = 32768,
) -> Path:
    """Write a byte-level BPE tokenizer as a Qwen2 (ChatML) or GPT-2 repository has it: ``vocab.json``,
    ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
    ``generation_config.json``.

    Args:
        out_dir: directory to write (created).
        corpus: texts to learn the merges from.
        vocab_size: base vocabulary size (256 bytes + learned merges); special tokens follow it.
        style: ``"qwen2"`` (Qwen pre-tokenizer regex, NFC, ``<|endoftext|>``/``<|im_start|>``/``<|im_end|>``,
            Qwen2-Instruct ChatML template) or ``"gpt2"`` (GPT-2 regex, ``<|endoftext|>``, DialoGPT template).
        chat_template: ``"default"`` for the style's template, a template string, or None for none.
        model_max_length: written to ``tokenizer_config.json``.

    Returns:
        ``out_dir`` as a Path.
    """
    if style not in ("qwen2", "gpt2"):
        raise ValueError(f"style={style!r}; use 'qwen2' or 'gpt2'")
    out = Path(out_dir)
    pattern = QWEN2_PATTERN if style == "qwen2" else GPT2_PATTERN
    merges = train_byte_bpe(corpus, pattern, max(0, vocab_size - 256))
    vocab: dict[str, int] = {_u(bytes([b])): i for i, b in enumerate(_byte_vocab_order())}
    for a, b in merges:
        vocab[_u(a + b)] = len(vocab)
    merge_lines = [f"{_u(a)} {_u(b)}" for a, b in merges]
    n = len(vocab)
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if style == "qwen2" else ["<|endoftext|>"]
    specials = {s: n + i for i, s in enumerate(names)}
    _write_json(out / "vocab.json", vocab)
    _atomic_write(out / "merges.txt", "#version: 0.2\n" + "\n".join(merge_lines) + "\n")
    if style == "qwen2":
        pre = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                _byte_level(use_regex=False),
            ],
        }
        normalizer: dict[str, Any] | None = {"type": "NFC"}
    else:
        pre = _byte_level(use_regex=True, trim_offsets=True)
        normalizer = None
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token_entry(i, s) for s, i in specials.items()],
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": _byte_level(use_regex=False),
        "decoder": _byte_level(use_regex=False),
        "model": _bpe_model(vocab, merge_lines, ignore_merges=False),
    }
    _write_json(out / "tokenizer.json", tokenizer_json)
    if chat_template == "default":
        chat_template = QWEN2_CHAT_TEMPLATE if style == "qwen2" else DIALOGPT_CHAT_TEMPLATE
    cfg: dict[str, Any] = {
        "added_tokens_decoder": {
            str(i): {k: v for k, v in _added_token_entry(i, s).items() if k != "id"} for s, i in specials.items()
        },
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if style == "qwen2":
        cfg.update(
            {
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "errors": "replace",
                "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": None,
            }
        )
        stm = {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        }
        gen = {
            "bos_token_id": specials["<|endoftext|>"],
            "eos_token_id": [specials["<|im_end|>"], specials["<|endoftext|>"]],
            "pad_token_id": specials["<|endoftext|>"],
        }
    else:
        cfg.update(
            {
                "add_bos_token": False,
                "add_prefix_space": False,
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "errors": "replace",
                "tokenizer_class": "GPT2Tokenizer",
            }
        )
        stm = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        gen = {"bos_token_id": specials["<|endoftext|>"], "eos_token_id": specials["<|endoftext|>"]}
    if chat_template:
        cfg["chat_template"] = chat_template
    _write_json(out / "tokenizer_config.json", cfg)
    _write_json(out / "special_tokens_map.json", stm)
    _write_json(out / "generation_config.json", gen)
    return out


def _spm_tokenizer_json(sp: Any, legacy: bool) -> dict[str, Any]:
    """The ``tokenizer.json`` HF ships next to a Llama-style sentencepiece BPE model (byte fallback, merges derived from
    the pieces: every split of a piece into two pieces, ordered by the piece's id)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges: list[tuple[int, int, int, str]] = []
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], f"{left} {right}"))
    merges.sort()
    specials = [(i, sp.id_to_piece(i)) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()) if i >= 0]
    if legacy:
        normalizer: dict[str, Any] | None = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        }
        pre_tokenizer: dict[str, Any] | None = None
    else:
        normalizer = None
        pre_tokenizer = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    bos = sp.id_to_piece(sp.bos_id())
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token_entry(i, s) for i, s in specials],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": sp.id_to_piece(sp.unk_id()),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m[3] for m in merges],
        },
    }


def write_sentencepiece_tokenizer(
    out_dir: str | Path,
    corpus: Sequence[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    style: Literal["llama2", "tinyllama", "mistral"] = "llama2",
    chat_template: str | None = "default",
    legacy: bool = False,
    model_max_length: int = 4096,
) -> Path:
    """Write a Llama 2 style sentencepiece tokenizer: ``tokenizer.model`` (BPE, byte fallback, ``<unk>``=0,
    ``<s>``=1, ``</s>``=2, digits split, whitespace kept), the matching ``tokenizer.json``, ``tokenizer_config.json`` (with the style's chat template),
    ``special_tokens_map.json`` and ``generation_config.json``.

    Args:
        out_dir: directory to write (created).
        corpus: training texts (the 256 byte-fallback pieces are always added, so any text encodes).
        vocab_size: total pieces including the 3 specials and 256 byte pieces (at least ~300).
        style: chat template to write: ``"llama2"`` (``[INST]``), ``"tinyllama"`` (zephyr-like), ``"mistral"``.
        chat_template: ``"default"`` for the style's template, a template string, or None for none.
        legacy: the ``legacy`` flag written to ``tokenizer_config.json`` (HF's handling of text after special tokens).
        model_max_length: written to ``tokenizer_config.json``.

    Returns:
        ``out_dir`` as a Path.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus_file = Path(tmp) / "corpus.txt"
        corpus_file.write_text("\n".join(corpus) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus_file),
            model_prefix=str(Path(tmp) / "m"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
        )
        _atomic_write(out / "tokenizer.model", (Path(tmp) / "m.model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    _write_json(out / "tokenizer.json", _spm_tokenizer_json(sp, legacy))
    if chat_template == "default":
        chat_template = {
            "llama2": LLAMA2_CHAT_TEMPLATE,
            "tinyllama": TINYLLAMA_CHAT_TEMPLATE,
            "mistral": MISTRAL_CHAT_TEMPLATE,
        }[style]
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    cfg: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {k: v for k, v in _added_token_entry(i, s).items() if k != "id"} for s, i in specials.items()
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": legacy,
        "model_max_length": model_max_length,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if chat_template:
        cfg["chat_template"] = chat_template
    _write_json(out / "tokenizer_config.json", cfg)
    _write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return out
