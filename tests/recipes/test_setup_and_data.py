"""Unit tests of the recipe builders: resumable data order, step arithmetic, validation split, helpers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from kdtune.errors import ConfigError
from kdtune.training.data import (
    LENGTH_GROUP_BATCHES,
    DataPosition,
    ResumableSampler,
    build_train_data,
    count_valid_tokens,
    example_lengths,
)
from kdtune.training.step import due


class _Toy(Dataset):
    """Item i: tokens [i, i+1, i+2], the first label masked."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"tokens": [i, i + 1, i + 2], "labels": [-100, i + 1, i + 2]}


def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    a = ResumableSampler(20, shuffle=True, seed=3)
    b = ResumableSampler(20, shuffle=True, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    assert a.epoch_indices(0) == b.epoch_indices(0)
    assert a.epoch_indices(0) != a.epoch_indices(1)
    assert sorted(a.epoch_indices(1)) == list(range(20))
    a.set_epoch(1, start=7)
    assert list(a) == a.epoch_indices(1)[7:] and len(a) == 13
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_ranks_partition_the_epoch() -> None:
    full = ResumableSampler(10, seed=1).epoch_indices(2)
    parts = [ResumableSampler(10, seed=1, rank=r, world_size=3).epoch_indices(2) for r in range(3)]
    assert all(len(p) == 3 for p in parts)  # 10 // 3, the tail is dropped
    assert sorted(sum(parts, [])) == sorted(full[:9])
    with pytest.raises(ValueError):
        ResumableSampler(10, rank=3, world_size=3)


class _Varied(Dataset):
    """Item i: ``lengths[i]`` tokens (all trained), and the ``lengths()`` kdtune's datasets report."""

    def __init__(self, lengths: list[int]) -> None:
        self._lengths = lengths

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"tokens": [i] * self._lengths[i], "labels": [i] * self._lengths[i]}

    def lengths(self) -> list[int]:
        return list(self._lengths)


def _random_lengths(n: int, seed: int = 0) -> list[int]:
    return torch.randint(1, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_group_by_length_sorts_each_group_of_the_same_permutation() -> None:
    lengths = _random_lengths(1000)
    for world_size, batch_size in [(1, 4), (3, 2)]:
        group = LENGTH_GROUP_BATCHES * batch_size * world_size
        kw = {"seed": 5, "world_size": world_size, "batch_size": batch_size}
        plain = ResumableSampler(1000, **{k: v for k, v in kw.items() if k != "batch_size"})
        ranks = [ResumableSampler(1000, rank=r, lengths=lengths, **kw) for r in range(world_size)]
        for epoch in (0, 1):
            full = plain.epoch_indices(epoch) if world_size == 1 else None
            parts = [s.epoch_indices(epoch) for s in ranks]
            merged = [i for step in zip(*parts, strict=True) for i in step]  # rank-strided back into one order
            usable = 1000 // world_size * world_size
            assert sorted(merged) == sorted(
                torch.randperm(1000, generator=torch.Generator().manual_seed(5 + epoch)).tolist()[:usable]
            )
            for g in range(0, usable, group):  # each group: longest first
                chunk = [lengths[i] for i in merged[g : g + group]]
                assert chunk == sorted(chunk, reverse=True)
            if full is not None:  # the groups hold the same examples as the plain order's windows
                assert all(
                    sorted(merged[g : g + group]) == sorted(full[g : g + group]) for g in range(0, usable, group)
                )
        assert ranks[0].epoch_indices(0) != ranks[0].epoch_indices(1)
        assert ranks[0].epoch_indices(0) == ResumableSampler(1000, rank=0, lengths=lengths, **kw).epoch_indices(0)
    with pytest.raises(ValueError, match="lengths has 3 entries"):
        ResumableSampler(4, lengths=[1, 2, 3])


def test_group_by_length_steps_hold_the_same_examples_on_one_device_and_on_many() -> None:
    # batch 4 on one device vs batch 2 on each of 2 ranks: the same groups, so every step trains the same examples
    lengths = _random_lengths(600, seed=2)
    one = ResumableSampler(600, seed=7, lengths=lengths, batch_size=4).epoch_indices(1)
    ranks = [ResumableSampler(600, seed=7, lengths=lengths, batch_size=2, rank=r, world_size=2) for r in range(2)]
    r0, r1 = (s.epoch_indices(1) for s in ranks)
    for k in range(600 // 4):
        assert sorted(one[4 * k : 4 * k + 4]) == sorted(r0[2 * k : 2 * k + 2] + r1[2 * k : 2 * k + 2])


def test_group_by_length_trains_far_less_padding_and_resumes_exactly() -> None:
    lengths = _random_lengths(400, seed=1)
    args = {"pad_id": 0, "batch_size": 4, "gradient_accumulation_steps": 2, "epochs": 2, "shuffle": True, "seed": 0}

    def padding(group: bool) -> float:
        data = build_train_data(_Varied(lengths), None, group_by_length=group, **args)
        batches = [b for _, mb in data.steps() for b in mb]
        positions = sum(b["tokens"].numel() for b in batches)
        return 1 - sum(int((b["labels"] != -100).sum()) for b in batches) / positions

    plain, grouped = padding(False), padding(True)
    assert grouped < plain / 10, (plain, grouped)  # measured: 0.37 -> 0.015 of the batch positions are padding
    straight = [
        [b["tokens"].tolist() for b in mb]
        for _, mb in build_train_data(_Varied(lengths), None, group_by_length=True, **args).steps()
    ]
    resumed = build_train_data(_Varied(lengths), None, group_by_length=True, **args)
    resumed.position = DataPosition(epoch=1, step_in_epoch=7, global_step=57)
    assert [[b["tokens"].tolist() for b in mb] for _, mb in resumed.steps()] == straight[57:]


def test_group_by_length_errors_name_the_fix() -> None:
    from torch.utils.data import ConcatDataset

    from kdtune.data.packing import PackedDataset

    assert example_lengths(ConcatDataset([_Varied([3, 1]), _Varied([2])])) == [3, 1, 2]
    with pytest.raises(ConfigError, match="does not report example lengths .* group_by_length=false"):
        example_lengths(_Toy(4))
    lazy = _Varied([1, 2])
    lazy.lazy = True
    with pytest.raises(ConfigError, match="tokenized lazily .* dataset.lazy=false"):
        example_lengths(lazy)
    packed = PackedDataset.__new__(PackedDataset)
    with pytest.raises(ConfigError, match="packed rows are all max_seq_len long"):
        example_lengths(packed)


def _data(n: int = 22, **kw):
    args = {"pad_id": 0, "batch_size": 2, "gradient_accumulation_steps": 2, "epochs": 2, "shuffle": True, "seed": 0}
    return build_train_data(_Toy(n), None, **{**args, **kw})


def test_step_arithmetic_and_epochs() -> None:
    data = _data()  # 22 items -> 11 micro-batches -> 5 steps per epoch
    assert (data.steps_per_epoch, data.total_steps) == (5, 10)
    seen = [(pos.epoch, pos.step_in_epoch, pos.global_step, len(mb)) for pos, mb in data.steps()]
    assert [s[2] for s in seen] == list(range(1, 11))
    assert [s[0] for s in seen] == [0] * 5 + [1] * 5
    assert all(s[3] == 2 for s in seen)
    assert data.position == DataPosition(2, 0, 10)
    assert _data(max_steps_per_epoch=3).total_steps == 6
    assert _data(max_steps=7).total_steps == 7
    assert _data(max_steps_per_epoch=3, max_steps=4).total_steps == 4


def test_steps_resume_mid_epoch_sees_the_same_batches() -> None:
    straight = [[b["tokens"].tolist() for b in mb] for _, mb in _data().steps()]
    resumed = _data()
    resumed.position = DataPosition(epoch=0, step_in_epoch=3, global_step=3)
    rest = [[b["tokens"].tolist() for b in mb] for _, mb in resumed.steps()]
    assert rest == straight[3:]


def test_each_epoch_is_a_new_permutation_of_all_examples() -> None:
    data = _data(n=8, batch_size=1, gradient_accumulation_steps=1)
    firsts = {}
    for pos, (batch,) in data.steps():
        firsts.setdefault(pos.epoch, []).append(int(batch["tokens"][0, 0]))
    assert sorted(firsts[0]) == sorted(firsts[1]) == list(range(8))
    assert firsts[0] != firsts[1]


def test_too_little_data_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        _data(n=3)
    from omegaconf import OmegaConf

    from kdtune.config import read_settings
    from kdtune.training.settings import FinetuneSettings

    base = {k: {"_component_": "x.y"} for k in ("model", "tokenizer", "checkpointer", "dataset", "optimizer")}
    for key in ("batch_size", "gradient_accumulation_steps", "epochs"):  # refused where the settings are read
        with pytest.raises(ConfigError, match=f"{key}=0 is out of range: allowed is >= 1"):
            read_settings(FinetuneSettings, OmegaConf.create({**base, "output_dir": "o", key: 0}))


def test_count_valid_tokens_and_due() -> None:
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    assert count_valid_tokens([{"labels": labels}]) == 4  # shifted: positions 1.. of each row
    assert due(4, 2) and not due(3, 2) and not due(3, None) and not due(3, 0)


def test_val_split_is_disjoint_and_seeded(tmp_path) -> None:
    import json

    from omegaconf import OmegaConf

    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.tokenizers import write_bpe_tokenizer
    from kdtune.training.data import build_datasets

    tok = load_hf_tokenizer(write_bpe_tokenizer(tmp_path / "tok", vocab_size=300))
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(40)
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = OmegaConf.create(
        {"_component_": "kdtune.data.sft_dataset", "source": "json", "data_files": str(tmp_path / "d.jsonl")}
    )
    train, val = build_datasets(cfg, tok, val_split_ratio=0.25, seed=5)
    train2, val2 = build_datasets(cfg, tok, val_split_ratio=0.25, seed=5)
    key = lambda ds: sorted(tuple(ds[i]["tokens"]) for i in range(len(ds)))  # noqa: E731
    assert len(val) == 10 and len(train) == 30
    assert not set(key(train)) & set(key(val))
    assert key(val) == key(val2) and key(train) == key(train2)
    assert build_datasets(cfg, tok)[1] is None
    with pytest.raises(ConfigError, match="val_split_ratio"):
        build_datasets(cfg, tok, val_split_ratio=1.5)


def test_build_model_loads_weights_and_seeds_lora(tiny, tmp_path) -> None:
    """Weights come from disk exactly (meta build + assign); LoRA adapters depend only on lora_seed (lora_b = 0)."""
    from omegaconf import OmegaConf

    from kdtune.models import load_hf_model
    from kdtune.training.runtime import Runtime
    from kdtune.training.setup import build_model, trainable_parameters

    rt = Runtime(torch.device("cpu"), torch.float32, tmp_path)
    ckpt = OmegaConf.create(
        {
            "_component_": "kdtune.models.HFCheckpointer",
            "checkpoint_dir": str(tiny["student"]),
            "output_dir": str(tmp_path),
        }
    )
    lora = {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4, "lora_alpha": 8}
    model_cfg = OmegaConf.create(
        {"_component_": "kdtune.models.hf_model", "checkpoint_dir": str(tiny["student"]), **lora}
    )
    ref = load_hf_model(tiny["student"]).state_dict()
    adapters = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model, _ = build_model(model_cfg, ckpt, rt, lora_seed=7)
        state = model.state_dict()
        for k, v in ref.items():
            assert torch.equal(state[k], v), k
        adapters.append({k: v.clone() for k, v in state.items() if "lora_" in k})
        assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
        assert len(trainable_parameters(model)) == 8  # 2 layers x (q, v) x (a, b)
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert all(not v.any() for k, v in adapters[0].items() if "lora_b" in k)
    assert all(v.abs().sum() > 0 for k, v in adapters[0].items() if "lora_a" in k)


def test_list_of_datasets_is_concatenated(tmp_path) -> None:
    import json

    from omegaconf import OmegaConf

    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.tokenizers import write_bpe_tokenizer
    from kdtune.training.data import build_datasets

    tok = load_hf_tokenizer(write_bpe_tokenizer(tmp_path / "tok", vocab_size=300))
    nodes = []
    for name, n in (("a", 5), ("b", 7)):
        rows = [
            {"messages": [{"role": "user", "content": f"{name}{i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(n)
        ]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        nodes.append(
            {"_component_": "kdtune.data.sft_dataset", "source": "json", "data_files": str(tmp_path / f"{name}.jsonl")}
        )
    train, val = build_datasets(OmegaConf.create(nodes), tok)
    assert len(train) == 12 and val is None
