"""The KD loss alone at a large vocabulary: peak extra RSS and time of three implementations (run by hand, CPU).

Work measured, identical for every implementation: from the student's final hidden states ``[N, D]`` (requires grad)
and the teacher's ``[N, D]``, both models' output layers ``[V, D]`` (the student's trainable unless
``--frozen-weight``), cross-entropy + forward KL at T = 1, mixed 0.5 / 0.5, forward + backward (gradients of the
student's hidden states and output weight).

* ``fused``: ``kdtune.losses.DistillationObjective(ForwardKLLoss(), teacher=...).from_hidden(...)`` with its defaults
  (the fused output layer + loss: each chunk's gradients computed in the forward pass, with the hand-written
  CE + forward-KL chunk loss; chunks sized by the memory budget).
* ``unfused``: the same objective with ``fused=False`` (chunked logits, recomputed in backward; ``--num-output-chunks``
  chunks).
* ``torchtune``: torchtune 0.6.1 as its KD recipe does it: chunked output logits of both models (the model's
  ``num_output_chunks`` chunks along the sequence), ``CEWithChunkedOutputLoss`` + ``ForwardKLWithChunkedOutputLoss``.
  Runs under ``--torchtune-python`` (a venv with torchtune 0.6.1, torchao 0.10-0.14 and the same torch).

Every measurement runs in a fresh process (``MALLOC_MMAP_THRESHOLD_=65536``, so freed large blocks go back to the OS
and peak RSS follows live tensor memory), after a small warm-up; peak RSS is ``ru_maxrss`` minus the RSS just before
the loss (the inputs, both ``[V, D]`` weights included, exist before it and are not counted; the weight gradient
is). Implementations alternate (A B C A B C ...) so a change in machine load hits all of them alike.

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_kd_loss.py --positions 2048 4096 --repeats 2 \\
        --torchtune-python /work/wt/tt-venv/bin/python --json kd_loss.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

GIB = float(2**30)
MODES = ("fused", "unfused", "torchtune")


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def _inputs(n: int, d: int, v: int, frozen_weight: bool):
    import torch  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    w_s = (torch.randn(v, d, generator=g) * d**-0.5).requires_grad_(not frozen_weight)  # [V, D]
    w_t = torch.randn(v, d, generator=g) * d**-0.5  # [V, D]
    h_s = torch.randn(1, n + 1, d, generator=g).requires_grad_()  # [1, N + 1, D]
    h_t = torch.randn(1, n + 1, d, generator=g)
    labels = torch.randint(0, v, (1, n + 1), generator=g)
    return h_s, h_t, w_s, w_t, labels


def _step(mode: str, inputs: tuple, n: int, args: argparse.Namespace) -> float:
    """One forward + backward of ``mode`` on the ``n`` positions of ``inputs``; returns the mixed loss per token."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    h_s, h_t, w_s, w_t, labels = inputs
    if mode in ("fused", "unfused"):
        from kdtune.losses import DistillationObjective, ForwardKLLoss  # noqa: PLC0415

        class Head(torch.nn.Module):
            """An output layer alone: the student's (``output`` Linear, trainable or not) or the teacher's."""

            def __init__(self, w: torch.Tensor) -> None:
                super().__init__()
                self.vocab_size = w.shape[0]
                self.output = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")  # no allocation
                self.output.weight = torch.nn.Parameter(w, requires_grad=w.requires_grad)

            def output_logits(self, h: torch.Tensor) -> torch.Tensor:
                return self.output(h)

        budget = args.memory_budget_mib * 2**20 if args.memory_budget_mib else None
        chunks = args.num_output_chunks if mode == "unfused" else None
        objective = DistillationObjective(
            ForwardKLLoss(), teacher=Head(w_t), kd_ratio=0.5, num_output_chunks=chunks, fused=mode == "fused",
            memory_budget_bytes=budget,
        )  # fmt: skip
        out = objective.from_hidden(Head(w_s), h_s, labels, (h_t[0, :-1],))  # teacher state [N, D]
        loss = out.loss_sum / out.num_tokens
    elif mode == "torchtune":
        from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss  # noqa: PLC0415

        k = args.num_output_chunks
        s_chunks = [F.linear(c, w_s) for c in h_s[:, :-1].chunk(k, dim=1)]  # k x [1, N/k, V]
        with torch.no_grad():
            t_chunks = [F.linear(c, w_t) for c in h_t[:, :-1].chunk(k, dim=1)]
        tgt = labels[:, 1:]
        ce = CEWithChunkedOutputLoss(num_output_chunks=k)(s_chunks, tgt)
        kd = ForwardKLWithChunkedOutputLoss(num_output_chunks=k)(s_chunks, t_chunks, tgt)
        loss = 0.5 * ce + 0.5 * kd
    else:
        raise ValueError(mode)
    loss.backward()
    return float(loss.item())


def probe(mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """In this process: warm up on 64 positions, then measure one forward + backward on ``n``."""
    import torch  # noqa: PLC0415

    _step(mode, _inputs(64, args.hidden, args.vocab, args.frozen_weight), 64, args)
    inputs = _inputs(n, args.hidden, args.vocab, args.frozen_weight)  # both weights and hidden states: not counted
    base = _rss_gib()
    start, cpu_start = time.perf_counter(), time.process_time()
    value = _step(mode, inputs, n, args)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB - base
    return {
        "mode": mode,
        "positions": n,
        "loss_per_token": round(value, 6),
        "peak_gib": round(peak, 3),
        "seconds": round(elapsed, 2),
        "cpu_seconds": round(cpu, 2),
        "threads": torch.get_num_threads(),
    }


def _run(mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    python = args.torchtune_python if mode == "torchtune" else sys.executable
    cmd = [python, os.path.abspath(__file__), "--_probe", mode, str(n), *sys.argv[1:]]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH")])
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return {"mode": mode, "positions": n, "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", type=int, nargs="+", default=[4096, 2048])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--num-output-chunks", type=int, default=8, help="chunks of the unfused objective and torchtune")
    p.add_argument("--memory-budget-mib", type=int, default=None, help="fused path's budget (default: its own)")
    p.add_argument("--frozen-weight", action="store_true", help="student output weight frozen (LoRA student)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--repeats", type=int, default=2, help="rounds of A B C")
    p.add_argument("--torchtune-python", default="/work/wt/tt-venv/bin/python")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_probe", dest="probe", nargs=2, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe[0], int(args.probe[1]), args)))
        return 0
    modes = [m for m in args.modes if m != "torchtune" or os.path.exists(args.torchtune_python)]
    if len(modes) < len(args.modes):
        print(f"torchtune skipped: {args.torchtune_python} not found")
    rows: list[dict[str, Any]] = []
    for n in args.positions:
        for r in range(args.repeats):
            for mode in modes:
                res = _run(mode, n, args)
                res["round"] = r
                rows.append(res)
                print(json.dumps(res), flush=True)
    print(
        f"\nV={args.vocab} D={args.hidden} (medians over {args.repeats} rounds; ratios vs torchtune; cpu = process CPU time, less sensitive to machine load)"
    )
    summary: dict[str, Any] = {}
    for n in args.positions:
        med = {}
        for mode in modes:
            ok = [x for x in rows if x["mode"] == mode and x["positions"] == n and "error" not in x]
            if ok:
                med[mode] = {
                    key: statistics.median(x[key] for x in ok) for key in ("seconds", "cpu_seconds", "peak_gib")
                }
        summary[n] = med
        for mode, m in med.items():
            ratio = ""
            if "torchtune" in med and mode != "torchtune":
                tt = med["torchtune"]
                ratio = (
                    f"  wall x{m['seconds'] / tt['seconds']:.2f}  cpu x{m['cpu_seconds'] / tt['cpu_seconds']:.2f}"
                    f"  memory x{m['peak_gib'] / tt['peak_gib']:.3f}"
                )
            print(
                f"N={n:5d} {mode:13s} wall {m['seconds']:7.2f} s  cpu {m['cpu_seconds']:7.2f} s  "
                f"{m['peak_gib']:6.3f} GiB{ratio}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": rows, "medians": summary, "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
