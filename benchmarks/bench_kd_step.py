"""A KD training step, kdtune vs torchtune 0.6.1 at equal settings: tokens/s, peak RSS and kdtune's MFU (run by hand).

Both frameworks train the same LoRA student (r 8, alpha 16, on q/v projections) against the same frozen teacher,
from the same Qwen2-architecture HF checkpoints (random weights written here), with the same byte-level BPE tokenizer
(``vocab.json`` + ``merges.txt``) on the same plain-text data (every text is longer than ``--seq-len`` tokens, so every
sequence is truncated to exactly ``--seq-len`` and both do identical work): batch 4, fp32, CPU, forward KL,
``kd_ratio`` 0.5, AdamW, no gradient clipping, 20 steps, no validation, no checkpoint inside the timed steps. Each
framework's own KD recipe runs in a fresh process (``kdtune run`` / ``tune run``, the config written here), A B A B ...
alternating so a change in machine load hits both alike. kdtune uses its defaults (the fused output layer + loss with
chunks sized by its memory budget); torchtune its recipe's (8 output chunks).

Figures, per run: the median of the per-step tokens/s each framework logs (steps 3..N; both count trained = non-masked
label tokens per step wall time, data loading and optimizer step included; torchtune counts labels before its shift,
one more token per sequence than are trained, which is corrected here by ``m / (m + 1)`` with ``m`` the trained tokens
per sequence of the paired kdtune run, ``T - 1`` for full-length data) and the process's peak RSS (``ru_maxrss`` of
the run's process tree). Reported: the ratio per A/B pair and their median, with the load average at each run.

``--data varied`` draws each text's length (``seq-len / 16`` to ``3 seq-len / 4`` words), so batches carry padding as
real data does; the runs then train one epoch in file order (``shuffle: false``, the same batches in both) and the
figure is trained tokens over the step time of steps 3..N (steps differ in size, so a median of per-step rates would
weigh them wrongly); ``--kdtune-set`` / ``--torchtune-set`` add command-line overrides to one framework's runs (e.g.
``+group_by_length=true``, a kdtune setting torchtune has no counterpart of: that is then a comparison of features,
not of equal settings). ``--packed`` packs the varied data in both (torchtune's rows are then ``seq-len`` labels, one
dropped by the shift; per-step rates as for full-length data).

MFU: kdtune's step FLOPs (``kdtune.estimate``: matmuls + attention of the teacher forward and the student forward +
backward, and both output layers) divided by the measured step time, against this CPU's fp32 GEMM peak measured here
(``torch.mm`` of 2048 x 2048 at the same thread count).

Measured (2026-12-02, 2 quiet cores, load ~1.0 = this benchmark alone, 1 thread), kdtune / torchtune 0.6.1:

==========================  ===========================  ==========================
setting (both frameworks)   small 5.1M / 1.3M, V 4096    medium 49.7M / 12.6M, V 32000
==========================  ===========================  ==========================
``compile: false`` (eager)  1.29x (1.27, 1.29, 1.35)     1.49x (1.49, 1.49)
``compile: true``           1.38x (1.33, 1.38, 1.48)     1.58x (1.58, 1.58)
peak RSS, eager / compile   0.82x / 0.95x                0.56x / 0.76x
==========================  ===========================  ==========================

(``--repeats 3`` small, ``--repeats 2`` medium; per A/B pair in brackets.) With ``compile: true`` on a CPU through inductor's C++ wrapper
(2026-12-02, load 1.1-1.4): small pair **1.42x** (1.47, 1.30, 1.42); torchtune's own compile takes it from ~3300 to
~4400 tokens/s, kdtune's from ~4200 to ~6200. With the chunk loss compiled too (2026-12-02, load 0.4-1.2): small pair
1.43x (1.43, 1.40, 1.50), peak RSS 1.01x (the compiled loss's gradient is a tensor of its own: +16 MiB); medium pair
1.50x (1.44, 1.56), peak RSS 0.86x (+63 MiB); in-process A/B of the compiled vs the eager chunk loss: medium step
-3.5 % (1032, 1008 vs 1058, 1057 ms), small -1.3 % (median of 7 pairs). Varied-length data (``--data varied``,
small pair, 2026-12-02, load 0.2-0.8, ``--repeats 2``): equal settings (both unpacked, the same batches) **1.37x**
(1.41, 1.33), medium pair **1.82x** (1.85, 1.78), peak RSS 0.61x; kdtune with ``--kdtune-set +group_by_length=true`` (no torchtune counterpart) **1.85x** (1.85, 1.86).
On varied data kdtune's fused loss computes no logits for padded positions, torchtune's chunked loss does. The
per-step token counts derived for torchtune equal kdtune's logged ones step for step (checked), and torchtune's
tokenizer gives the same lengths as kdtune's on these files. Both packed (``--data varied --packed``: rows filled to
``seq-len``, torchtune splitting documents across rows, kdtune masking attention at document boundaries): **1.21x**
(1.20, 1.23), as at full length (the rows are full). Medium MFU (eager): 55 % of a 167.2 GFLOP/s
fp32 GEMM peak (step 1.29 s). ``--compile`` sets ``compile: true`` in both configs: torchtune then compiles its
student's layers and its two losses, kdtune each decoder layer of the student and of the teacher and its fused chunk
loss. Earlier (2026-12-01,
load 2-4, eager): 1.24x / 1.55x; before ``kdtune.perf.keep_freed_memory``: 1.19x / 1.25x.

Where the small pair's eager step goes (profiled, per step of ~205 ms): matmuls ~100 ms and
``scaled_dot_product_attention`` (CPU flash kernel, forward + backward) ~33 ms, the same kernels torchtune calls; the
rest is elementwise work of the model bodies (norms, RoPE, SwiGLU, residuals: ~50 ms eager, ~20 ms compiled) and of
the loss (~14 ms). torchtune's step is ~275 ms, so a 1.5x step (~183 ms) leaves ~50 ms for everything but those
kernels: reachable only by fusing the model bodies' elementwise work, which ``compile: true`` does (~-18 ms).

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_kd_step.py --pairs small medium --repeats 2 \\
        --torchtune-python /work/wt/tt-venv/bin/python --json kd_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a of to and in is it that for on with as was by at be this are from or an have not they which one".split()
WORDS += "red blue green cat dog bird two three big small fast slow river stone light house water tree".split()

#: name -> vocab, teacher (dim, layers, heads, kv heads, ffn), student (dim, layers, heads, kv heads, ffn)
PAIRS = {
    "small": (4096, (256, 4, 4, 2, 704), (128, 4, 4, 2, 352)),  # ~5.0M / ~1.3M
    "medium": (32000, (512, 6, 8, 2, 1408), (256, 6, 4, 2, 704)),  # ~51M / ~12.7M
}


def _params(vocab: int, dims: tuple[int, ...], tie: bool) -> int:
    d, n, h, kv, f = dims
    hd = d // h
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d + (h + 2 * kv) * hd  # q, k, v, o (+ qkv biases)
    return vocab * d * (1 if tie else 2) + n * (attn + 3 * d * f + 2 * d) + d


def make_assets(pair: str, root: Path, seq_len: int, examples: int, varied: bool = False) -> dict[str, Any]:
    """Tokenizer, teacher and student HF directories and the text data of ``pair`` under ``root``: every text longer
    than ``seq_len`` tokens, or (``varied``) of a uniformly drawn length from ``seq_len // 16`` to ``3 * seq_len // 4``
    words."""
    from kdtune.testing.models import make_tiny_hf_checkpoint  # noqa: PLC0415
    from kdtune.testing.tokenizers import write_bpe_tokenizer  # noqa: PLC0415

    vocab, t_dims, s_dims = PAIRS[pair]
    rng = random.Random(0)
    lengths = [rng.randint(seq_len // 16, 3 * seq_len // 4) if varied else seq_len * 2 for _ in range(examples)]
    texts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]
    data = root / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    write_bpe_tokenizer(root / "tok", texts[:50], vocab_size=512, style="qwen2")
    dirs = {}
    for name, (d, n, h, kv, f), tie, seed in (("teacher", t_dims, False, 1), ("student", s_dims, True, 0)):
        out = make_tiny_hf_checkpoint(
            root / name, family="qwen2", vocab_size=vocab, dim=d, layers=n, heads=h, kv_heads=kv, tie=tie, seed=seed,
            intermediate_size=f, max_position_embeddings=seq_len,
        )  # fmt: skip
        for file in (root / "tok").iterdir():
            (out / file.name).write_bytes(file.read_bytes())
        dirs[name] = out
    return {"data": data, **dirs, "vocab": vocab, "teacher_dims": t_dims, "student_dims": s_dims}


def kdtune_config(a: dict[str, Any], out: Path, args: argparse.Namespace) -> str:
    """The kdtune KD config of the benchmark."""
    return textwrap.dedent(f"""\
        recipe: knowledge_distillation_single_device
        output_dir: {out}
        model:
          _component_: kdtune.models.hf_model
          checkpoint_dir: {a["student"]}
          lora_attn_modules: [q_proj, v_proj]
          lora_rank: 8
          lora_alpha: 16
          lora_dropout: 0.0
        checkpointer: {{_component_: kdtune.models.HFCheckpointer, checkpoint_dir: {a["student"]}, output_dir: {out}}}
        tokenizer: {{_component_: kdtune.data.load_hf_tokenizer, checkpoint_dir: {a["student"]}, max_seq_len: {args.seq_len}}}
        teacher_model: {{_component_: kdtune.models.hf_model, checkpoint_dir: {a["teacher"]}}}
        teacher_checkpointer: {{_component_: kdtune.models.HFCheckpointer, checkpoint_dir: {a["teacher"]}, output_dir: {out}}}
        dataset: {{_component_: kdtune.data.text_completion_dataset, source: json, data_files: {a["data"]}, column: text, packed: {str(args.packed).lower()}}}
        seed: 0
        shuffle: {str(args.data == "full" or args.packed).lower()}
        batch_size: {args.batch_size}
        gradient_accumulation_steps: 1
        epochs: 1
        max_steps: {args.steps}
        optimizer: {{_component_: torch.optim.AdamW, lr: 3.0e-4, weight_decay: 0.01}}
        lr_scheduler: {{_component_: kdtune.training.get_cosine_schedule_with_warmup, num_warmup_steps: 2}}
        kd_loss: {{_component_: kdtune.losses.ForwardKLLoss}}
        kd_ratio: 0.5
        temperature: 1.0
        clip_grad_norm: null
        device: cpu
        dtype: fp32
        compile: {str(args.compile).lower()}
        metric_logger: {{_component_: kdtune.training.DiskLogger, log_dir: {out}/logs}}
        log_every_n_steps: 1
        log_peak_memory_stats: false
        progress_bar: false
        save_adapter_weights_only: true
        """)


def torchtune_config(a: dict[str, Any], out: Path, args: argparse.Namespace) -> str:
    """The equivalent torchtune 0.6.1 KD config."""
    vocab = a["vocab"]

    def arch(dims: tuple[int, ...], tie: bool) -> str:
        d, n, h, kv, f = dims
        return (
            f"vocab_size: {vocab}, num_layers: {n}, num_heads: {h}, num_kv_heads: {kv}, embed_dim: {d}, "
            f"intermediate_dim: {f}, max_seq_len: {args.seq_len}, norm_eps: 1.0e-6, rope_base: 10000.0, "
            f"tie_word_embeddings: {str(tie).lower()}"
        )

    ckpt = "_component_: torchtune.training.FullModelHFCheckpointer, checkpoint_files: [model.safetensors], "
    ckpt += f"recipe_checkpoint: null, output_dir: {out}, model_type: QWEN2"
    return textwrap.dedent(f"""\
        output_dir: {out}
        model: {{_component_: torchtune.models.qwen2.lora_qwen2, lora_attn_modules: [q_proj, v_proj], apply_lora_to_mlp: false, lora_rank: 8, lora_alpha: 16, lora_dropout: 0.0, {arch(a["student_dims"], True)}}}
        teacher_model: {{_component_: torchtune.models.qwen2.qwen2, {arch(a["teacher_dims"], False)}}}
        tokenizer: {{_component_: torchtune.models.qwen2.qwen2_tokenizer, path: {a["student"]}/vocab.json, merges_file: {a["student"]}/merges.txt, special_tokens_path: {a["student"]}/tokenizer.json, max_seq_len: {args.seq_len}}}
        checkpointer: {{{ckpt}, checkpoint_dir: {a["student"]}}}
        teacher_checkpointer: {{{ckpt}, checkpoint_dir: {a["teacher"]}}}
        resume_from_checkpoint: false
        save_adapter_weights_only: true
        dataset: {{_component_: torchtune.datasets.text_completion_dataset, source: json, data_files: {a["data"]}, column: text, split: train, packed: {args.packed}}}
        seed: 0
        shuffle: {str(args.data == "full" or args.packed).lower()}
        batch_size: {args.batch_size}
        optimizer: {{_component_: torch.optim.AdamW, lr: 3.0e-4, weight_decay: 0.01}}
        lr_scheduler: {{_component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup, num_warmup_steps: 2}}
        loss: {{_component_: torchtune.modules.loss.CEWithChunkedOutputLoss}}
        kd_loss: {{_component_: torchtune.modules.loss.ForwardKLWithChunkedOutputLoss}}
        kd_ratio: 0.5
        epochs: 1
        max_steps_per_epoch: {args.steps}
        gradient_accumulation_steps: 1
        clip_grad_norm: null
        compile: {str(args.compile).lower()}
        metric_logger: {{_component_: torchtune.training.metric_logging.DiskLogger, log_dir: {out}/logs}}
        log_every_n_steps: 1
        log_peak_memory_stats: false
        device: cpu
        dtype: fp32
        enable_activation_checkpointing: false
        enable_activation_offloading: false
        profiler: {{_component_: torchtune.training.setup_torch_profiler, enabled: false}}
        """)


_LAUNCH = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def run_one(framework: str, a: dict[str, Any], work: Path, i: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh-process run; returns its median tokens/s (steps 3..N), peak RSS and the load average."""
    out = work / f"{framework}_{i}"
    shutil.rmtree(out, ignore_errors=True)  # a reused --work-dir must not hand back an earlier run's log
    cfg = work / f"{framework}.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if framework == "kdtune":
        cfg.write_text(kdtune_config(a, out, args))
        cmd = [sys.executable, "-m", "kdtune", "run", "knowledge_distillation_single_device", "--config", str(cfg)]
        cmd += args.kdtune_set
        env["PYTHONPATH"] = str(ROOT)
    else:
        cfg.write_text(torchtune_config(a, out, args))
        tune = str(Path(args.torchtune_python).parent / "tune")
        cmd = [args.torchtune_python, tune, "run", "knowledge_distillation_single_device", "--config", str(cfg)]
        cmd += args.torchtune_set
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, *cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = int(re.findall(r"MAXRSS_KIB (\d+)", proc.stdout)[-1]) * 1024
    tps: list[float] = []
    trained: list[float] = []
    if framework == "kdtune":
        for line in next((out / "logs").glob("*.jsonl")).read_text().splitlines():
            row = json.loads(line)
            if "tokens_per_second" in row:
                tps.append(float(row["tokens_per_second"]))
                trained.append(float(row["num_tokens"]))
    else:  # label tokens before the shift; converted to trained tokens by the caller
        text = next((out / "logs").glob("*.txt")).read_text()
        tps = [float(x) for x in re.findall(r"tokens_per_second_per_gpu:([\d.]+)", text)]
    timed = tps[2:] if len(tps) > 2 else tps
    return {
        "framework": framework,
        "tokens_per_second": statistics.median(timed),
        "step_tokens_per_second": tps,
        "step_trained_tokens": trained,
        # trained tokens per sequence (kdtune's count): torchtune counts one label more per sequence
        "trained_per_sequence": statistics.mean(trained) / args.batch_size if trained else None,
        "steps": len(tps),
        "peak_rss_gib": rss / 2**30,
        "load_avg_1m": load,
        "wall_s": time.perf_counter() - t0,
    }


def file_order_lengths(a: dict[str, Any], args: argparse.Namespace) -> list[int]:
    """Token count of every example of the benchmark data in file order, as both frameworks tokenize it (the text, then
    EOS; Qwen2 has no BOS), truncated to ``seq_len``."""
    from kdtune.data import load_hf_tokenizer, text_completion_dataset  # noqa: PLC0415

    tok = load_hf_tokenizer(checkpoint_dir=str(a["student"]), max_seq_len=args.seq_len)
    return text_completion_dataset(tok, source="json", data_files=str(a["data"]), column="text").lengths()


def aggregate_tokens_per_second(run: dict[str, Any], lengths: list[int], args: argparse.Namespace) -> float:
    """Trained tokens over step time of steps 3..N (``--data varied``, where steps differ in size).

    kdtune logs each step's trained tokens; torchtune only its label tokens per second, so its steps' sizes come from
    the data: with ``shuffle: false`` its step ``k`` is the examples ``[k B, (k + 1) B)`` in file order.
    """
    tps = run["step_tokens_per_second"]
    if run["framework"] == "kdtune":
        trained = run["step_trained_tokens"]
        seconds = [n / t for n, t in zip(trained, tps, strict=True)]
    else:
        b = args.batch_size
        labels = [sum(lengths[k * b : (k + 1) * b]) for k in range(len(tps))]
        trained = [n - b for n in labels]  # one label per sequence is dropped by the shift
        seconds = [n / t for n, t in zip(labels, tps, strict=True)]
    return sum(trained[2:]) / sum(seconds[2:])


def gemm_peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 ``torch.mm`` rate of ``n x n`` matrices at ``threads`` threads, GFLOP/s."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def kdtune_mfu(a: dict[str, Any], work: Path, args: argparse.Namespace, peak_gflops: float) -> dict[str, Any]:
    """kdtune's medium step: FLOPs from kdtune.estimate at the measured shapes over the calibrated step time."""
    code = textwrap.dedent(f"""\
        import json, torch
        torch.set_num_threads({args.threads})
        from kdtune.config import load_config
        from kdtune.estimate import calibrate
        c = calibrate(load_config({str(work / "kdtune.yaml")!r}), steps=6)
        print("CAL", json.dumps({{"step_s": c.step_seconds, "flops": c.estimate.flops_per_step, "tps": c.tokens_per_second}}))
        """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cal = json.loads(proc.stdout.split("CAL ", 1)[1])
    achieved = cal["flops"] / cal["step_s"] / 1e9
    return {**cal, "achieved_gflops": achieved, "peak_gflops": peak_gflops, "mfu": achieved / peak_gflops, "load": load}


_PHASES = """\
import json, statistics, time, torch
torch.set_num_threads({threads})
from kdtune.config import load_config, read_settings
from kdtune.data.collate import model_inputs
from kdtune.training import *
from kdtune.training.settings import KDSettings
from kdtune.perf import configure_cpu_process
configure_cpu_process()  # as setup_runtime does (allocator, subnormal flush)
s = read_settings(KDSettings, load_config({cfg!r}))
rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, output_dir=__import__("pathlib").Path("/tmp"))
student, _ = build_model(s.model, s.checkpointer, rt, lora_seed=s.seed)
tok = build_tokenizer(s.tokenizer); data = build_data(s, tok)
teacher = build_teacher(s, student, tok, data, lambda: build_model(s.teacher_model, s.teacher_checkpointer, rt)[0])
obj = build_objective(s, teacher); opt = build_optimizer(s.optimizer, trainable_parameters(student))
acc = StepAccumulator(student); times = {{}}
def tick(name, t0):
    times.setdefault(name, []).append(time.perf_counter() - t0); return time.perf_counter()
it = data.steps()
for i in range(6):
    t = time.perf_counter(); pos, (batch,) = next(it); t = tick("data", t)
    mask = batch["labels"][:, 1:] != -100
    state = obj.teacher.prepare(batch, mask); t = tick("teacher body forward", t)
    hidden = student(batch["tokens"], return_hidden=True, **model_inputs(batch)); t = tick("student body forward", t)
    out = obj.from_hidden(student, hidden, batch["labels"], state); t = tick("output layers + loss (fused, with grads)", t)
    acc.backward(out); t = tick("backward (student body)", t)
    optimizer_step(acc, student, opt, None, None, pos.global_step); t = tick("optimizer step", t)
med = {{k: statistics.median(v[1:]) for k, v in times.items()}}
print("PHASES", json.dumps(med))
"""


def phase_times(work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per phase of kdtune's KD step (steps 2..6, timers around each phase, fresh process)."""
    code = _PHASES.format(threads=args.threads, cfg=str(work / "kdtune.yaml"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.split("PHASES ", 1)[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["small", "medium"], choices=sorted(PAIRS))
    p.add_argument("--repeats", type=int, default=2, help="A/B pairs of runs per model pair")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--torchtune-python", default="/work/wt/tt-venv/bin/python")
    p.add_argument("--compile", action="store_true", help="compile: true in both frameworks' configs")
    p.add_argument(
        "--data",
        choices=["full", "varied"],
        default="full",
        help="full: every sequence seq-len tokens (identical work); varied: random lengths (padding, as real data)",
    )
    p.add_argument("--packed", action="store_true", help="dataset packed: true in both frameworks (with --data varied)")
    p.add_argument("--kdtune-set", nargs="*", default=[], help="extra kdtune overrides, e.g. +group_by_length=true")
    p.add_argument("--torchtune-set", nargs="*", default=[], help="extra torchtune overrides, e.g. dataset.packed=True")
    p.add_argument("--no-mfu", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--work-dir", default=None)
    args = p.parse_args(argv)
    results: dict[str, Any] = {"settings": vars(args), "pairs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-kd-step-") as tmp:
        base = Path(args.work_dir or tmp)
        for pair in args.pairs:
            work = base / pair
            work.mkdir(parents=True, exist_ok=True)
            varied = args.data == "varied"
            # unpacked varied data: exactly one epoch of `steps` steps, in file order (shuffle: false); packed: enough
            # examples for the steps' rows
            examples = args.batch_size * (
                args.steps if varied and not args.packed else 4 * args.steps if varied else args.steps + 2
            )
            a = make_assets(pair, work, args.seq_len, examples, varied=varied)
            lengths = file_order_lengths(a, args) if varied and not args.packed else []
            vocab, t_dims, s_dims = PAIRS[pair]
            sizes = (
                f"teacher {_params(vocab, t_dims, False) / 1e6:.1f}M, student {_params(vocab, s_dims, True) / 1e6:.1f}M"
            )
            print(f"== {pair}: vocab {vocab}, {sizes}", flush=True)
            runs = []
            for i in range(args.repeats):
                for fw in ("kdtune", "torchtune"):
                    r = run_one(fw, a, work, i, args)
                    if varied and not args.packed:
                        r["tokens_per_second"] = aggregate_tokens_per_second(r, lengths, args)
                    elif fw == "torchtune" and args.packed:  # full rows of seq_len labels (documents split across
                        r["tokens_per_second"] *= (args.seq_len - 1) / args.seq_len  # rows), one dropped by the shift
                    elif fw == "torchtune":  # its count per sequence is trained + 1 (labels before the shift)
                        m = runs[-1]["trained_per_sequence"]
                        r["tokens_per_second"] *= m / (m + 1)
                    runs.append(r)
                    print(
                        f"  {fw:<9} run {i}: {r['tokens_per_second']:8.1f} tok/s  peak RSS {r['peak_rss_gib']:.2f} GiB  "
                        f"load {r['load_avg_1m']:.1f}",
                        flush=True,
                    )
            kd = [r for r in runs if r["framework"] == "kdtune"]
            tt = [r for r in runs if r["framework"] == "torchtune"]
            tps_ratio = [k["tokens_per_second"] / t["tokens_per_second"] for k, t in zip(kd, tt, strict=True)]
            rss_ratio = [k["peak_rss_gib"] / t["peak_rss_gib"] for k, t in zip(kd, tt, strict=True)]
            summary = {
                "params": sizes,
                "runs": runs,
                "tokens_per_second_ratio": tps_ratio,
                "tokens_per_second_ratio_median": statistics.median(tps_ratio),
                "peak_rss_ratio": rss_ratio,
                "peak_rss_ratio_median": statistics.median(rss_ratio),
            }
            print(
                f"  kdtune / torchtune: tokens/s {statistics.median(tps_ratio):.2f}x (per pair "
                f"{', '.join(f'{x:.2f}' for x in tps_ratio)}), peak RSS {statistics.median(rss_ratio):.2f}x",
                flush=True,
            )
            if pair == "medium" and not args.no_mfu:
                peak = gemm_peak_gflops(args.threads)
                summary["mfu"] = kdtune_mfu(a, work, args, peak)
                m = summary["mfu"]
                print(
                    f"  kdtune MFU: {m['achieved_gflops']:.1f} GFLOP/s of a {peak:.1f} GFLOP/s fp32 GEMM peak "
                    f"({args.threads} thread(s)) = {m['mfu'] * 100:.0f} % (step {m['step_s']:.2f} s, load {m['load']:.1f})",
                    flush=True,
                )
                summary["phases_s"] = phases = phase_times(work, args)
                total = sum(phases.values())
                print(
                    "  kdtune step phases: " + ", ".join(f"{k} {v:.3f} s ({v / total:.0%})" for k, v in phases.items())
                )
            results["pairs"][pair] = summary
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
