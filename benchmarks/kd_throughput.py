"""KD training throughput and memory, and the KD loss's own peak memory at a large vocabulary (run by hand).

Part 1 ("train") builds a Llama-architecture student and teacher with kdtune's builders (random weights), freezes the
teacher with ``setup_teacher``, and runs real KD optimizer steps exactly as the recipe does: teacher forward under
``no_grad`` → ``DistillationObjective`` (chunked, fp32 per chunk) → ``StepAccumulator`` → AdamW. It reports
tokens/s (valid label tokens per second, timed steps only) and peak memory (CUDA allocator peak on GPU; process peak
RSS on CPU).

Part 2 ("loss") measures the memory of the KD loss alone — forward + backward of cross-entropy + forward KL from
hidden states for ``--loss-tokens`` positions at ``--loss-vocab`` (default 128256, Llama-3) — computed unchunked
(full ``[N, V]`` logits of both models, then the loss) versus chunked (``DistillationObjective`` with
``--num-output-chunks``). On CPU each variant runs in a fresh subprocess and reports its peak RSS growth over the
state just before the loss; on CUDA the allocator's peak above the same baseline.

Real model shapes: ``--student-model`` / ``--teacher-model`` name kdtune builders (random weights, built on the device
by the recipes' ``build_model``), e.g. ``kdtune.models.llama3_2.llama3_2_1b`` and ``kdtune.models.llama3_1.llama3_1_8b``;
``--lora-rank r`` makes the student that builder's LoRA variant (``lora_`` prefix; q/v adapters, alpha 2r, as
torchtune's KD configs). ``--mfu`` counts the FLOPs of one step (``torch.utils.flop_counter``: every matmul and
attention kernel the step runs, forward and backward, teacher included; activation checkpointing's recompute counts
too) and divides the achieved rate by the device's measured matmul peak at the step's dtype (8192^3 on CUDA, 2048^3 on
CPU) and, with ``--peak-tflops``, by a datasheet peak.

Examples::

    python benchmarks/kd_throughput.py                          # defaults: ~15M student, ~60M teacher, V=32k, T=512
    python benchmarks/kd_throughput.py --steps 3 --warmup-steps 1 --loss-tokens 1024
    python benchmarks/kd_throughput.py --device cuda --dtype bf16 --batch-size 8 --json out.json
    # the issue's GPU figures (H100/H200: 989 dense bf16 TFLOP/s), one call: benchmarks/gpu_check.sh
    python benchmarks/kd_throughput.py --device cuda --dtype bf16 --batch-size 4 --seq-len 2048 --mfu \
        --student-model kdtune.models.llama3_2.llama3_2_1b --teacher-model kdtune.models.llama3_1.llama3_1_8b \
        --peak-tflops 989 --loss-vocab 128256 --loss-tokens 4096 --loss-hidden 2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdtune.losses import DistillationObjective, ForwardKLLoss
from kdtune.losses.functional import forward_kl, log_probs
from kdtune.models.llama import llama
from kdtune.training import (
    Runtime,
    StepAccumulator,
    build_model,
    get_device,
    get_dtype,
    peak_memory,
    reset_peak_memory,
    set_seed,
    setup_teacher,
    trainable_parameters,
)

GIB = float(2**30)


def build(vocab: int, dim: int, layers: int, heads: int, seq_len: int, tie: bool) -> torch.nn.Module:
    """A Llama-architecture decoder (GQA with heads/4 KV heads, SwiGLU at ~2.75 × D)."""
    return llama(
        vocab_size=vocab,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 4),
        embed_dim=dim,
        intermediate_dim=int(dim * 2.75) // 64 * 64 or 64,
        max_seq_len=seq_len,
        tie_word_embeddings=tie,
    )


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pair(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """The student and the frozen teacher: named builders through the recipes' ``build_model`` (random weights on
    ``device``; LoRA adapters initialised as a run does), else Llama-architecture models of the given dimensions."""
    rt = Runtime(device=device, dtype=dtype, output_dir=Path(os.devnull))
    if args.student_model or args.teacher_model:
        if not (args.student_model and args.teacher_model):
            raise SystemExit("--student-model and --teacher-model go together")
        if args.lora_rank:
            module, _, name = args.student_model.rpartition(".")
            student_cfg = {
                "_component_": f"{module}.lora_{name}",
                "lora_attn_modules": ["q_proj", "v_proj"],
                "lora_rank": args.lora_rank,
                "lora_alpha": 2 * args.lora_rank,
            }
        else:
            student_cfg = {"_component_": args.student_model}
        kw = {"compile": args.compile}
        ac = args.activation_checkpointing
        student, _ = build_model(
            OmegaConf.create(student_cfg), None, rt, activation_checkpointing=ac, lora_seed=0, **kw
        )
        teacher_cfg = OmegaConf.create({"_component_": args.teacher_model})
        teacher, _ = build_model(teacher_cfg, None, rt, key="teacher_model", **kw)
        args.vocab = student.tok_embeddings.weight.shape[0]
        return student, setup_teacher(teacher)
    if args.lora_rank or args.compile:
        raise SystemExit("--lora-rank and --compile need --student-model/--teacher-model")
    with torch.device(device):
        student = build(args.vocab, args.student_dim, args.student_layers, args.student_heads, args.seq_len, True)
        teacher = build(args.vocab, args.teacher_dim, args.teacher_layers, args.teacher_heads, args.seq_len, True)
    student.to(dtype)
    if args.activation_checkpointing:
        from kdtune.models import enable_activation_checkpointing  # noqa: PLC0415

        enable_activation_checkpointing(student)
    return student, setup_teacher(teacher.to(dtype))


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best ``torch.mm`` rate of square matrices (8192 on CUDA, 2048 on CPU) at ``dtype`` on ``device``, TFLOP/s."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: KD optimizer steps of a student/teacher pair; returns tokens/s, peak memory and (``--mfu``) MFU."""
    device = get_device(args.device)
    dtype = get_dtype(args.dtype, device)
    set_seed(0)
    student, teacher = build_pair(args, device, dtype)
    opt = torch.optim.AdamW(trainable_parameters(student), lr=1e-4)
    objective = DistillationObjective(
        ForwardKLLoss(),
        teacher=teacher,
        kd_ratio=args.kd_ratio,
        temperature=args.temperature,
        num_output_chunks=args.num_output_chunks or None,
        compile_loss=args.compile,
    )
    g = torch.Generator(device="cpu").manual_seed(0)

    def one_step() -> int:
        acc = StepAccumulator(student)
        for _ in range(args.grad_accum):
            tokens = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g).to(device)
            acc.backward(objective(student, {"tokens": tokens, "labels": tokens}))
        metrics = acc.finish()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return metrics.num_tokens

    for _ in range(args.warmup_steps):
        one_step()
    flops_per_step = None
    if args.mfu:  # one more untimed step under the FLOP counter
        counter = FlopCounterMode(display=False)
        with counter:
            one_step()
        flops_per_step = float(counter.get_total_flops())
    _sync(device)
    reset_peak_memory(device)
    tokens = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        tokens += one_step()
    _sync(device)
    elapsed = time.perf_counter() - start
    mfu: dict[str, Any] = {}
    if flops_per_step is not None:
        achieved = flops_per_step * args.steps / elapsed / 1e12
        peak = matmul_peak_tflops(device, dtype)
        mfu = {
            "flops_per_step": flops_per_step,
            "tflops_per_step": round(flops_per_step / 1e12, 3),
            "achieved_tflops": round(achieved, 3),
            "measured_matmul_peak_tflops": round(peak, 3),
            "mfu_vs_measured_peak": round(achieved / peak, 4),
        }
        if args.peak_tflops:
            mfu["mfu_vs_datasheet_peak"] = round(achieved / args.peak_tflops, 4)
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "student": args.student_model or "llama dims",
        "lora_rank": args.lora_rank,
        "compile": args.compile,
        "activation_checkpointing": args.activation_checkpointing,
        "dtype": str(dtype).removeprefix("torch."),
        "student_params_M": n_params(student) / 1e6,
        "teacher_params_M": n_params(teacher) / 1e6,
        "vocab": args.vocab,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "timed_steps": args.steps,
        "seconds_per_step": elapsed / max(args.steps, 1),
        "tokens_per_second": tokens / elapsed if elapsed > 0 else float("nan"),
        **{k: round(v, 3) for k, v in peak_memory(device).items()},
        "torch_threads": torch.get_num_threads(),
        **mfu,
    }


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def loss_probe(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Part 2 for one mode (``chunked`` / ``unchunked``) in this process: peak memory of the loss fwd + bwd."""
    device = get_device(args.device)
    dtype = get_dtype(args.dtype, device)
    torch.manual_seed(0)
    d, v = args.loss_hidden, args.loss_vocab

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # drawn in place: a temporary of randn * scale would set the process peak RSS before the baseline
            self.w = torch.nn.Parameter(torch.empty(v, d, device=device, dtype=dtype).normal_(0.0, d**-0.5))
            self.vocab_size = v

        def output_logits(self, h: torch.Tensor) -> torch.Tensor:
            return h @ self.w.t()  # [..., V]

    student, teacher = Head(), setup_teacher(Head())
    objective = DistillationObjective(
        ForwardKLLoss(),
        teacher=teacher,
        kd_ratio=0.5,
        num_output_chunks=args.num_output_chunks or None,
        compile_loss=args.compile,  # the chunked mode's chunk loss through torch.compile, as compile: true
    )

    def run(n: int) -> tuple[float, float, float]:
        s_hidden = torch.randn(1, n + 1, d, device=device, dtype=dtype, requires_grad=True)
        t_hidden = torch.randn(1, n + 1, d, device=device, dtype=dtype)
        labels = torch.randint(0, v, (1, n + 1), device=device)
        student.w.grad = None
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) / GIB
        else:
            base = _rss_gib()
        start = time.perf_counter()
        if mode == "unchunked":
            s_logits = student.output_logits(s_hidden[:, :-1]).float()  # [1, N, V]
            with torch.no_grad():
                t_logits = teacher.output_logits(t_hidden[:, :-1]).float()  # [1, N, V]
            tgt = labels[:, 1:]
            ce = torch.nn.functional.cross_entropy(s_logits.reshape(-1, v), tgt.reshape(-1), reduction="sum")
            kd = forward_kl(log_probs(s_logits), log_probs(t_logits)).sum()
            loss = objective.mix(ce, kd)
        else:
            loss = objective.from_hidden(student, s_hidden, labels, (t_hidden[:, :-1].reshape(-1, d),)).loss_sum
        loss.backward()
        _sync(device)
        elapsed = time.perf_counter() - start
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / GIB - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB - base
        return float(loss.item()) / n, peak, elapsed

    run(max(args.num_output_chunks, 8))  # load kernels / thread pools before measuring
    if args.compile and device.type == "cuda":  # compile at the measured size too (the peak is reset per run)
        run(args.loss_tokens)
    value, peak, elapsed = run(args.loss_tokens)
    return {
        "mode": mode,
        "loss_per_token": round(value, 6),
        "peak_gib_above_baseline": round(peak, 3),
        "seconds": round(elapsed, 3),
        "one_fp32_logits_tensor_gib": round(args.loss_tokens * v * 4 / GIB, 3),
    }


def bench_loss(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Part 2: run each mode in a fresh subprocess on CPU (peak RSS cannot be reset), in-process on CUDA."""
    results = []
    for mode in ("unchunked", "chunked"):
        if get_device(args.device).type == "cuda":
            results.append(loss_probe(args, mode))
            torch.cuda.empty_cache()
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--_loss-probe", mode, *sys.argv[1:]]
        # Fixed mmap threshold: glibc then returns every large freed block to the OS at once, so the peak RSS
        # follows the peak of live tensor memory instead of allocator caching.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            results.append({"mode": mode, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--student-dim", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--student-heads", type=int, default=4)
    p.add_argument("--teacher-dim", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=14)
    p.add_argument("--teacher-heads", type=int, default=8)
    p.add_argument("--student-model", default=None, help="a kdtune builder, e.g. kdtune.models.llama3_2.llama3_2_1b")
    p.add_argument("--teacher-model", default=None, help="a kdtune builder, e.g. kdtune.models.llama3_1.llama3_1_8b")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA student (q/v, alpha 2r) of --student-model")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile each decoder layer and the chunk loss (as compile: true)"
    )
    p.add_argument("--mfu", action="store_true", help="count the step's FLOPs and report MFU")
    p.add_argument("--peak-tflops", type=float, default=None, help="datasheet peak for MFU (H100/H200 bf16: 989)")
    p.add_argument(
        "--num-output-chunks", type=int, default=8, help="output chunks of part 1 (0: the recipes' memory budget)"
    )
    p.add_argument("--kd-ratio", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    p.add_argument("--loss-vocab", type=int, default=128256)
    p.add_argument("--loss-tokens", type=int, default=2048, help="positions in the loss-memory measurement")
    p.add_argument("--loss-hidden", type=int, default=256)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_loss-probe", dest="loss_probe", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loss_probe:
        print(json.dumps(loss_probe(args, args.loss_probe)))
        return 0
    results: dict[str, Any] = {}
    if not args.skip_train:
        results["train"] = bench_train(args)
        print("KD training:", json.dumps(results["train"], indent=2))
    if not args.skip_loss:
        results["loss_memory"] = bench_loss(args)
        print(f"KD loss memory (V={args.loss_vocab}, N={args.loss_tokens}, D={args.loss_hidden}):")
        for r in results["loss_memory"]:
            print("  ", json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
