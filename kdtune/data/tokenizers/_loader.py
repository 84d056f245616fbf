"""``load_hf_tokenizer``: inspect an HF checkpoint directory and build the matching kdtune tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kdtune.data.chat_formats import ChatFormat, get_chat_format
from kdtune.data.tokenizers._base import BaseTokenizer
from kdtune.data.tokenizers.bpe import (
    QWEN2_PATTERN,
    ByteLevelBPETokenizer,
    _make_normalizer,
    _PreTokenizer,
)
from kdtune.errors import DataError

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+\s*$")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e}); re-download or fix the file.") from e
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    """A token given as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def is_tiktoken_file(path: Path) -> bool:
    """True if ``path`` is a tiktoken rank file (``<base64> <rank>`` lines), False for a sentencepiece model."""
    try:
        with path.open("rb") as f:
            head = f.readline(512)
    except OSError:
        return False
    return bool(_TIKTOKEN_LINE.match(head))


def _added_tokens(d: Path, cfg: dict[str, Any], tj: dict[str, Any]) -> tuple[dict[str, int], set[int]]:
    """All added tokens (content -> id) and the ids of the special ones, from every file that lists them."""
    tokens: dict[str, int] = {}
    special: set[int] = set()
    for t in tj.get("added_tokens") or []:
        tokens[t["content"]] = int(t["id"])
        if t.get("special", True):
            special.add(int(t["id"]))
    for i, t in (cfg.get("added_tokens_decoder") or {}).items():
        content = _token_str(t)
        if content is not None:
            tokens[content] = int(i)
            if not isinstance(t, dict) or t.get("special", True):
                special.add(int(i))
    for content, i in _read_json(d / "added_tokens.json").items():
        tokens.setdefault(content, int(i))
    return tokens, special


def _read_chat_template(d: Path, cfg: dict[str, Any]) -> str | None:
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tmpl, str) and tmpl:
        return tmpl
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    ct = _read_json(d / "chat_template.json").get("chat_template")
    return ct if isinstance(ct, str) and ct else None


def _default_format(tokens: dict[str, int], kind: str) -> str:
    if "<|start_header_id|>" in tokens and "<|eot_id|>" in tokens:
        return "llama3"
    if "<|im_start|>" in tokens and "<|im_end|>" in tokens:
        return "chatml"
    if kind == "sentencepiece":
        return "llama2"
    return "plain"


def load_hf_tokenizer(
    checkpoint_dir: str | Path,
    max_seq_len: int | None = None,
    chat_template: str = "auto",
    template_kwargs: dict[str, Any] | None = None,
) -> BaseTokenizer:
    """Build the tokenizer of an HF checkpoint directory.

    Picks, in order: Llama 3 tiktoken (``original/tokenizer.model`` rank file), byte-level BPE from
    ``tokenizer.json`` (Qwen2/2.5/3, GPT-2, BART, OPT, Llama 3 without ``original/``), sentencepiece
    (``tokenizer.model``: Llama 2, TinyLlama, Mistral; ``spiece.model``: T5 / flan-t5), byte-level BPE from
    ``vocab.json`` + ``merges.txt``. With a ``config.json`` holding ``decoder_start_token_id`` (encoder-decoder
    models) the tokenizer gets a ``decoder_start_id`` attribute, which ``kdtune.data.seq2seq_dataset`` uses. BOS/EOS/PAD come from
    ``tokenizer_config.json``, ``special_tokens_map.json`` and ``generation_config.json``.

    Args:
        checkpoint_dir: the model (or tokenizer) directory.
        max_seq_len: if set, ``tokenize_messages`` truncates to it; also exposed as ``tokenizer.max_seq_len``.
        chat_template: ``"auto"`` (the directory's jinja template, else the family's builtin format), ``"builtin"``
            (the family's builtin format even if a template exists), a builtin format name (``llama3``, ``llama2``,
            ``mistral``, ``chatml``, ``qwen2``, ``qwen2_5``, ``zephyr``, ``plain``), a jinja template string, or a
            path to a ``.jinja`` file.
        template_kwargs: extra variables for the jinja template (e.g. ``{"enable_thinking": False}`` for Qwen3).

    Returns:
        A tokenizer implementing :class:`kdtune.data.Tokenizer`.

    Raises:
        DataError: no tokenizer files, unreadable files, or an unknown ``chat_template``.
    """
    d = Path(checkpoint_dir).expanduser()
    if not d.is_dir():
        raise DataError(f"tokenizer directory {str(d)!r} does not exist; pass the model's checkpoint directory.")
    cfg = _read_json(d / "tokenizer_config.json")
    stm = _read_json(d / "special_tokens_map.json")
    gen = _read_json(d / "generation_config.json")
    tj_path = d / "tokenizer.json"
    tj = ByteLevelBPETokenizer.read_tokenizer_json(tj_path) if tj_path.is_file() else {}
    added, special_ids = _added_tokens(d, cfg, tj)

    def tok_name(key: str) -> str | None:
        return _token_str(cfg.get(key)) or _token_str(stm.get(key))

    names = {k: tok_name(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    tiktoken_file = next(
        (p for p in (d / "original" / "tokenizer.model", d / "tokenizer.model") if p.is_file() and is_tiktoken_file(p)),
        None,
    )
    spm_file = (
        d / "tokenizer.model" if (d / "tokenizer.model").is_file() and tiktoken_file != d / "tokenizer.model" else None
    )
    if spm_file is None and (d / "spiece.model").is_file():  # T5 / flan-t5 name their sentencepiece model so
        spm_file = d / "spiece.model"
    tj_bytelevel = bool(tj) and "ByteLevel" in json.dumps(tj.get("pre_tokenizer") or {})
    common: dict[str, Any] = {"max_seq_len": max_seq_len}

    tok: BaseTokenizer
    if tiktoken_file is not None:
        from kdtune.data.tokenizers.tiktoken_llama3 import (
            TikTokenLlama3Tokenizer,
            llama3_special_tokens,
            read_tiktoken_ranks,
        )

        ranks = read_tiktoken_ranks(tiktoken_file)
        n_base = max(ranks.values()) + 1
        specials = llama3_special_tokens(n_base)
        specials.update({c: i for c, i in added.items() if i >= n_base})
        tok = TikTokenLlama3Tokenizer(
            tiktoken_file,
            special_tokens=specials,
            ranks=ranks,
            **_ids(specials, names, cfg, gen, tj, "tiktoken"),
            **common,
        )
        tok.name_or_path = str(d)
    elif tj_bytelevel:
        vocab, merges, pre, norm, ignore_merges = ByteLevelBPETokenizer.parse_tokenizer_json(tj, str(tj_path))
        tok = _make_bpe(d, vocab, merges, pre, norm, ignore_merges, added, special_ids, names, cfg, gen, tj, common)
    elif spm_file is not None:
        from kdtune.data.tokenizers.sentencepiece import SentencePieceTokenizer

        legacy = cfg.get("legacy")
        tok = SentencePieceTokenizer(
            spm_file,
            added_tokens=added,
            legacy=True if legacy is None else bool(legacy),
            skip_ids=None,
            **_ids(added, names, cfg, gen, tj, "sentencepiece"),
            **common,
        )
        tok._skip_ids |= special_ids
        tok.name_or_path = str(d)
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        vocab, merges = ByteLevelBPETokenizer.read_vocab_merges(d / "vocab.json", d / "merges.txt")
        qwen = "qwen" in str(cfg.get("tokenizer_class", "")).lower()
        if qwen:
            pre = _PreTokenizer(
                {
                    "type": "Sequence",
                    "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
                    ],
                },
                str(d),
            )
            norm = _make_normalizer({"type": "NFC"}, str(d))
        else:
            pre = _PreTokenizer(
                {"type": "ByteLevel", "add_prefix_space": bool(cfg.get("add_prefix_space", False)), "use_regex": True},
                str(d),
            )
            norm = None
        tok = _make_bpe(d, vocab, merges, pre, norm, False, added, special_ids, names, cfg, gen, tj, common)
    elif tj:
        raise DataError(
            f"{tj_path}: this tokenizer.json is not byte-level BPE (pre_tokenizer "
            f"{(tj.get('pre_tokenizer') or {}).get('type')!r}); kdtune reads sentencepiece-style tokenizers from "
            "tokenizer.model, so put the model's tokenizer.model next to it."
        )
    else:
        present = sorted(p.name for p in d.iterdir())[:20]
        raise DataError(
            f"{d}: no tokenizer files found (looked for original/tokenizer.model, tokenizer.json, tokenizer.model, "
            f"vocab.json + merges.txt; present: {present}); download the tokenizer files with the model."
        )

    start = _read_json(d / "config.json").get("decoder_start_token_id")
    if isinstance(start, int):  # encoder-decoder models (T5, BART): the decoder's first input token
        tok.decoder_start_id = start
    tok.template_tokens = {k: v for k, v in names.items()}
    tok.template_kwargs = dict(template_kwargs or {})
    _set_chat(tok, d, cfg, chat_template, added)
    return tok


def _lookup(name: str | None, table: dict[str, int]) -> int | None:
    return table.get(name) if name is not None else None


def _ids(
    table: dict[str, int],
    names: dict[str, str | None],
    cfg: dict[str, Any],
    gen: dict[str, Any],
    tj: dict[str, Any],
    kind: str,
) -> dict[str, Any]:
    """bos/eos/pad/stop ids as constructor keyword arguments (only the ones the files determine)."""
    out: dict[str, Any] = {}
    gen_eos = gen.get("eos_token_id")
    gen_eos_list = [
        int(x) for x in (gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    ]
    eos = _lookup(names["eos_token"], table)
    if eos is None and gen_eos_list:
        eos = gen_eos_list[0]
    if eos is not None:
        out["eos_id"] = eos
    bos = _lookup(names["bos_token"], table)
    if bos is None and gen.get("bos_token_id") is not None and kind != "bpe":
        bos = int(gen["bos_token_id"])
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:
        post = tj.get("post_processor") or {}
        if post.get("type") == "Sequence":
            post = next((p for p in post.get("processors", []) if p.get("type") == "TemplateProcessing"), {})
        single = post.get("single") or []
        if post.get("type") == "TemplateProcessing" and single:
            first = single[0].get("SpecialToken")
            add_bos = first is not None
            if first is not None:
                bos = table.get(first["id"], bos)
        elif post.get("type") in ("RobertaProcessing", "BertProcessing") and post.get("cls"):
            add_bos = True  # BART / RoBERTa: <s> text </s>
            bos = int(post["cls"][1]) if isinstance(post["cls"], list) else bos
        else:
            add_bos = kind in ("tiktoken", "sentencepiece")
    if bos is not None or not add_bos:
        out["bos_id"] = bos if add_bos else None
    pad = _lookup(names["pad_token"], table)
    if pad is None and gen.get("pad_token_id") is not None:
        pad = int(gen["pad_token_id"])
    if pad is not None:
        out["pad_id"] = pad
    if gen_eos_list:
        out["stop_ids"] = gen_eos_list
    return out


def _make_bpe(
    d: Path,
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    pre: _PreTokenizer,
    norm: Any,
    ignore_merges: bool,
    added: dict[str, int],
    special_ids: set[int],
    names: dict[str, str | None],
    cfg: dict[str, Any],
    gen: dict[str, Any],
    tj: dict[str, Any],
    common: dict[str, Any],
) -> ByteLevelBPETokenizer:
    table = {**vocab, **added}
    ids = _ids(table, names, cfg, gen, tj, "bpe")
    if "eos_id" not in ids:
        eos = next((added[t] for t in ("<|endoftext|>", "<|end_of_text|>", "</s>") if t in added), None)
        if eos is None:
            raise DataError(
                f'{d}: cannot tell the EOS token; set eos_token in tokenizer_config.json (e.g. "<|endoftext|>").'
            )
        ids["eos_id"] = eos
    if "pad_id" not in ids and "<|finetune_right_pad_id|>" in added:
        ids["pad_id"] = added["<|finetune_right_pad_id|>"]
    ids.setdefault("bos_id", None)
    tok = ByteLevelBPETokenizer(
        vocab=vocab,
        merges=merges,
        pre_tokenizer=pre,
        normalizer=norm,
        ignore_merges=ignore_merges,
        special_tokens=added,
        skip_ids=special_ids,
        vocab_size=max([*vocab.values(), *added.values()]) + 1,
        name_or_path=str(d),
        **ids,
        **common,
    )
    return tok


def _set_chat(tok: BaseTokenizer, d: Path, cfg: dict[str, Any], chat_template: str, tokens: dict[str, int]) -> None:
    own = _read_chat_template(d, cfg)
    family_format = _default_format({**tokens, **tok.special_tokens}, tok.kind)
    choice = chat_template if chat_template is not None else "auto"
    if choice == "auto":
        tok.chat_template = own
        tok.chat_format = get_chat_format(family_format)
    elif choice == "builtin":
        tok.chat_template = None
        tok.chat_format = get_chat_format(family_format)
    elif "{{" in choice or "{%" in choice:
        tok.chat_template = choice
        tok.chat_format = None
    elif choice.endswith(".jinja"):
        p = Path(choice).expanduser()
        if not p.is_absolute():
            p = d / p if (d / p).is_file() else p
        if not p.is_file():
            raise DataError(f"chat_template file {choice!r} not found (relative paths are tried in {d} first).")
        tok.chat_template = p.read_text(encoding="utf-8")
        tok.chat_format = None
    else:
        fmt: ChatFormat = get_chat_format(choice)
        fmt.check(tok)
        tok.chat_template = None
        tok.chat_format = fmt


def _dir_of(path: str | Path) -> Path:
    """The checkpoint directory of a tokenizer file path (``.../original/tokenizer.model`` -> ``...``) or a dir."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if not p.exists():
        raise DataError(f"tokenizer path {str(p)!r} does not exist; pass the model directory or its tokenizer file.")
    d = p.parent
    return d.parent if d.name == "original" else d


def _family_tokenizer(
    family: str, kinds: tuple[str, ...], path: str | Path, max_seq_len: int | None, chat_template: str
) -> BaseTokenizer:
    tok = load_hf_tokenizer(_dir_of(path), max_seq_len=max_seq_len, chat_template=chat_template)
    if tok.kind not in kinds:
        raise DataError(
            f"{path}: {family}_tokenizer expects a {' or '.join(kinds)} tokenizer but found {tok.kind}; use "
            "kdtune.data.load_hf_tokenizer(checkpoint_dir), which picks the right kind itself."
        )
    return tok


def llama3_tokenizer(path: str | Path, max_seq_len: int | None = None, chat_template: str = "auto") -> BaseTokenizer:
    """torchtune-style entry point: the Llama 3.x tokenizer from ``original/tokenizer.model`` (or the model dir).

    Same result as ``load_hf_tokenizer(<model dir>)``; kept so torchtune configs port by renaming the component.
    """
    return _family_tokenizer("llama3", ("tiktoken", "bpe"), path, max_seq_len, chat_template)


def llama2_tokenizer(path: str | Path, max_seq_len: int | None = None, chat_template: str = "auto") -> BaseTokenizer:
    """torchtune-style entry point: a sentencepiece tokenizer (Llama 2, TinyLlama, Mistral) from ``tokenizer.model``."""
    return _family_tokenizer("llama2", ("sentencepiece",), path, max_seq_len, chat_template)


def qwen2_tokenizer(
    path: str | Path,
    merges_file: str | Path | None = None,
    max_seq_len: int | None = None,
    chat_template: str = "auto",
) -> BaseTokenizer:
    """torchtune-style entry point: the Qwen2/2.5/3 byte-level BPE tokenizer from ``vocab.json`` (+ ``merges_file``,
    which must sit in the same directory) or the model directory."""
    if merges_file is not None and Path(merges_file).expanduser().parent != _dir_of(path):
        raise DataError(f"merges_file {str(merges_file)!r} must be in the same directory as {str(path)!r}.")
    return _family_tokenizer("qwen2", ("bpe",), path, max_seq_len, chat_template)


def gpt2_tokenizer(path: str | Path, max_seq_len: int | None = None, chat_template: str = "auto") -> BaseTokenizer:
    """The GPT-2 / DialoGPT byte-level BPE tokenizer from ``vocab.json``/``tokenizer.json`` or the model directory."""
    return _family_tokenizer("gpt2", ("bpe",), path, max_seq_len, chat_template)


mistral_tokenizer = llama2_tokenizer
qwen2_5_tokenizer = qwen2_tokenizer
qwen3_tokenizer = qwen2_tokenizer
