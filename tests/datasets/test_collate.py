"""padded_collate: shapes, padding values, multiples, packed fields, tensors in, errors."""

import functools

import pytest
import torch
from torch.utils.data import DataLoader

from kdtune.data import PackedDataset, padded_collate
from kdtune.errors import DataError

IGN = -100


def test_shapes_and_padding():
    batch = [
        {"tokens": [1, 2, 3], "labels": [IGN, 2, 3]},
        {"tokens": [4], "labels": [4]},
        {"tokens": torch.tensor([5, 6]), "labels": torch.tensor([IGN, 6])},
    ]
    out = padded_collate(batch, pad_id=7)
    assert set(out) == {"tokens", "labels"}
    assert out["tokens"].dtype == torch.long and out["tokens"].shape == (3, 3)
    assert out["tokens"].tolist() == [[1, 2, 3], [4, 7, 7], [5, 6, 7]]
    assert out["labels"].tolist() == [[IGN, 2, 3], [4, IGN, IGN], [IGN, 6, IGN]]
    out = padded_collate(batch, pad_id=0, ignore_index=-1, pad_to_multiple_of=8)
    assert out["tokens"].shape == out["labels"].shape == (3, 8)
    assert out["labels"][1].tolist() == [4] + [-1] * 7


def test_packed_fields_padding():
    batch = [
        {"tokens": [1, 2, 3], "labels": [IGN, 2, 3], "input_pos": [0, 1, 0], "document_ids": [0, 0, 1]},
        {"tokens": [4], "labels": [IGN], "input_pos": [0], "document_ids": [0]},
    ]
    out = padded_collate(batch, pad_id=0, pad_to_multiple_of=4)
    assert out["input_pos"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 2]]
    # padding is a new document in each row
    assert out["document_ids"].tolist() == [[0, 0, 1, 2], [0, 1, 1, 1]]


def test_dataloader_with_packed_dataset():
    packed = PackedDataset([{"tokens": [1, 2, 3], "labels": [1, 2, 3]}] * 5, max_seq_len=8, padding_idx=9)
    loader = DataLoader(packed, batch_size=2, collate_fn=functools.partial(padded_collate, pad_id=9))
    shapes = [tuple(b["tokens"].shape) for b in loader]
    assert shapes == [(2, 8), (1, 8)]
    first = next(iter(loader))
    assert set(first) == {"tokens", "labels", "input_pos", "document_ids"}
    assert first["tokens"][0].tolist() == [1, 2, 3, 1, 2, 3, 9, 9]


def test_collate_errors():
    with pytest.raises(DataError, match="empty batch"):
        padded_collate([], pad_id=0)
    with pytest.raises(DataError, match="need 'tokens' and 'labels'"):
        padded_collate([{"input_ids": [1]}], pad_id=0)
    with pytest.raises(DataError, match="batch item 0: 2 tokens but 1 labels"):
        padded_collate([{"tokens": [1, 2], "labels": [1]}], pad_id=0)
