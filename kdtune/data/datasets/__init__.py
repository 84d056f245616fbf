"""Dataset builders (config ``_component_``s) and the tokenized dataset they return.

Every builder is called as ``builder(tokenizer, **cfg_kwargs)`` and returns a map-style dataset of
``{"tokens": list[int], "labels": list[int]}`` (labels aligned with tokens, -100 where not trained; the loss shifts).
With ``packed=True`` items also carry ``input_pos`` and ``document_ids`` (see `kdtune.data.PackedDataset`); batch
them with ``functools.partial(kdtune.data.padded_collate, pad_id=tokenizer.pad_id)``.

===========================  =================================================================================
builder                      data
===========================  =================================================================================
``sft_dataset``              any of the formats below, detected from the columns (``format="auto"``, logged)
``instruct_dataset``         one prompt + one response: source/target, alpaca, dolly, openorca, prompt/completion
``chat_dataset``             multi-turn ``messages`` (OpenAI) or ``conversations`` (ShareGPT)
``text_completion_dataset``  plain text, every token trained
``alpaca_dataset``           ``tatsu-lab/alpaca`` (``alpaca_cleaned_dataset``: ``yahma/alpaca-cleaned``)
``openorca_dataset``         ``Open-Orca/OpenOrca``;  ``slimorca_dataset``: ``Open-Orca/SlimOrca-Dedup``
``dolly_dataset``            ``databricks/databricks-dolly-15k``
``ultrachat_dataset``        ``HuggingFaceH4/ultrachat_200k``, split ``train_sft``
``seq2seq_dataset``          source/target pairs for T5/BART: ``{"encoder_tokens", "tokens", "labels"}``
===========================  =================================================================================

Sources: a hub name, ``source: json|csv|parquet|arrow|text`` with ``data_files``, a local data file as ``source``, or
a ``save_to_disk`` directory; ``split`` accepts `datasets` slicing (``train[:95%]``). Config example::

    dataset:
      _component_: kdtune.data.sft_dataset
      source: json
      data_files: data/train.jsonl
      column_map: {source: question, target: answer}   # your columns -> the format's
      train_on_input: false        # mask the prompt (default)
      masking: all_assistant       # or last_assistant (chat data)
      max_seq_len: 2048            # default: the tokenizer's; longer examples are cut, with ONE warning
      packed: false
      val_split_ratio: 0.05        # held-out part; build it with subset="validation"
      num_proc: 8                  # tokenize up front with 8 processes

Large datasets (more than 100,000 rows) are tokenized on access unless ``lazy=False``; smaller ones up front, so
that every row is checked at start-up and the truncation count is known.
"""

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
from kdtune.data.datasets._seq2seq import Seq2SeqDataset, seq2seq_dataset
from kdtune.data.datasets._sft import CROSS_ENTROPY_IGNORE_IDX, SFTDataset, labels_from_mask

__all__ = [
    "CROSS_ENTROPY_IGNORE_IDX",
    "SFTDataset",
    "Seq2SeqDataset",
    "alpaca_cleaned_dataset",
    "alpaca_dataset",
    "chat_dataset",
    "dolly_dataset",
    "find_json_error",
    "instruct_dataset",
    "labels_from_mask",
    "load_rows",
    "openorca_dataset",
    "seq2seq_dataset",
    "sft_dataset",
    "slimorca_dataset",
    "split_dataset",
    "split_indices",
    "text_completion_dataset",
    "ultrachat_dataset",
]
