"""`kdtune quickstart`: what distillation is for, offline, on a CPU.

The setting: a strong teacher, a student with only a few labelled examples, and a large pool of unlabelled prompts.
Steps: fine-tune the teacher -> the teacher answers the prompt pool -> train the student with equal compute (same
initial weights, steps, batch and optimizer) in each *arm* -> score every model on held-out test prompts.

Arms (``ARMS``): ``sft`` (the labels only), ``kd`` (supervised KD on the labels), ``seq_kd`` (SFT on the labels + the
teacher's answers: sequence-level offline KD), ``logit_kd`` (the KD recipe on the same data), ``on_policy`` (GKD: the
KD recipe where half of the batches are the student's own samples, scored by the teacher).

Each training step is an ordinary ``kdtune run <recipe> --config quickstart/<name> key=value ...`` (printed before it
runs, so the user sees the real commands). Finished steps are cached: a step whose output holds a marker with the same
command is skipped, so a second run only re-evaluates and re-plots. Student runs go ``--jobs`` at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kdtune.errors import KDTuneError
from kdtune.perf import physical_cpu_cores
from kdtune.quickstart.tasks import (
    corpus_for_tokenizer,
    make_prompt_pool,
    make_splits,
    read_jsonl,
    write_jsonl,
    write_prompts_jsonl,
)

_MARKER = "kdtune_quickstart_step.json"

# ChatML as Qwen2.5 renders it, minus the default system prompt (it would triple every quickstart sequence).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Arm:
    """One way of training the student: its recipe, shipped config, training data and whether it needs the teacher."""

    name: str
    label: str
    recipe: str
    config: str
    data: str  # "train" (the labelled examples) or "train_plus_teacher" (+ the teacher's answers to the pool)
    teacher: bool


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("sft", "SFT on the labels", "full_finetune_single_device", "quickstart/student_sft", "train", False),
        Arm("kd", "supervised KD (labels)", "knowledge_distillation_single_device", "quickstart/student_kd", "train",
            True),
        Arm("seq_kd", "sequence-level KD", "full_finetune_single_device", "quickstart/student_seq_kd",
            "train_plus_teacher", False),
        Arm("logit_kd", "logit KD (teacher answers)", "knowledge_distillation_single_device",
            "quickstart/student_logit_kd", "train_plus_teacher", True),
        Arm("on_policy", "on-policy KD (GKD)", "knowledge_distillation_single_device", "quickstart/student_on_policy",
            "train_plus_teacher", True),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Preset:
    """Sizes and budgets of one quickstart setting (see docs/quickstart.md for how the default was chosen)."""

    teacher_train: int  # labelled examples the teacher is fine-tuned on
    student_train: int  # labelled examples the students see (the limited-label regime)
    val: int
    test: int
    pool: int  # unlabelled prompts the teacher answers (no labels are ever read from them)
    teacher_dims: dict = field(default_factory=dict)
    student_dims: dict = field(default_factory=dict)
    teacher_steps: int = 600
    student_steps: int = 300
    batch_size: int = 32
    eval_examples: int = 400
    arms: tuple[str, ...] = tuple(ARMS)  # the default run's arms; --full runs every arm


_DEFAULT = Preset(
    teacher_train=12000,
    student_train=400,
    val=200,
    test=400,
    pool=4000,
    teacher_dims=dict(dim=96, layers=3, heads=4, kv_heads=2, intermediate_size=256),
    student_dims=dict(dim=64, layers=2, heads=4, kv_heads=2, intermediate_size=176),
    # Chosen on the validation split (docs/quickstart.md): at 2,400 steps the teacher depended on luck (seed 0: 0.09
    # validation loss, seed 1: 0.25 with `last` at 64 %), at 3,600 steps seed 1 reached 0.011 (99 % exact match); at
    # 1,200 student steps the distillation arms had not yet learnt `first`/`last` on every seed, at 2,400 most had.
    # Students of width 48 stalled on some seeds (sequence-level KD, 5 seeds: validation loss 0.03 / 0.65 / 0.20 /
    # 0.01 / 0.36), width 64 learnt on all five (0.02 / 0.01 / 0.18 / 0.01 / 0.27) — the same teacher and data.
    teacher_steps=3600,
    student_steps=2400,
    batch_size=32,
    eval_examples=400,
    arms=("sft", "seq_kd", "logit_kd"),  # supervised KD and on-policy KD with --full (or --arms)
)

PRESETS: dict[str, Preset] = {
    # The default: about 10 minutes on 2 quiet CPU cores, 3 seeds.
    "default": _DEFAULT,
    # The CI version: every step end to end, minutes become seconds; the numbers mean nothing.
    "ci": Preset(
        teacher_train=256,
        student_train=64,
        val=32,
        test=32,
        pool=64,
        teacher_dims=dict(dim=32, layers=2, heads=2, kv_heads=1, intermediate_size=64),
        student_dims=dict(dim=16, layers=1, heads=2, kv_heads=1, intermediate_size=32),
        teacher_steps=6,
        student_steps=4,
        batch_size=8,
        eval_examples=16,
    ),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (give 1 or more)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdtune quickstart",
        description="Fine-tune a small teacher, let it answer a pool of unlabelled prompts, train a student with SFT "
        "and with several kinds of distillation at equal compute, and compare them on held-out data — offline, on a "
        "CPU, in about ten minutes.",
    )
    parser.add_argument("--output-dir", default="kdtune-quickstart", help="where everything is written (cached)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default: 0 1 2)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="student arms (default: all)")
    parser.add_argument(
        "--full",
        action="store_true",
        help="every arm (adds supervised KD and on-policy KD) and 5 seeds: about three times as long",
    )
    parser.add_argument(
        "--jobs", type=_positive_int, default=2, help="student runs trained at the same time (default 2)"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="sizes/budgets: default (about 10 minutes on 2 CPU cores), ci (tiny: every step end to end in seconds)",
    )
    parser.add_argument("--force", action="store_true", help="retrain every step even when a cached result exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kdtune quickstart``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    seeds = args.seeds if args.seeds is not None else ([0, 1, 2, 3, 4] if args.full else [0, 1, 2])
    arms = [ARMS[a] for a in (args.arms or (tuple(ARMS) if args.full else preset.arms))]
    if "sft" not in [a.name for a in arms]:
        arms.insert(0, ARMS["sft"])  # every gain is measured against SFT
    out = Path(args.output_dir).resolve()
    started = time.monotonic()
    print(f"kdtune quickstart: writing to {out}", flush=True)

    data = prepare_data(out, preset)
    tokenizer_dir = prepare_tokenizer(out)
    teacher_init = prepare_model(out / "init" / "teacher", preset.teacher_dims, tokenizer_dir, seed=1000)

    parallel = args.jobs
    print(f"{parallel} run(s) at a time, {share_cores(parallel)} CPU thread(s) each", flush=True)
    quiet = parallel > 1  # runs side by side write their output to <run>/run.log
    jobs: list[tuple[str, Arm, list[str]]] = []
    for seed in seeds:
        student_init = prepare_model(out / "init" / f"student_seed{seed}", preset.student_dims, tokenizer_dir, seed)
        for arm in arms:
            overrides = [
                f"checkpointer.checkpoint_dir={student_init}",
                f"dataset.data_files={out / 'data' / (arm.data + '.jsonl')}",
                f"val_dataset.data_files={data['val']}",
                f"max_steps={preset.student_steps}",
                f"batch_size={preset.batch_size}",
                f"seed={seed}",
            ]
            jobs.append((f"{arm.name}_seed{seed}", arm, overrides))

    def student(job: tuple[str, Arm, list[str]]) -> Path:
        name, arm, overrides = job
        if arm.teacher:
            overrides = [*overrides, f"teacher_checkpointer.checkpoint_dir={out / 'runs' / 'teacher' / 'final'}"]
        return run_step(out / "runs" / name, arm.recipe, arm.config, overrides, force=args.force, quiet=quiet)

    runs: dict[str, Path] = {}
    with ThreadPoolExecutor(parallel) as pool:
        # the teacher trains while the runs that need nothing from it (SFT on the labels) already start
        teacher = pool.submit(
            run_step,
            out / "runs" / "teacher",
            "full_finetune_single_device",
            "quickstart/teacher",
            [
                f"checkpointer.checkpoint_dir={teacher_init}",
                f"dataset.data_files={data['teacher_train']}",
                f"val_dataset.data_files={data['val']}",
                f"max_steps={preset.teacher_steps}",
                f"batch_size={preset.batch_size}",
                "seed=0",
            ],
            force=args.force,
            quiet=quiet,
        )
        independent = {j[0]: pool.submit(student, j) for j in jobs if not j[1].teacher and j[1].data == "train"}
        runs["teacher"] = teacher.result()
        if any(a.data == "train_plus_teacher" for a in arms):
            answers = run_step(
                out / "runs" / "teacher_answers",
                "generate_distillation_data",
                "quickstart/teacher_answers",
                [f"checkpointer.checkpoint_dir={runs['teacher'] / 'final'}", f"prompts.data_files={data['pool']}"],
                force=args.force,
                quiet=quiet,
                done_file="teacher_answers.jsonl",
            )
            combine_chats([data["train"], answers / "teacher_answers.jsonl"], out / "data" / "train_plus_teacher.jsonl")
        dependent = {j[0]: pool.submit(student, j) for j in jobs if j[0] not in independent}
        for name, _, _ in jobs:
            runs[name] = (independent.get(name) or dependent[name]).result()

    from kdtune.quickstart.report import evaluate_runs, plot_runs, print_table

    test_examples = read_jsonl(data["test"])[: preset.eval_examples]
    results = evaluate_runs(runs, test_examples)
    summary = print_table(results, seeds, [a.name for a in arms], {a.name: a.label for a in arms})
    (out / "results.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=2))
    plot_path = plot_runs(runs, results, summary, out / "quickstart.png")
    elapsed = time.monotonic() - started
    print(f"\nDone in {elapsed / 60:.1f} min. Written under {out}:")
    print(f"  data         {out / 'data'}")
    print(f"  runs         {out / 'runs'}   (each: config.yaml, logs/, final/ HF model)")
    print(f"  results      {out / 'results.json'}")
    print(f"  plot         {plot_path or '(matplotlib not installed: pip install kdtune[quickstart])'}")
    return 0


def share_cores(jobs: int, environ: dict[str, str] | None = None) -> str:
    """Give each of ``jobs`` runs side by side its share of the physical cores via ``OMP_NUM_THREADS``.

    The runs are subprocesses and inherit the variable; one the user set is kept. More threads than cores run
    several times slower (each run would otherwise take every core).

    Returns:
        The ``OMP_NUM_THREADS`` value in force.
    """
    environ = os.environ if environ is None else environ
    if not environ.get("OMP_NUM_THREADS"):
        environ["OMP_NUM_THREADS"] = str(max(1, physical_cpu_cores() // jobs))
    return environ["OMP_NUM_THREADS"]


def prepare_data(out: Path, preset: Preset) -> dict[str, Path]:
    """Write the task splits as chat JSON lines and the unlabelled pool as prompts only (cached by content)."""
    sizes = {
        "teacher_train": preset.teacher_train,
        "train": preset.student_train,
        "val": preset.val,
        "test": preset.test,
    }
    spec = {**sizes, "pool": preset.pool}
    paths = {name: out / "data" / f"{name}.jsonl" for name in spec}
    if not all(p.exists() for p in paths.values()) or _read_marker(out / "data") != spec:
        splits = make_splits(sizes, seed=20261123)
        for name, examples in splits.items():
            write_jsonl(examples, paths[name])
        labelled = (ex.prompt for examples in splits.values() for ex in examples)
        write_prompts_jsonl(make_prompt_pool(preset.pool, seed=20261124, exclude=labelled), paths["pool"])
        _write_marker(out / "data", spec)
    return paths


def combine_chats(sources: list[Path], path: Path) -> Path:
    """Concatenate chat JSON-lines files, keeping only ``messages`` (the teacher's file also has prompt/completion)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for source in sources:
            for line in Path(source).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    f.write(json.dumps({"messages": json.loads(line)["messages"]}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def prepare_tokenizer(out: Path) -> Path:
    """A small byte-level BPE tokenizer with a chat template, trained on the task alphabet."""
    from kdtune.testing.tokenizers import write_bpe_tokenizer

    tok_dir = out / "init" / "tokenizer"
    # Character level (the 256 byte tokens, no merges): the tasks are about characters, and a merged " x" token
    # would make "the first letter" a different token from the same letter elsewhere.
    if _read_marker(tok_dir) != {"kind": "bpe-qwen2", "vocab_size": 256}:
        write_bpe_tokenizer(
            tok_dir,
            corpus_for_tokenizer(),
            vocab_size=256,
            style="qwen2",
            chat_template=CHATML_TEMPLATE,
            model_max_length=64,
        )
        _write_marker(tok_dir, {"kind": "bpe-qwen2", "vocab_size": 256})
    return tok_dir


def prepare_model(path: Path, dims: dict, tokenizer_dir: Path, seed: int) -> Path:
    """A randomly initialised HF-format model directory (Qwen2 architecture) with the tokenizer files beside it."""
    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.models import make_tiny_hf_checkpoint

    spec = {"dims": dims, "seed": seed}
    if _read_marker(path) == spec:
        return path
    vocab_size = load_hf_tokenizer(tokenizer_dir).vocab_size
    make_tiny_hf_checkpoint(path, family="qwen2", vocab_size=vocab_size, seed=seed, tie=True, **dims)
    for item in tokenizer_dir.iterdir():
        if item.is_file() and item.name != _MARKER:
            shutil.copy2(item, path / item.name)
    _write_marker(path, spec)
    return path


def run_step(
    out_dir: Path,
    recipe: str,
    config: str,
    overrides: list[str],
    *,
    force: bool,
    quiet: bool = False,
    done_file: str = "final",
) -> Path:
    """Run one ``kdtune run`` step, or skip it when a finished run with the same command is cached.

    Args:
        out_dir: the step's ``output_dir``.
        recipe: the recipe name.
        config: the shipped config (``quickstart/<name>``).
        overrides: ``key=value`` overrides (``output_dir`` is added).
        force: run even when cached.
        quiet: send the run's output to ``out_dir/run.log`` (runs in parallel); its tail is printed on failure.
        done_file: what the finished step leaves in ``out_dir`` (the cache requires it).
    """
    overrides = [*overrides, f"output_dir={out_dir}"]
    # -P (3.11+): never import a `kdtune/` folder that happens to sit in the current directory instead of the package
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    command = [sys.executable, *safe_path, "-m", "kdtune", "run", recipe, "--config", config, *overrides]
    spec = {"command": hashlib.sha256(json.dumps([recipe, config, *overrides]).encode()).hexdigest()}
    if not force and (out_dir / done_file).exists() and _read_marker(out_dir) == spec:
        print(f"\n[cached] {out_dir.name}: kdtune run {recipe} --config {config} ...", flush=True)
        return out_dir
    print(f"\n$ kdtune run {recipe} --config {config} {' '.join(shlex.quote(o) for o in overrides)}", flush=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if quiet:
        out_dir.mkdir(parents=True)
        log = out_dir / "run.log"
        with open(log, "w") as f:
            result = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            print(log.read_text()[-4000:], flush=True)
    else:
        result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise KDTuneError(f"step '{out_dir.name}' failed (exit {result.returncode}); its output is above")
    print(f"[{out_dir.name}] finished in {time.monotonic() - started:.0f} s", flush=True)
    _write_marker(out_dir, spec)
    return out_dir


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(directory: Path, spec: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{_MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(spec))
    os.replace(tmp, directory / _MARKER)


def summarize(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


__all__ = ["ARMS", "PRESETS", "Arm", "Preset", "main", "share_cores", "summarize"]
