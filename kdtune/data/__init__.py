"""kdtune.data: tokenizers, messages and chat formats, datasets, packing and collate."""

# --- tokenizers, messages, chat formats (tokenizers engineer) ---
from kdtune.data.chat_formats import CHAT_FORMATS, ChatFormat, get_chat_format

# --- datasets, formats, packing, collate (datasets engineer) ---
from kdtune.data.collate import model_inputs, padded_collate
from kdtune.data.datasets import (
    CROSS_ENTROPY_IGNORE_IDX,
    Seq2SeqDataset,
    SFTDataset,
    alpaca_cleaned_dataset,
    alpaca_dataset,
    chat_dataset,
    dolly_dataset,
    instruct_dataset,
    openorca_dataset,
    seq2seq_dataset,
    sft_dataset,
    slimorca_dataset,
    split_dataset,
    text_completion_dataset,
    ultrachat_dataset,
)
from kdtune.data.formats import FORMATS, detect_format
from kdtune.data.messages import ROLES, Message, mask_messages, normalize_role, validate_messages
from kdtune.data.packing import PackedDataset
from kdtune.data.tokenizers import BaseTokenizer, Tokenizer, load_hf_tokenizer, truncate

__all__ = [
    "BaseTokenizer",
    "CHAT_FORMATS",
    "CROSS_ENTROPY_IGNORE_IDX",
    "ChatFormat",
    "FORMATS",
    "Message",
    "PackedDataset",
    "ROLES",
    "SFTDataset",
    "Seq2SeqDataset",
    "Tokenizer",
    "alpaca_cleaned_dataset",
    "alpaca_dataset",
    "chat_dataset",
    "detect_format",
    "dolly_dataset",
    "get_chat_format",
    "instruct_dataset",
    "load_hf_tokenizer",
    "mask_messages",
    "normalize_role",
    "openorca_dataset",
    "model_inputs",
    "padded_collate",
    "seq2seq_dataset",
    "sft_dataset",
    "slimorca_dataset",
    "split_dataset",
    "text_completion_dataset",
    "truncate",
    "ultrachat_dataset",
    "validate_messages",
]
