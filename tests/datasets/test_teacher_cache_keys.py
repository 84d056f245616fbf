"""Example keys of the teacher-logits cache: the same example gets the same key alone, padded, or packed; any change of
its tokens or of which positions are trained changes it; counts are the trained positions in the objective's order."""

import pytest
import torch

from kdtune.data import PackedDataset, padded_collate
from kdtune.data.teacher_cache import batch_examples, example_key, item_examples
from kdtune.errors import DataError

A = {"tokens": [1, 5, 6, 7, 8, 2], "labels": [-100, -100, 6, 7, 8, 2]}
B = {"tokens": [1, 9, 9, 3, 2], "labels": [1, 9, 9, 3, 2]}  # every token trained (text completion)
C = {"tokens": [1, 4, 2], "labels": [-100, -100, -100]}  # nothing trained


def test_same_example_same_key_alone_padded_packed() -> None:
    alone = [item_examples(A), item_examples(B)]
    assert [c for ((_, c),) in alone] == [4, 4]
    rows = batch_examples(padded_collate([A, B, C], pad_id=0))
    assert rows == [alone[0], alone[1], []]
    packed = PackedDataset([A, C, B], max_seq_len=16)
    assert len(packed) == 1
    assert item_examples(packed[0]) == alone[0] + alone[1]
    batch = padded_collate([packed[0]], pad_id=0)
    assert batch_examples(batch) == [alone[0] + alone[1]]
    assert sum(c for _, c in batch_examples(batch)[0]) == int((batch["labels"][:, 1:] != -100).sum())


def test_key_depends_on_tokens_and_trained_positions_only_up_to_the_last_trained_label() -> None:
    key = item_examples(A)[0][0]
    assert item_examples({"tokens": A["tokens"] + [0, 0], "labels": A["labels"] + [-100, -100]})[0][0] == key
    assert item_examples({"tokens": [1, 5, 6, 7, 8, 3], "labels": [-100, -100, 6, 7, 8, 3]})[0][0] != key
    assert item_examples({"tokens": A["tokens"], "labels": [-100, 5, 6, 7, 8, 2]})[0][0] != key
    assert item_examples({"tokens": A["tokens"], "labels": [1, -100, 6, 7, 8, 2]})[0][0] == key  # label 0: no target
    assert len(example_key([1, 2, 3], [False, True, True])) == 16


def test_a_trained_label_across_a_document_boundary_is_refused() -> None:
    batch = {
        "tokens": torch.tensor([[1, 2, 3, 4]]),
        "labels": torch.tensor([[-100, 2, 3, 4]]),
        "document_ids": torch.tensor([[0, 0, 1, 1]]),
    }
    with pytest.raises(DataError, match="first label of a packed document .position 2. is trained"):
        batch_examples(batch)
