"""Cached-teacher KD vs live-teacher KD, measured through the real recipes (run by hand; no timed test runs it).

Three parts, each writing its files under ``--work`` (reused between calls: assets and caches are built once):

``throughput``
    A Qwen2-style student and a teacher several times its size (random weights, a byte-level BPE tokenizer of a few
    thousand tokens, chat data of a few hundred tokens per example) are trained for ``--steps`` optimizer steps by
    ``recipes/knowledge_distillation_single_device.py``: A = live teacher, B = the teacher's top-k cache (built first by
    ``recipes/cache_teacher_logits.py``). Every run is a fresh process; the runs alternate A B A B ... The figure is
    the training loop's trained (label) tokens per second over steps 2..N (step 1 is warm-up), from the recipe's own
    per-step ``num_tokens`` / ``tokens_per_second``; each process's wall time and the 1-minute load average sampled
    during each run are reported beside it.

``cache``
    The cost of the cache at ``--top-k`` (default 64) with bf16 and fp32 values, on the throughput part's data and
    teacher: bytes per trained token (the manifest's figure and the bytes on disk / trained positions) and the build
    rate of ``cache_teacher_logits`` (teacher tokens/s as the recipe counts them: every position of every batch,
    padding included; and trained positions/s).

``quality``
    The quickstart task family (``kdtune.quickstart``: its task generator, tokenizer, model shapes, teacher and student
    configs; the ``default`` preset): the teacher is fine-tuned as ``kdtune quickstart`` does, its top-k cache is built
    on the students' data (train + validation), and for each seed two students are distilled with the same data, steps
    and seed: one from the live teacher (``configs/quickstart/student_kd.yaml`` as is), one from the cache. Both are
    scored on the held-out test split with the quickstart's own scorer (mean cross-entropy per answer token, and exact
    match of greedy answers).

Examples::

    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    python benchmarks/bench_cached_kd.py throughput --work /tmp/bench_cached_kd --steps 20 --repeats 2
    python benchmarks/bench_cached_kd.py cache --work /tmp/bench_cached_kd
    python benchmarks/bench_cached_kd.py quality --work /tmp/bench_cached_kd --seeds 0 1 2
    python benchmarks/bench_cached_kd.py all --work /tmp/bench_cached_kd --json results.json

A noise floor for ``quality``: ``--top-k 259 --value-dtype fp32`` (k = V of the quickstart tokenizer) distils from a cache
that is mathematically the live teacher, so its held-out-loss differences are run-to-run numerics only.

Measured (2-core shared CPU, torch 2.13, OMP_NUM_THREADS=1), bf16 top-64, tail=bucket, student 96x2 (0.55M params, 71 %
of them the tied embedding; 0.55M matmul MACs per token) / teacher 256x4 (4.46M params = 8.1x; 3.41M MACs per token =
6.2x), V=4099, batch 8, seq <= 256, 20 steps. Since the fused sparse chunk loss (kdtune.losses.sparse_fused), 4 A/B
pairs at load 2.8-3.7: live 2645 vs cached 6660 trained tokens/s = 2.52x (pairs 2.47, 2.55, 2.54, 2.43); another 4 at
load 1.9-3.6: 2.46x (1.79, 2.61, 2.70, 2.43); per-step CPU time of the same step (teacher/cache, student forward,
objective, backward, AdamW; load-independent): 2.6-2.8x. On 2 quiet cores (load ~1.1, 4 pairs each): this pair 2.39x (2.35-2.51; live
4361 vs cached 10413 tokens/s); ``--student-dim 128 --student-layers 4 --teacher-dim 320 --teacher-layers 6`` (7.3x
params, 6.1x MACs) 2.38x (2.26-2.44); ``--teacher-layers 5`` (256x5: 9.1x params, 7.3x MACs) 2.77x (2.68-2.82). With kdtune's
default output chunks (memory budget; the runs above pinned the tiny config's 4, as the benchmark did then), quiet:
2.55x (pairs 2.54, 2.44, 2.37, 2.77; live 4100 vs cached 10460 tokens/s); with the other core busy: 2.45x. The
ratio follows the teacher's per-token compute: the cached step is the student's own step plus ~15 % for the loss. Before it: 1.80x at load ~2. Teacher 256x8 (12.3x): 2.64x
before. Cache: 388 B/token bf16, 516 B/token fp32 (dense fp32 logits: 16396); built at ~12k teacher tokens/s (~7k
trained positions/s). Quality (the quickstart task family with the budgets its default had then:
``quality --teacher-steps 1200 --student-steps 300 --seeds 0 1 2 3 4``, held-out test CE, live mean 1.7015): k=64
bf16 bucket 1.6891 (-0.73 %; per seed +3.86, +0.07, -0.46, -4.00, -2.89 %), renormalize 1.7099 (+0.50 %; +3.92,
-0.67, -2.89, -0.21, +2.36 %); k = V controls (the live teacher up to rounding): fp32 -0.24 % (+0.52, -0.29, -0.17,
+0.37, -1.60 %), bf16 -0.45 % (+0.14, +0.59, -0.32, -0.52, -2.13 %). Per-seed differences are trajectory noise (the
runs' losses agree to 4 digits for ~30 steps, then drift apart); the live seeds themselves spread 2.5 % (std). Longer
student budgets (1,200 steps on 400 labels) are no yardstick: the students overfit for ~100 epochs and a k = V fp32
control differed by +70 % on one seed.

Every recipe run is also an ordinary command: the composed configs are saved as ``<work>/configs/*.yaml`` and each run
is ``kdtune run <recipe> --config <that file>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# this checkout's kdtune, here and in every process started from here (`kdtune run` steps included), never an
# installed copy of another checkout
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
KD_RECIPE = "knowledge_distillation_single_device"
CACHE_RECIPE = "cache_teacher_logits"
RESULT_PREFIX = "BENCH_RESULT "


# --------------------------------------------------------------------------------------------------------------------
# child processes: one recipe run each, the result printed as one JSON line


def _load_recipe(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(recipe: str, config: str) -> None:
    """Run ``recipe`` on the config file ``config`` in this process and print what it measured."""
    from kdtune.config import load_config

    cfg = load_config(config)
    if recipe == CACHE_RECIPE:
        result = _load_recipe(recipe).build_cache(cfg)
    else:
        summary = _load_recipe(recipe).train(cfg)
        result = {"steps": summary.steps, "evals": summary.evals}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _run_child(recipe: str, config: Path, log: Path) -> dict[str, Any]:
    """``recipe`` on ``config`` in a fresh process; returns its result, wall seconds and the load average meanwhile."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", recipe, str(config)]
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=out, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    out_lines = proc.stdout.splitlines()
    with open(log, "a") as f:
        f.write("\n".join(line for line in out_lines if not line.startswith(RESULT_PREFIX)) + "\n")
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} on {config} failed (exit {proc.returncode}); see {log}")
    result = json.loads(next(line for line in out_lines if line.startswith(RESULT_PREFIX))[len(RESULT_PREFIX) :])
    loads = loads or [os.getloadavg()[0]]
    return {**result, "wall_s": wall, "load_mean": statistics.fmean(loads), "load_max": max(loads)}


def _save_config(cfg: Any, path: Path) -> Path:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path)
    return path


def _compose(base: str, overrides: list[str]) -> Any:
    from kdtune.config import apply_overrides, load_config

    return apply_overrides(load_config(ROOT / "configs" / f"{base}.yaml"), overrides)


def _cached_teacher_overrides(cache_dir: Path, tail: str, has_teacher_tokenizer: bool) -> list[str]:
    drop = ["~teacher_model", "~teacher_checkpointer"] + (["~teacher_tokenizer"] if has_teacher_tokenizer else [])
    return [*drop, f"+teacher_logits={{_component_: kdtune.losses.CachedTeacher, path: {cache_dir}, tail: {tail}}}"]


def _n_params(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------------------------------------------------
# part 1 and 2: the throughput pair and its cache

_SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["an", "en", "in", "on", "ul", "ar", "er", "or"]


def _lexicon(n: int, rng: random.Random) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def _sentence(rng: random.Random, lexicon: list[str], weights: list[float], n: int) -> str:
    return " ".join(rng.choices(lexicon, weights, k=n))


def _tag(args: argparse.Namespace) -> str:
    """The name of a student/teacher shape pair (caches and runs of different pairs live side by side)."""
    return f"s{args.student_dim}x{args.student_layers}_t{args.teacher_dim}x{args.teacher_layers}"


def make_throughput_assets(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Tokenizer (~``--vocab`` tokens), student and teacher HF directories and chat data; each built once per spec."""
    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.models import make_tiny_hf_checkpoint
    from kdtune.testing.tokenizers import write_bpe_tokenizer

    root = work / "throughput_assets"
    data_spec = {"vocab": args.vocab, "examples": args.examples, "words": args.words_per_answer}
    paths = {
        "tokenizer": root / f"tok_{args.vocab}",
        "student": root / f"student_d{args.student_dim}x{args.student_layers}_v{args.vocab}",
        "teacher": root / f"teacher_d{args.teacher_dim}x{args.teacher_layers}_v{args.vocab}",
        "data": root / f"train_v{args.vocab}_n{args.examples}_w{args.words_per_answer}.jsonl",
    }
    rng = random.Random(0)
    lexicon = _lexicon(6000, rng)
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(lexicon))]  # Zipf-like word frequencies
    corpus = [_sentence(rng, lexicon, weights, 200) for _ in range(400)] + lexicon
    if not (paths["tokenizer"] / "tokenizer.json").exists():
        print(f"[assets] training a byte-level BPE tokenizer to {args.vocab} tokens (a few minutes) ...", flush=True)
        t0 = time.perf_counter()
        write_bpe_tokenizer(paths["tokenizer"], corpus, vocab_size=args.vocab, style="qwen2")
        print(f"[assets] tokenizer trained in {time.perf_counter() - t0:.0f} s", flush=True)
    vocab = load_hf_tokenizer(paths["tokenizer"]).vocab_size
    for name, dim, layers, tie, seed in (
        ("student", args.student_dim, args.student_layers, True, 0),
        ("teacher", args.teacher_dim, args.teacher_layers, False, 1),
    ):
        if (paths[name] / "model.safetensors").exists():
            continue
        heads = max(2, dim // 32)
        make_tiny_hf_checkpoint(
            paths[name], family="qwen2", vocab_size=vocab, dim=dim, layers=layers, heads=heads,
            kv_heads=max(1, heads // 2), tie=tie, seed=seed,
        )  # fmt: skip
        for f in paths["tokenizer"].iterdir():
            (paths[name] / f.name).write_bytes(f.read_bytes())
    marker = paths["data"].with_suffix(".spec.json")
    if not (marker.exists() and json.loads(marker.read_text()) == data_spec):
        with open(paths["data"], "w") as f:
            for _ in range(args.examples):
                prompt = "continue: " + _sentence(rng, lexicon, weights, rng.randint(5, 15))
                n = rng.randint(args.words_per_answer // 2, args.words_per_answer)
                chat = [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": _sentence(rng, lexicon, weights, n)},
                ]
                f.write(json.dumps({"messages": chat}) + "\n")
        marker.write_text(json.dumps(data_spec))
    return paths


def _throughput_data_overrides(assets: dict[str, Path], args: argparse.Namespace) -> list[str]:
    return [
        f"tokenizer.checkpoint_dir={assets['student']}",
        f"tokenizer.max_seq_len={args.max_seq_len}",
        f"dataset.data_files={assets['data']}",
        "val_split_ratio=0.1",
        "seed=0",
    ]


def build_cache(work: Path, name: str, cache_cfg: Any, log_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Build (or reuse) the cache ``name`` from the composed ``cache_teacher_logits`` config."""
    out = work / "caches" / name
    summary_file = out / "bench_summary.json"
    config = _save_config(cache_cfg, work / "configs" / f"cache_{name}.yaml")
    if summary_file.exists() and (out / "manifest.json").exists():
        return out, json.loads(summary_file.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    print(f"[cache] kdtune run {CACHE_RECIPE} --config {config}", flush=True)
    result = _run_child(CACHE_RECIPE, config, log_dir / f"cache_{name}.log")
    disk = sum(p.stat().st_size for p in (out / "shards").iterdir()) + (out / "index.safetensors").stat().st_size
    result["disk_bytes"] = disk
    result["disk_bytes_per_token"] = disk / result["num_positions"]
    result["positions_per_second"] = result["positions_written"] / result["seconds"]
    summary_file.write_text(json.dumps(result))
    return out, result


def throughput_cache_cfg(work: Path, assets: dict[str, Path], args: argparse.Namespace, dtype: str) -> Any:
    return _compose(
        "tiny/cache_teacher_logits",
        [
            f"output_dir={work / 'caches' / f'throughput_{_tag(args)}_k{args.top_k}_{dtype}'}",
            f"teacher_checkpointer.checkpoint_dir={assets['teacher']}",
            *_throughput_data_overrides(assets, args),
            f"top_k={args.top_k}",
            f"value_dtype={dtype}",
            "batch_size=8",
            "items_per_shard=64",
        ],
    )


def part_cache(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    assets = make_throughput_assets(work, args)
    out = {}
    for dtype in ("bf16", "fp32"):
        name = f"throughput_{_tag(args)}_k{args.top_k}_{dtype}"
        path, summary = build_cache(work, name, throughput_cache_cfg(work, assets, args, dtype), work / "logs")
        manifest = json.loads((path / "manifest.json").read_text())
        out[dtype] = {
            "cache_dir": str(path),
            "k": manifest["k"],
            "vocab_size": manifest["vocab_size"],
            "trained_positions": summary["num_positions"],
            "manifest_bytes_per_token": manifest["bytes_per_token"],
            "disk_bytes_per_token": round(summary["disk_bytes_per_token"], 1),
            "disk_MiB": round(summary["disk_bytes"] / 2**20, 2),
            "dense_fp32_logits_bytes_per_token": 4 * manifest["vocab_size"],
            "build_seconds": round(summary["seconds"], 2),
            "teacher_tokens_per_second": round(summary["teacher_tokens_per_second"], 1),
            "trained_positions_per_second": round(summary["positions_per_second"], 1),
            "build_process_wall_s": round(summary["wall_s"], 1),
            "load_mean": round(summary["load_mean"], 2),
        }
    return out


def _loop_rate(steps: list[dict[str, float]]) -> tuple[float, int]:
    """Trained tokens/s of steps 2..N (the recipe's per-step num_tokens / tokens_per_second) and tokens per step."""
    timed = steps[1:] if len(steps) > 1 else steps
    tokens = sum(s["num_tokens"] for s in timed)
    seconds = sum(s["num_tokens"] / s["tokens_per_second"] for s in timed)
    return tokens / seconds, int(statistics.fmean(s["num_tokens"] for s in steps))


def part_throughput(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    assets = make_throughput_assets(work, args)
    cache_dir, _ = build_cache(
        work, f"throughput_{_tag(args)}_k{args.top_k}_{args.value_dtype}",
        throughput_cache_cfg(work, assets, args, args.value_dtype), work / "logs",
    )  # fmt: skip
    common = [
        f"checkpointer.checkpoint_dir={assets['student']}",
        f"teacher_checkpointer.checkpoint_dir={assets['teacher']}",
        *_throughput_data_overrides(assets, args),
        f"batch_size={args.batch_size}",
        "gradient_accumulation_steps=1",
        f"max_steps={args.steps}",
        "eval_every_n_steps=null",
        "save_every_n_steps=null",
        "log_every_n_steps=1",
        "log_peak_memory_stats=false",
        "num_output_chunks=null",  # kdtune's default, as a user's config has it (chunks sized by the memory budget)
    ]
    configs = {
        "live": _compose("tiny/kd", [f"output_dir={work / 'runs' / f'throughput_{_tag(args)}_live'}", *common]),
        "cached": _compose(
            "tiny/kd",
            [
                f"output_dir={work / 'runs' / f'throughput_{_tag(args)}_cached'}",
                *common,
                *_cached_teacher_overrides(cache_dir, args.tail, has_teacher_tokenizer=True),
            ],
        ),
    }
    paths = {k: _save_config(v, work / "configs" / f"throughput_{_tag(args)}_{k}.yaml") for k, v in configs.items()}
    runs: dict[str, list[dict[str, Any]]] = {"live": [], "cached": []}
    for r in range(args.repeats):
        for kind in ("live", "cached"):  # A B A B ...
            import shutil

            shutil.rmtree(configs[kind].output_dir, ignore_errors=True)
            print(f"[throughput {r + 1}/{args.repeats}] kdtune run {KD_RECIPE} --config {paths[kind]}", flush=True)
            res = _run_child(KD_RECIPE, paths[kind], work / "logs" / f"throughput_{_tag(args)}_{kind}_{r}.log")
            rate, per_step = _loop_rate(res["steps"])
            row = {
                "tokens_per_second": round(rate, 1),
                "tokens_per_step": per_step,
                "process_wall_s": round(res["wall_s"], 2),
                "load_mean": round(res["load_mean"], 2),
                "load_max": round(res["load_max"], 2),
                "final_loss": round(res["steps"][-1]["loss"], 4),
            }
            print(f"    {kind}: {row}", flush=True)
            runs[kind].append(row)
    live = [r["tokens_per_second"] for r in runs["live"]]
    cached = [r["tokens_per_second"] for r in runs["cached"]]
    pairs = [c / a for a, c in zip(live, cached)]
    return {
        "student_params": _n_params(assets["student"]),
        "teacher_params": _n_params(assets["teacher"]),
        "teacher_over_student": round(_n_params(assets["teacher"]) / _n_params(assets["student"]), 2),
        "vocab_size": json.loads((assets["student"] / "config.json").read_text())["vocab_size"],
        "max_seq_len": args.max_seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "top_k": args.top_k,
        "value_dtype": args.value_dtype,
        "tail": args.tail,
        "runs": runs,
        "live_tokens_per_second_median": statistics.median(live),
        "cached_tokens_per_second_median": statistics.median(cached),
        "speedup_per_pair": [round(p, 2) for p in pairs],
        "speedup_median_of_medians": round(statistics.median(cached) / statistics.median(live), 2),
        "wall_speedup": round(
            statistics.median(r["process_wall_s"] for r in runs["live"])
            / statistics.median(r["process_wall_s"] for r in runs["cached"]),
            2,
        ),
    }


# --------------------------------------------------------------------------------------------------------------------
# part 3: quality on the quickstart task family


def part_quality(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from kdtune.quickstart import pipeline as qs
    from kdtune.quickstart.evaluate import evaluate_checkpoint
    from kdtune.quickstart.tasks import read_jsonl

    preset = qs.PRESETS[args.preset]
    steps = {"teacher_steps": args.teacher_steps, "student_steps": args.student_steps}
    preset = dataclasses.replace(preset, **{k: v for k, v in steps.items() if v is not None})
    out = work / "quickstart"
    data = qs.prepare_data(out, preset)
    tokenizer_dir = qs.prepare_tokenizer(out)
    teacher_init = qs.prepare_model(out / "init" / "teacher", preset.teacher_dims, tokenizer_dir, seed=1000)
    t0 = time.perf_counter()
    teacher = qs.run_step(
        out / "runs" / "teacher", "full_finetune_single_device", "quickstart/teacher",
        [f"checkpointer.checkpoint_dir={teacher_init}", f"dataset.data_files={data['teacher_train']}",
         f"val_dataset.data_files={data['val']}", f"max_steps={preset.teacher_steps}",
         f"batch_size={preset.batch_size}", "seed=0"],
        force=False,
    )  # fmt: skip
    print(f"[quality] teacher ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    # the cache of the students' data (train + validation), keyed exactly as configs/quickstart/student_kd.yaml
    kd = _compose("quickstart/student_kd", [])
    cache_cfg = _compose(
        "tiny/cache_teacher_logits",
        [
            "~val_split_ratio",
            f"output_dir={work / 'caches' / f'quickstart_k{args.top_k}_{args.value_dtype}'}",
            f"teacher_checkpointer.checkpoint_dir={teacher / 'final'}",
            f"tokenizer.checkpoint_dir={tokenizer_dir}",
            f"tokenizer.max_seq_len={kd.tokenizer.max_seq_len}",
            f"dataset={json.dumps(dict(kd.dataset) | {'data_files': str(data['train'])})}",
            f"+val_dataset={json.dumps(dict(kd.val_dataset) | {'data_files': str(data['val'])})}",
            f"top_k={args.top_k}",
            f"value_dtype={args.value_dtype}",
            "batch_size=32",
            "items_per_shard=256",
        ],
    )
    cache_dir, cache_summary = build_cache(
        work, f"quickstart_k{args.top_k}_{args.value_dtype}", cache_cfg, work / "logs"
    )
    test = read_jsonl(data["test"])[: preset.eval_examples]
    rows = []
    for seed in args.seeds:
        student_init = qs.prepare_model(out / "init" / f"student_seed{seed}", preset.student_dims, tokenizer_dir, seed)
        common = [
            f"checkpointer.checkpoint_dir={student_init}",
            f"dataset.data_files={data['train']}",
            f"val_dataset.data_files={data['val']}",
            f"max_steps={preset.student_steps}",
            f"batch_size={preset.batch_size}",
            f"seed={seed}",
            "progress_bar=false",
        ]
        live = qs.run_step(
            out / "runs" / f"kd_live_seed{seed}", KD_RECIPE, "quickstart/student_kd",
            [*common, f"teacher_checkpointer.checkpoint_dir={teacher / 'final'}"], force=False,
        )  # fmt: skip
        cached = qs.run_step(
            out / "runs" / f"kd_cached_k{args.top_k}_{args.value_dtype}_{args.tail}_seed{seed}", KD_RECIPE,
            "quickstart/student_kd",
            [*common, *_cached_teacher_overrides(cache_dir, args.tail, has_teacher_tokenizer=False)], force=False,
        )  # fmt: skip
        scores = {k: evaluate_checkpoint(str(d / "final"), test) for k, d in (("live", live), ("cached", cached))}
        row = {
            "seed": seed,
            "live_heldout_loss": round(scores["live"]["loss"], 5),
            "cached_heldout_loss": round(scores["cached"]["loss"], 5),
            "relative_difference": round(scores["cached"]["loss"] / scores["live"]["loss"] - 1, 5),
            "live_accuracy": round(scores["live"]["accuracy"], 4),
            "cached_accuracy": round(scores["cached"]["accuracy"], 4),
        }
        print(f"[quality] {row}", flush=True)
        rows.append(row)
    teacher_score = evaluate_checkpoint(str(teacher / "final"), test)
    live_mean = statistics.fmean(r["live_heldout_loss"] for r in rows)
    cached_mean = statistics.fmean(r["cached_heldout_loss"] for r in rows)
    return {
        "preset": args.preset,
        "top_k": args.top_k,
        "value_dtype": args.value_dtype,
        "tail": args.tail,
        "vocab_size": json.loads((cache_dir / "manifest.json").read_text())["vocab_size"],
        "test_examples": len(test),
        "teacher_heldout_loss": round(teacher_score["loss"], 5),
        "teacher_accuracy": round(teacher_score["accuracy"], 4),
        "cache_bytes_per_token": cache_summary["disk_bytes_per_token"],
        "per_seed": rows,
        "live_heldout_loss_mean": round(live_mean, 5),
        "cached_heldout_loss_mean": round(cached_mean, 5),
        "relative_difference_of_means": round(cached_mean / live_mean - 1, 5),
        "max_abs_relative_difference": max(abs(r["relative_difference"]) for r in rows),
    }


# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["throughput", "cache", "quality", "all"])
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_cached_kd"), help="assets, caches, runs, logs")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--value-dtype", choices=["bf16", "fp32"], default="bf16", help="cache values (parts 1 and 3)")
    p.add_argument("--tail", choices=["bucket", "renormalize"], default="bucket")
    g = p.add_argument_group("throughput / cache")
    g.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary before the special tokens")
    g.add_argument("--student-dim", type=int, default=96)
    g.add_argument("--student-layers", type=int, default=2)
    g.add_argument("--teacher-dim", type=int, default=256)
    g.add_argument("--teacher-layers", type=int, default=4)
    g.add_argument("--examples", type=int, default=400)
    g.add_argument("--words-per-answer", type=int, default=120)
    g.add_argument("--max-seq-len", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--repeats", type=int, default=2, help="A B pairs (fresh processes, alternating)")
    g = p.add_argument_group("quality")
    g.add_argument("--preset", default="default", help="kdtune.quickstart preset")
    g.add_argument("--seeds", type=int, nargs="+", default=[0])
    g.add_argument("--teacher-steps", type=int, default=None, help="override the preset's teacher steps")
    g.add_argument("--student-steps", type=int, default=None, help="override the preset's student steps")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        _child(argv[1], argv[2])
        return 0
    args = build_parser().parse_args(argv)
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"load_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    parts = ["throughput", "cache", "quality"] if args.part == "all" else [args.part]
    for part in parts:
        results[part] = {"throughput": part_throughput, "cache": part_cache, "quality": part_quality}[part](work, args)
        print(json.dumps({part: results[part]}, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
