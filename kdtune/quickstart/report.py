"""Evaluate the quickstart's models, print the comparison table and plot loss curves and accuracies."""

from __future__ import annotations

import json
from pathlib import Path

from kdtune.quickstart.evaluate import evaluate_checkpoint


def evaluate_runs(runs: dict[str, Path], test_examples: list) -> dict:
    """Score every run's final model on the held-out test examples.

    Returns:
        ``{run_name: {"accuracy", "loss", "per_task", "samples"}}``.
    """
    results = {}
    for name, run_dir in runs.items():
        print(f"evaluating {name} on {len(test_examples)} held-out examples ...", flush=True)
        results[name] = evaluate_checkpoint(str(run_dir / "final"), test_examples)
    return results


def _group(results: dict, prefix: str, seeds: list[int], key: str) -> list[float]:
    return [results[f"{prefix}_seed{s}"][key] for s in seeds if f"{prefix}_seed{s}" in results]


def print_table(results: dict, seeds: list[int]) -> None:
    """Print teacher vs SFT student vs KD student: exact match and held-out loss, mean ± std over seeds."""
    from kdtune.quickstart.pipeline import summarize

    rows = [("teacher (full fine-tune)", [results["teacher"]["accuracy"]], [results["teacher"]["loss"]])]
    for prefix, label in (("sft", "student, SFT only"), ("kd", "student, KD")):
        rows.append((label, _group(results, prefix, seeds, "accuracy"), _group(results, prefix, seeds, "loss")))
    print(f"\nHeld-out results ({len(seeds)} student seeds: {' '.join(map(str, seeds))}; mean ± std)")
    print(f"{'model':<26} {'exact match':>16} {'held-out loss':>16}")
    for label, accs, losses in rows:
        (acc_mean, acc_std), (loss_mean, loss_std) = summarize(accs), summarize(losses)
        print(f"{label:<26} {acc_mean * 100:>9.1f} ± {acc_std * 100:4.1f} {loss_mean:>9.3f} ± {loss_std:5.3f}")
    tasks = sorted(results["teacher"]["per_task"])
    print(f"\nexact match per task: {'':<6}" + "".join(f"{t:>10}" for t in tasks))
    for name, result in results.items():
        print(f"  {name:<26}" + "".join(f"{result['per_task'][t] * 100:>9.1f}%" for t in tasks))
    sample_prompt, sample_answer, sample_pred = results[next(k for k in results if k.startswith("kd"))]["samples"][0]
    print(f"\nexample (KD student): {sample_prompt!r} -> {sample_pred!r} (expected {sample_answer!r})")


def read_loss_curve(run_dir: Path) -> tuple[list[int], list[float], list[int], list[float]]:
    """(train steps, train losses, val steps, val losses) from a run's JSON-lines metric logs."""
    steps, losses, val_steps, val_losses = [], [], [], []
    for log_file in sorted((run_dir / "logs").glob("*.jsonl")):
        for line in log_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step")
            if step is None:
                continue
            if "loss" in record:
                steps.append(int(step))
                losses.append(float(record["loss"]))
            # the cross-entropy part only: a KD run's val_loss mixes in the KD term and is not comparable
            val_key = "val_class_loss" if "val_class_loss" in record else "val_loss"
            if val_key in record:
                val_steps.append(int(step))
                val_losses.append(float(record[val_key]))
    return steps, losses, val_steps, val_losses


def plot_runs(runs: dict[str, Path], results: dict, path: Path) -> Path | None:
    """Write a PNG with the validation-loss curves and the accuracies; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"teacher": "black", "sft": "tab:orange", "kd": "tab:blue"}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run_dir in runs.items():
        kind = name.split("_")[0]
        steps, losses, val_steps, val_losses = read_loss_curve(run_dir)
        label = name if name == "teacher" or name.endswith("seed0") or "seed" not in name else None
        if val_steps:
            ax_loss.plot(val_steps, val_losses, color=colors[kind], alpha=0.8, label=label and f"{label} (val)")
        elif steps:
            ax_loss.plot(steps, losses, color=colors[kind], alpha=0.5, label=label and f"{label} (train)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("validation cross-entropy (per answer token)")
    ax_loss.set_title("loss curves")
    ax_loss.legend(fontsize=8)
    names = list(results)
    ax_acc.bar(
        range(len(names)),
        [results[n]["accuracy"] * 100 for n in names],
        color=[colors[n.split("_")[0]] for n in names],
    )
    ax_acc.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax_acc.set_ylabel("exact match on held-out test (%)")
    ax_acc.set_title("accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
