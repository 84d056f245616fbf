"""Packing: hand-checked packs, positions and document ids, boundary labels, and that a model attending within
document ids computes for each packed example exactly what it computes for that example alone."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdtune.data import PackedDataset, padded_collate
from kdtune.errors import DataError

IGN = -100


def _item(tokens, labels=None):
    return {"tokens": list(tokens), "labels": list(tokens if labels is None else labels)}


def test_pack_hand_checked():
    ds = [
        _item([11, 12, 13], [IGN, 12, 13]),
        _item([21, 22, 23, 24], [IGN, IGN, 23, 24]),
        _item([31, 32], [31, 32]),
    ]
    packed = PackedDataset(ds, max_seq_len=8, padding_idx=0)
    assert len(packed) == 2
    assert packed[0] == {
        "tokens": [11, 12, 13, 21, 22, 23, 24, 0],
        "labels": [IGN, 12, 13, IGN, IGN, 23, 24, IGN],
        "input_pos": [0, 1, 2, 0, 1, 2, 3, 0],
        "document_ids": [0, 0, 0, 1, 1, 1, 1, 2],
    }
    # the first label of a document is never a target (it would be predicted across the boundary)
    assert packed[1] == {
        "tokens": [31, 32, 0, 0, 0, 0, 0, 0],
        "labels": [IGN, 32, IGN, IGN, IGN, IGN, IGN, IGN],
        "input_pos": [0, 1, 0, 1, 2, 3, 4, 5],
        "document_ids": [0, 0, 1, 1, 1, 1, 1, 1],
    }
    assert packed.num_examples == 3


def test_exact_fit_and_split_across_pack():
    exact = PackedDataset([_item([1, 2, 3, 4]), _item([5, 6, 7, 8])], max_seq_len=4)
    assert [p["tokens"] for p in exact] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert all(p["document_ids"] == [0, 0, 0, 0] for p in exact)
    split = PackedDataset([_item(range(1, 6)), _item(range(11, 17))], max_seq_len=8, split_across_pack=True)
    assert len(split) == 2
    assert split[0]["tokens"] == [1, 2, 3, 4, 5, 11, 12, 13]
    assert split[0]["document_ids"] == [0] * 5 + [1] * 3
    assert split[0]["input_pos"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert split[0]["labels"] == [IGN, 2, 3, 4, 5, IGN, 12, 13]
    # the rest of example 2 is its own document in the next pack, positions from 0, first label not a target
    assert split[1]["tokens"] == [14, 15, 16, 0, 0, 0, 0, 0]
    assert split[1]["labels"] == [IGN, 15, 16, IGN, IGN, IGN, IGN, IGN]
    assert split[1]["input_pos"] == [0, 1, 2, 0, 1, 2, 3, 4]
    long = PackedDataset([_item(range(1, 20))], max_seq_len=8, split_across_pack=True)
    assert len(long) == 3 and long[2]["tokens"][:3] == [17, 18, 19]
    assert len(PackedDataset([_item(range(1, 20))] * 5, max_seq_len=8, split_across_pack=True, max_packs=4)) == 4


def test_pack_errors():
    with pytest.raises(DataError, match="example 1 has 9 tokens, more than max_seq_len=8.*split_across_pack=True"):
        PackedDataset([_item([1]), _item(range(9))], max_seq_len=8)
    with pytest.raises(DataError, match="positive max_seq_len"):
        PackedDataset([_item([1])], max_seq_len=None)
    with pytest.raises(DataError, match="2 tokens but 1 labels"):
        PackedDataset([{"tokens": [1, 2], "labels": [1]}], max_seq_len=8)


def _random_examples(gen, n, vocab, lo=2, hi=9):
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        tokens = torch.randint(1, vocab, (length,), generator=gen).tolist()
        prompt = int(torch.randint(1, length, (1,), generator=gen))
        out.append(_item(tokens, [IGN] * prompt + tokens[prompt:]))
    return out


class _RefAttentionLM(torch.nn.Module):
    """Independent float64 reference: embeddings + learned absolute positions + one causal attention layer that
    attends only within equal document ids. Absolute positions make any position mistake visible."""

    def __init__(self, vocab: int, dim: int, max_len: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        self.pos = torch.randn(max_len, dim, generator=g, dtype=torch.float64)
        self.wq, self.wk, self.wv, self.wo = (torch.randn(dim, dim, generator=g, dtype=torch.float64) for _ in range(4))

    def forward(self, tokens, input_pos, document_ids):  # [B, T] each -> logits [B, T, V]
        x = self.emb[tokens] + self.pos[input_pos]
        q, k, v = x @ self.wq, x @ self.wk, x @ self.wv
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        t = tokens.shape[1]
        allowed = torch.ones(t, t, dtype=torch.bool).tril() & (document_ids[:, :, None] == document_ids[:, None, :])
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        h = x + (att @ v) @ self.wo
        return h @ self.emb.T


def _shifted_ce_sum(logits, labels):
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGN, reduction="sum"
    )


@pytest.mark.parametrize("split_across_pack", [False, True])
def test_packed_equals_unpacked_reference(split_across_pack):
    gen = torch.Generator().manual_seed(0)
    vocab, max_len = 50, 16
    examples = _random_examples(gen, 12, vocab)
    model = _RefAttentionLM(vocab, 8, max_len)
    batch = padded_collate(list(PackedDataset(examples, max_len, split_across_pack=split_across_pack)), pad_id=0)
    logits = model(batch["tokens"], batch["input_pos"], batch["document_ids"])
    # Every document of every pack reproduces the logits of its example run alone
    n_docs = 0
    for b in range(batch["tokens"].shape[0]):
        for d in batch["document_ids"][b].unique().tolist():
            sel = batch["document_ids"][b] == d
            toks = batch["tokens"][b, sel]
            if (batch["labels"][b, sel] == IGN).all() and (toks == 0).all():
                continue  # padding
            alone = model(toks[None], batch["input_pos"][b, sel][None], torch.zeros_like(toks)[None])
            torch.testing.assert_close(logits[b, sel], alone[0], rtol=1e-12, atol=1e-12)
            n_docs += 1
    assert n_docs >= len(examples)
    if not split_across_pack:
        # and the packed loss sums exactly the unpacked examples' loss terms
        unpacked = sum(
            _shifted_ce_sum(
                model(
                    torch.tensor([e["tokens"]]),
                    torch.arange(len(e["tokens"]))[None],
                    torch.zeros(1, len(e["tokens"]), dtype=torch.long),
                ),
                torch.tensor([e["labels"]]),
            )
            for e in examples
        )
        torch.testing.assert_close(_shifted_ce_sum(logits, batch["labels"]), unpacked, rtol=1e-12, atol=1e-12)


def test_packed_with_kdtune_decoder():
    """The same property through kdtune's own TransformerDecoder (document_ids + input_pos), when available."""
    llama_mod = pytest.importorskip("kdtune.models.llama")
    torch.manual_seed(0)
    model = llama_mod.llama(
        vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64, max_seq_len=32
    ).eval()
    examples = _random_examples(torch.Generator().manual_seed(2), 8, 64, lo=3, hi=12)
    batch = padded_collate(list(PackedDataset(examples, 24)), pad_id=0)
    with torch.no_grad():
        logits = model(batch["tokens"], input_pos=batch["input_pos"], document_ids=batch["document_ids"])
        i = 0
        for b in range(batch["tokens"].shape[0]):
            for d in batch["document_ids"][b].unique().tolist():
                sel = batch["document_ids"][b] == d
                if i < len(examples) and batch["tokens"][b, sel].tolist() == examples[i]["tokens"]:
                    alone = model(torch.tensor([examples[i]["tokens"]]))
                    torch.testing.assert_close(logits[b, sel], alone[0], rtol=1e-4, atol=1e-5)
                    i += 1
    assert i == len(examples)
