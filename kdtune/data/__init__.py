"""kdtune.data: tokenizers, messages and chat formats, datasets, packing and collate."""

# --- tokenizers, messages, chat formats (tokenizers engineer) ---
from kdtune.data.chat_formats import CHAT_FORMATS, ChatFormat, get_chat_format
from kdtune.data.messages import ROLES, Message, mask_messages, normalize_role, validate_messages
from kdtune.data.tokenizers import BaseTokenizer, Tokenizer, load_hf_tokenizer, truncate

# --- datasets, formats, packing, collate (datasets engineer) ---
from kdtune.data.collate import padded_collate  # noqa: E402
from kdtune.data.datasets import (  # noqa: E402
    CROSS_ENTROPY_IGNORE_IDX,
    SFTDataset,
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
from kdtune.data.formats import FORMATS, detect_format  # noqa: E402
from kdtune.data.packing import PackedDataset  # noqa: E402
