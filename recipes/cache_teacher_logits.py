"""Offline distillation at the logit level, step 1: run the frozen teacher once and store its top-k predictions.

For every trained position of the dataset (the same ``tokenizer``/``dataset``/``val_*`` components as the KD config),
the teacher's ``top_k`` token ids and log-probabilities at ``temperature`` are written, with its log-normaliser (so the
mass outside the top-k is known), to a directory of shards (format: ``kdtune.data.teacher_cache``). Step 2 is a KD run
that reads the cache instead of running the teacher (matched to its batches by example content, so shuffling, packing
and padding work as with a live teacher).

The teacher body runs under ``torch.inference_mode`` once per batch; the output projection runs ``output_chunk_size``
positions at a time in fp32 and keeps the top-k of each chunk, so no ``[batch, seq, vocab]`` logits tensor exists.
Shards are written atomically; ``resume_from_checkpoint=true`` continues after the last finished shard and ends with
the same bytes as an uninterrupted run. Under torchrun every rank loads the teacher and writes its own shards
(shard ``i`` on rank ``i % world_size``); rank 0 then merges the index. The result does not depend on the number of
processes.

Run:  kdtune run cache_teacher_logits --config llama3_1/8B_cache_teacher_logits
      kdtune run --nproc_per_node 8 cache_teacher_logits --config llama3_1/8B_cache_teacher_logits
Copy and edit:  kdtune cp cache_teacher_logits ./my_cache.py
"""

import sys
import time
from functools import partial
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import ConcatDataset

from kdtune.config import parse_recipe_args, read_settings
from kdtune.data import padded_collate
from kdtune.data.teacher_cache import (
    CacheManifest,
    TeacherCacheWriter,
    batch_examples,
    dataset_fingerprint,
    dataset_max_seq_len,
    teacher_topk,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from kdtune.data.teacher_cache_settings import CacheTeacherLogitsSettings
from kdtune.errors import ConfigError
from kdtune.training import build_model, build_tokenizer, setup_runtime, setup_teacher, to_device
from kdtune.training import distributed as D
from kdtune.training.data import build_datasets

RECIPE_DISTRIBUTED = True  # one process without torchrun options; any number with them
RECIPE_SETTINGS = "kdtune.data.teacher_cache_settings.CacheTeacherLogitsSettings"


def build_cache(cfg: DictConfig) -> dict[str, Any]:
    """Write (or finish) the cache configured by ``cfg``; returns what the run measured (on every rank)."""
    s = read_settings(CacheTeacherLogitsSettings, cfg)
    env = D.init_distributed(s.device)
    try:
        return _build(cfg, s, env)
    finally:
        D.destroy_distributed()


def _build(cfg: DictConfig, s: CacheTeacherLogitsSettings, env: D.DistEnv) -> dict[str, Any]:
    rt = setup_runtime(str(env.device), s.dtype, s.output_dir, s.seed, cfg=cfg, save_config_file=env.is_rank_zero)

    # ---- the data exactly as the KD run builds it (training + validation), and its fingerprint
    tokenizer = build_tokenizer(s.tokenizer)
    with D.rank_zero_first():  # rank 0 fills the datasets cache, the others then read it
        train_ds, val_ds = build_datasets(
            s.dataset, tokenizer, val_dataset_cfg=s.val_dataset, val_split_ratio=s.val_split_ratio, seed=s.seed
        )
    datasets = [train_ds] if val_ds is None or len(val_ds) == 0 else [train_ds, val_ds]
    items = ConcatDataset(datasets)

    # ---- the teacher, frozen
    teacher, checkpointer = build_model(s.teacher_model, s.teacher_checkpointer, rt, key="teacher_model")
    setup_teacher(teacher)
    vocab_size = s.vocab_size or teacher.vocab_size
    if not 1 <= vocab_size <= teacher.vocab_size:
        raise ConfigError(f"vocab_size={vocab_size} must be in [1, {teacher.vocab_size}] (the teacher's output size)")
    if s.top_k > vocab_size:
        raise ConfigError(f"top_k={s.top_k} is larger than the vocabulary ({vocab_size}); lower top_k")

    # ---- what is cached (rank 0 hashes, every rank gets the same manifest)
    manifest = None
    if env.is_rank_zero:
        fingerprint, num_items, num_examples, num_positions = dataset_fingerprint(datasets)
        if s.hash_teacher_weights and checkpointer is not None:
            teacher_id = weights_fingerprint(
                checkpointer.checkpoint_dir, getattr(checkpointer, "checkpoint_files", None)
            )
        else:
            teacher_id = {"checkpoint_dir": getattr(checkpointer, "checkpoint_dir", None), "files": {}, "sha256": None}
        manifest = CacheManifest(
            teacher=teacher_id, teacher_vocab_size=teacher.vocab_size, vocab_size=vocab_size,
            tokenizer_sha256=tokenizer_fingerprint(tokenizer), dataset_fingerprint=fingerprint, num_items=num_items,
            num_examples=num_examples, num_positions=num_positions, max_seq_len=dataset_max_seq_len(train_ds, tokenizer),
            k=s.top_k, temperature=float(s.temperature), value_kind=s.value_kind, value_dtype=s.value_dtype,
            items_per_shard=s.items_per_shard, num_shards=-(-num_items // s.items_per_shard),
        )  # fmt: skip
    manifest = D.broadcast_object(manifest)
    writer = TeacherCacheWriter(
        rt.output_dir, manifest, rank=env.rank, world_size=env.world_size, resume=s.resume_from_checkpoint
    )
    D.barrier()  # every rank has checked the existing manifest before rank 0 (re)writes it
    writer.write_manifest()
    rt.save_config()  # everything built and checked: this run's config.yaml replaces the previous one
    pending = writer.pending_shards()
    if env.is_rank_zero:
        print(
            f"caching the teacher's top-{s.top_k} at T={s.temperature} for {manifest.num_positions} trained positions "
            f"of {manifest.num_items} items in {manifest.num_shards} shards ({manifest.bytes_per_token} bytes/token, "
            f"~{manifest.bytes_per_token * manifest.num_positions / 2**20:.1f} MiB) to {rt.output_dir}",
            flush=True,
        )
        if len(pending) < len(range(env.rank, manifest.num_shards, env.world_size)):
            print(f"resuming: {len(pending)} shard(s) of rank 0 left", flush=True)

    # ---- the loop: one shard = items_per_shard items, teacher forward per batch_size items
    collate = partial(padded_collate, pad_id=tokenizer.pad_id)
    started, teacher_tokens, positions = time.perf_counter(), 0, 0
    for n, shard in enumerate(pending):
        shard_items = [items[i] for i in writer.shard_items(shard)]
        values, ids, logz, examples = [], [], [], []
        for start in range(0, len(shard_items), s.batch_size):
            batch = collate(shard_items[start : start + s.batch_size])
            examples.extend(e for row in batch_examples(batch) for e in row)
            v, i, z = teacher_topk(
                teacher, to_device(batch, rt.device), k=s.top_k, temperature=s.temperature, vocab_size=vocab_size,
                value_kind=s.value_kind, chunk_size=s.output_chunk_size,
            )  # fmt: skip
            values.append(v)
            ids.append(i)
            logz.append(z)
            teacher_tokens += int(batch["tokens"].numel())
            positions += int(v.shape[0])
        writer.write_shard(shard, _cat(values), _cat(ids), _cat(logz), examples)
        elapsed = time.perf_counter() - started
        print(
            f"rank {env.rank}: shard {shard + 1}/{manifest.num_shards} written ({n + 1}/{len(pending)} of this rank; "
            f"{teacher_tokens / max(elapsed, 1e-9):.0f} teacher tokens/s)",
            flush=True,
        )
    elapsed = time.perf_counter() - started

    # ---- the end: rank 0 merges the index once every rank is done
    D.barrier()
    writer.finalize()
    D.barrier()
    summary = {
        "output_dir": str(rt.output_dir),
        "num_positions": manifest.num_positions,
        "bytes_per_token": manifest.bytes_per_token,
        "shards_written": len(pending),
        "positions_written": positions,
        "teacher_tokens": teacher_tokens,
        "seconds": elapsed,
        "teacher_tokens_per_second": teacher_tokens / elapsed if elapsed > 0 else float("nan"),
    }
    if env.is_rank_zero:
        print(
            f"wrote {rt.output_dir}: {manifest.num_shards} shards, {manifest.num_positions} positions; this run: "
            f"{positions} positions, {teacher_tokens} teacher tokens in {elapsed:.1f} s",
            flush=True,
        )
    return summary


def _cat(parts: list) -> Any:
    import torch

    return torch.cat(parts) if parts else torch.zeros(0)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``--config <name|path> [overrides...]``."""
    build_cache(parse_recipe_args(sys.argv[1:] if argv is None else argv, settings=CacheTeacherLogitsSettings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
