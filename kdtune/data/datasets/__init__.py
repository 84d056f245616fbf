"""Dataset builders (config ``_component_``s) and the tokenized dataset they return."""

from kdtune.data.datasets._builders import (
    alpaca_cleaned_dataset,
    alpaca_dataset,
    chat_dataset,
    dolly_dataset,
    instruct_dataset,
    openorca_dataset,
    sft_dataset,
    slimorca_dataset,
    text_completion_dataset,
    ultrachat_dataset,
)
from kdtune.data.datasets._load import find_json_error, load_rows, split_dataset, split_indices
from kdtune.data.datasets._sft import CROSS_ENTROPY_IGNORE_IDX, SFTDataset, labels_from_mask

__all__ = [
    "CROSS_ENTROPY_IGNORE_IDX",
    "SFTDataset",
    "alpaca_cleaned_dataset",
    "alpaca_dataset",
    "chat_dataset",
    "dolly_dataset",
    "find_json_error",
    "instruct_dataset",
    "labels_from_mask",
    "load_rows",
    "openorca_dataset",
    "sft_dataset",
    "slimorca_dataset",
    "split_dataset",
    "split_indices",
    "text_completion_dataset",
    "ultrachat_dataset",
]
