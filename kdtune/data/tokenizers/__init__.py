"""kdtune tokenizers: Llama 3 tiktoken, sentencepiece, byte-level BPE, all behind one ``Tokenizer`` protocol."""

from kdtune.data.tokenizers._base import BaseTokenizer, Tokenizer, truncate
from kdtune.data.tokenizers._jinja import TemplateError, render_template
from kdtune.data.tokenizers._loader import (
    gpt2_tokenizer,
    llama2_tokenizer,
    llama3_tokenizer,
    load_hf_tokenizer,
    mistral_tokenizer,
    qwen2_5_tokenizer,
    qwen2_tokenizer,
    qwen3_tokenizer,
)
from kdtune.data.tokenizers.bpe import ByteLevelBPETokenizer, bytes_to_unicode
from kdtune.data.tokenizers.sentencepiece import SentencePieceTokenizer
from kdtune.data.tokenizers.tiktoken_llama3 import TikTokenLlama3Tokenizer, llama3_special_tokens

__all__ = [
    "BaseTokenizer",
    "ByteLevelBPETokenizer",
    "SentencePieceTokenizer",
    "TemplateError",
    "TikTokenLlama3Tokenizer",
    "Tokenizer",
    "bytes_to_unicode",
    "gpt2_tokenizer",
    "llama2_tokenizer",
    "llama3_tokenizer",
    "mistral_tokenizer",
    "qwen2_5_tokenizer",
    "qwen2_tokenizer",
    "qwen3_tokenizer",
    "llama3_special_tokens",
    "load_hf_tokenizer",
    "render_template",
    "truncate",
]
