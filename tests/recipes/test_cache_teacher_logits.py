"""cache_teacher_logits end to end on tiny models: the lookup of shuffled / padded / packed batches equals the live
teacher's top-k computed here from its full logits; sparse KD from a k = V cache equals dense KD with the live teacher;
an interrupted run resumes to the same bytes; a 2-process torchrun writes the same bytes as one process; caches that do
not match the run are refused with one clear error."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from kdtune.config import apply_overrides, load_config
from kdtune.data import padded_collate
from kdtune.data import teacher_cache as TC
from kdtune.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache_cfg(tiny):
    """``cache_cfg(out, *extra)``: configs/tiny/cache_teacher_logits.yaml pointed at the fixture's files."""

    def make(out: Path, *extra: str):
        cfg = load_config(ROOT / "configs" / "tiny" / "cache_teacher_logits.yaml")
        return apply_overrides(
            cfg,
            [
                f"output_dir={out}",
                f"teacher_checkpointer.checkpoint_dir={tiny['teacher']}",
                f"tokenizer.checkpoint_dir={tiny['student']}",
                f"dataset.data_files={tiny['data']}",
                *extra,
            ],
        )

    return make


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny, recipe):
    """One fp32 cache (top-16) and one full-vocabulary cache (k = V), both of the tiny KD data (train + validation)."""
    from kdtune.data import load_hf_tokenizer

    V = load_hf_tokenizer(tiny["student"]).vocab_size
    root = tmp_path_factory.mktemp("caches")
    base = [
        f"teacher_checkpointer.checkpoint_dir={tiny['teacher']}",
        f"tokenizer.checkpoint_dir={tiny['student']}",
        f"dataset.data_files={tiny['data']}",
        "value_dtype=fp32",
    ]
    cfg = load_config(ROOT / "configs" / "tiny" / "cache_teacher_logits.yaml")
    recipe("cache_teacher_logits").build_cache(apply_overrides(cfg, [*base, f"output_dir={root / 'top16'}"]))
    recipe("cache_teacher_logits").build_cache(
        apply_overrides(cfg, [*base, f"output_dir={root / 'full'}", f"top_k={V}", "value_kind=logits"])
    )
    return {"top16": root / "top16", "full": root / "full", "V": V}


def _teacher(tiny):
    from kdtune.models import load_hf_model

    return load_hf_model(tiny["teacher"]).eval()


def _datasets(tiny, **kw):
    from kdtune.data import load_hf_tokenizer, sft_dataset

    tok = load_hf_tokenizer(tiny["student"], max_seq_len=128)
    make = partial(sft_dataset, tok, source="json", data_files=str(tiny["data"]), val_split_ratio=0.1, **kw)
    return tok, make(subset="train", val_split_seed=0), make(subset="validation", val_split_seed=0)


def _live_topk(teacher, batch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the teacher's full logits [B, T, V], log_softmax, trained positions in row-major order, top-k."""
    kwargs = {key: batch[key] for key in ("input_pos", "document_ids") if key in batch}
    with torch.no_grad():
        logp = torch.log_softmax(teacher(batch["tokens"], **kwargs).float(), -1)  # [B, T, V]
    mask = batch["labels"][:, 1:] != -100
    vals, ids = logp[:, :-1][mask].topk(k, -1)
    return ids, vals


def test_manifest_and_shards_are_inspectable(built, tiny) -> None:
    from safetensors.torch import load_file

    m = TC.CacheManifest.read(built["top16"] / "manifest.json")
    assert m.complete and m.k == 16 and m.value_dtype == "fp32" and m.max_seq_len == 128 and m.temperature == 1.0
    assert m.num_items == 72 and m.num_shards == 5 and m.bytes_per_token == 16 * 8 + 4
    assert m.teacher["checkpoint_dir"] == str(tiny["teacher"]) and len(m.teacher["files"]["model.safetensors"]) == 64
    shards = sorted((built["top16"] / "shards").iterdir())
    assert [p.name for p in shards] == [f"shard-{i:05d}.safetensors" for i in range(5)]
    total = 0
    for p in shards:
        t = load_file(p)
        assert t["values"].dtype == torch.float32 and t["ids"].dtype == torch.int32 and t["logz"].dtype == torch.float32
        assert t["values"].shape == t["ids"].shape and t["values"].shape[1] == 16
        assert int(t["example_counts"].sum()) == t["values"].shape[0] == t["logz"].shape[0]
        # log-probs: sorted, at most 0, and the top-k mass is at most 1
        assert (t["values"][:, :-1] >= t["values"][:, 1:]).all() and (t["values"].exp().sum(-1) <= 1 + 1e-5).all()
        total += t["values"].shape[0]
    assert total == m.num_positions
    assert len(TC.TeacherLogitsCache(built["top16"])) == m.num_examples == 72


@pytest.mark.parametrize("packed", [False, True])
def test_lookup_of_shuffled_padded_packed_batches_is_the_live_teacher(built, tiny, packed: bool) -> None:
    teacher = _teacher(tiny)
    tok, train, val = _datasets(tiny, packed=packed, max_seq_len=128)
    cache = TC.TeacherLogitsCache(built["top16"])
    cache.check_run(tokenizer=tok, max_seq_len=TC.dataset_max_seq_len(train, tok), temperature=1.0)
    cache.check_dataset([train, val])  # packed: other items, same examples
    g = torch.Generator().manual_seed(3)
    for ds in (train, val):
        order = torch.randperm(len(ds), generator=g).tolist()
        for start in range(0, min(len(order), 24), 5):
            batch = padded_collate([ds[i] for i in order[start : start + 5]], pad_id=tok.pad_id)
            ids, logp = cache.lookup(batch)
            ref_ids, ref_logp = _live_topk(teacher, batch, 16)
            assert ids.dtype == torch.int64 and logp.dtype == torch.float32
            assert ids.shape == (int((batch["labels"][:, 1:] != -100).sum()), 16)
            torch.testing.assert_close(ids, ref_ids, atol=0, rtol=0)
            torch.testing.assert_close(logp, ref_logp, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", ["ForwardKLLoss", "JSDLoss", "ReverseKLLoss"])
def test_objective_with_a_full_vocab_cache_equals_the_live_teacher(built, tiny, tail: str, divergence: str) -> None:
    """k = V (stored as raw logits + logZ): the objective with CachedTeacher gives the live teacher's sums and grads."""
    import kdtune.losses as L
    from kdtune.models import load_hf_model

    teacher = _teacher(tiny)
    tok, train, _ = _datasets(tiny)
    batch = padded_collate([train[i] for i in (5, 0, 17, 3)], pad_id=tok.pad_id)
    results = []
    for source in (L.LiveTeacher(teacher), L.CachedTeacher(str(built["full"]), tail=tail)):
        student = load_hf_model(tiny["student"])
        objective = L.DistillationObjective(getattr(L, divergence)(), teacher=source, kd_ratio=0.5, num_output_chunks=3)
        out = objective(student, batch)
        out.loss_sum.backward()
        results.append((out, [p.grad.clone() for p in student.parameters()]))
    (live, g_live), (cached, g_cached) = results
    torch.testing.assert_close(cached.kd_loss_sum, live.kd_loss_sum, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cached.loss_sum, live.loss_sum, atol=1e-4, rtol=1e-5)
    for a, b in zip(g_cached, g_live):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_a_cache_at_temperature_2_gives_the_live_teachers_kd_at_2(tiny, recipe, tmp_path: Path, tail: str) -> None:
    """The cache's temperature: a k = V cache built at T = 2 (stored log-probs at T) gives the live teacher's loss and
    gradients at T = 2 through the fused sparse path; a top-16 cache at T = 2 gives its unfused (autograd) path's."""
    import kdtune.losses as L
    from kdtune.data import load_hf_tokenizer
    from kdtune.models import load_hf_model

    V = load_hf_tokenizer(tiny["student"]).vocab_size
    cfg = load_config(ROOT / "configs" / "tiny" / "cache_teacher_logits.yaml")
    base = [f"teacher_checkpointer.checkpoint_dir={tiny['teacher']}", f"tokenizer.checkpoint_dir={tiny['student']}",
            f"dataset.data_files={tiny['data']}", "value_dtype=fp32", "temperature=2.0"]  # fmt: skip
    for name, k in (("full", V), ("top16", 16)):
        recipe("cache_teacher_logits").build_cache(apply_overrides(cfg, [*base, f"output_dir={tmp_path / name}",
                                                                         f"top_k={k}"]))  # fmt: skip
    tok, train, _ = _datasets(tiny)
    batch = padded_collate([train[i] for i in (5, 0, 17, 3)], pad_id=tok.pad_id)

    def run(source, fused=True):
        student = load_hf_model(tiny["student"])
        objective = L.DistillationObjective(L.ForwardKLLoss(), teacher=source, kd_ratio=0.5, temperature=2.0,
                                            fused=fused, num_output_chunks=3)  # fmt: skip
        out = objective(student, batch)
        out.loss_sum.backward()
        return out, [p.grad.clone() for p in student.parameters()]

    pairs = [
        (run(L.LiveTeacher(_teacher(tiny))), run(L.CachedTeacher(str(tmp_path / "full"), tail=tail))),
        (run(L.CachedTeacher(str(tmp_path / "top16"), tail=tail), fused=False),
         run(L.CachedTeacher(str(tmp_path / "top16"), tail=tail))),
    ]  # fmt: skip
    for (ref, g_ref), (got, g_got) in pairs:
        torch.testing.assert_close(got.kd_loss_sum, ref.kd_loss_sum, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got.loss_sum, ref.loss_sum, atol=1e-4, rtol=1e-5)
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_kd_recipe_trains_from_the_cache_without_a_teacher(built, tiny, tiny_cfg, recipe, tmp_path: Path) -> None:
    """`teacher_logits` in place of `teacher_model`: no teacher is built; resume is exact; a k = V cache trains like
    the live teacher; a cache at another temperature and a config naming both teachers are refused."""
    kd = recipe("knowledge_distillation_single_device")
    cached = ["~teacher_model", "~teacher_checkpointer", "~teacher_tokenizer", "max_steps=4", "save_every_n_steps=2"]
    full = [*cached, f"+teacher_logits={{_component_: kdtune.losses.CachedTeacher, path: {built['full']}}}"]
    live = kd.train(tiny_cfg("kd", tmp_path / "live", "max_steps=4", "save_every_n_steps=2"))
    from_cache = kd.train(tiny_cfg("kd", tmp_path / "cache", *full))
    for a, b in zip(from_cache.steps, live.steps):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["kd_loss"] == pytest.approx(b["kd_loss"], rel=1e-3)
    top16 = [*cached, f"+teacher_logits={{_component_: kdtune.losses.CachedTeacher, path: {built['top16']}}}"]
    straight = kd.train(tiny_cfg("kd", tmp_path / "top16", *top16))
    assert all(s["kd_loss"] > 0 for s in straight.steps)
    import shutil

    shutil.copytree(
        tmp_path / "top16" / "checkpoints" / "step_00000002", tmp_path / "resumed" / "checkpoints" / "step_00000002"
    )
    resumed = kd.train(tiny_cfg("kd", tmp_path / "resumed", *top16, "resume_from_checkpoint=true"))
    assert [s["loss"] for s in resumed.steps] == pytest.approx([s["loss"] for s in straight.steps[2:]], rel=1e-6)
    from kdtune.errors import KDTuneError

    with pytest.raises(KDTuneError, match="temperature"):
        kd.train(tiny_cfg("kd", tmp_path / "t2", *top16, "temperature=2.0"))
    both = [f"+teacher_logits={{_component_: kdtune.losses.CachedTeacher, path: {built['top16']}}}"]
    with pytest.raises(KDTuneError, match="teacher_logits is set"):
        kd.train(tiny_cfg("kd", tmp_path / "both", *both))


def _cache_files(root: Path) -> list[str]:
    files = [root / "manifest.json", root / "index.safetensors", *sorted((root / "shards").iterdir())]
    return [str(p.relative_to(root)) for p in files]


def _same_bytes(a: Path, b: Path) -> None:
    names = _cache_files(a)
    assert names == _cache_files(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_interrupted_run_resumes_to_the_same_bytes(cache_cfg, recipe, tmp_path: Path, monkeypatch) -> None:
    build = recipe("cache_teacher_logits").build_cache
    build(cache_cfg(tmp_path / "whole", "items_per_shard=8"))

    calls = {"n": 0}
    original = TC.TeacherCacheWriter.write_shard

    def abort_after_three(self, *args, **kwargs):
        if calls["n"] == 3:
            # what a kill during the 4th shard leaves behind: a temporary file, never a partial shard
            (self.shards_dir / "shard-00003.safetensors.tmp-999999").write_bytes(b"partial")
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TC.TeacherCacheWriter, "write_shard", abort_after_three)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build(cache_cfg(out, "items_per_shard=8"))
    monkeypatch.setattr(TC.TeacherCacheWriter, "write_shard", original)
    assert len(list((out / "shards").glob("*.safetensors"))) == 3
    assert not TC.CacheManifest.read(out / "manifest.json").complete
    with pytest.raises(DataError, match="unfinished .3 of 9 shards.*resume_from_checkpoint=true"):
        TC.TeacherLogitsCache(out)
    with pytest.raises(ConfigError, match="already holds a teacher-logits cache .unfinished.*resume_from_checkpoint"):
        build(cache_cfg(out, "items_per_shard=8"))
    with pytest.raises(ConfigError, match="items_per_shard: 16 != 8"):
        build(cache_cfg(out, "resume_from_checkpoint=true"))
    summary = build(cache_cfg(out, "items_per_shard=8", "resume_from_checkpoint=true"))
    assert summary["shards_written"] == 6
    assert not list((out / "shards").glob("*.tmp-*"))
    _same_bytes(tmp_path / "whole", out)


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_cache_as_one_process(cache_cfg, tiny, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    common = [
        f"teacher_checkpointer.checkpoint_dir={tiny['teacher']}",
        f"tokenizer.checkpoint_dir={tiny['student']}",
        f"dataset.data_files={tiny['data']}",
        "items_per_shard=8",
    ]
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        cmd = [sys.executable, "-m", "kdtune", "run", "--nproc_per_node", str(nproc), "cache_teacher_logits"]
        cmd += ["--config", "tiny/cache_teacher_logits", f"output_dir={out}", *common]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[nproc] = (out, r.stdout)
    assert "rank 1: shard 2/9 written" in outs[2][1] and "rank 0: shard 1/9 written" in outs[2][1]
    _same_bytes(outs[1][0], outs[2][0])
    assert TC.TeacherLogitsCache(outs[2][0]).manifest.complete


def test_a_cache_that_does_not_match_the_run_is_refused(built, tiny) -> None:
    from kdtune.data import load_hf_tokenizer

    cache = TC.TeacherLogitsCache(built["top16"])
    tok, train, val = _datasets(tiny)
    cache.check_run(tokenizer=tok, max_seq_len=128, temperature=1.0, student_vocab_size=built["V"])
    other = load_hf_tokenizer(tiny["other_tok_teacher"])
    with pytest.raises(DataError, match=r"does not match this run: the tokenizer differs") as e:
        cache.check_run(tokenizer=other, max_seq_len=128)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"max_seq_len is 64 but the cache was built with 128.*set max_seq_len=128"):
        cache.check_run(tokenizer=tok, max_seq_len=64)
    with pytest.raises(DataError, match=r"temperature is 2.0 but the cache holds the teacher at 1.0"):
        cache.check_run(temperature=2.0)
    with pytest.raises(DataError, match=r"normalised over 303 vocabulary entries but this student needs 200"):
        cache.check_run(student_vocab_size=200)
    # data the cache was not built from: truncated to another max_seq_len, so its examples have other keys
    _, short, _ = _datasets(tiny, max_seq_len=60)
    cut = [i for i in range(len(short)) if len(short[i]["tokens"]) == 60]
    assert 0 < len(cut) < len(short)
    with pytest.raises(
        DataError, match=rf"of {len(short)} examples of this run's data are not in the cache .* rebuild"
    ):
        cache.check_dataset([short])
    batch = padded_collate([short[cut[0]], short[cut[1]]], pad_id=tok.pad_id)
    with pytest.raises(DataError, match="an example of batch row 0 .* is not in the cache"):
        cache.lookup(batch)
    cache.check_dataset([val])  # a subset of the cached data is fine
    with pytest.raises(DataError, match="not a teacher-logits cache"):
        TC.TeacherLogitsCache(tiny["teacher"])
