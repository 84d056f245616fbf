"""Evaluate the quickstart's models, print the comparison table and plot loss curves and accuracies."""

from __future__ import annotations

import json
import statistics
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


def paired_gain(arm: list[float], baseline: list[float]) -> dict:
    """Per-seed differences ``arm - baseline`` (same seeds, same initial weights), their mean and sample std, and
    whether the gain is significant by this report's rule: ``mean > 2 * std`` over at least 2 seeds."""
    diffs = [a - b for a, b in zip(arm, baseline)]
    mean = statistics.fmean(diffs) if diffs else 0.0
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"per_seed": diffs, "mean": mean, "std": std, "significant": len(diffs) > 1 and mean > 2 * std}


def print_table(results: dict, seeds: list[int], arms: list[str], labels: dict[str, str] | None = None) -> dict:
    """Print teacher vs each student arm: exact match, held-out loss, the paired gain over SFT and its significance.

    Returns:
        The summary (also written to results.json): per arm the accuracies per seed, mean, std, the paired gain over
        ``sft`` and the fraction of the SFT -> teacher gap it closes.
    """
    from kdtune.quickstart.pipeline import summarize

    labels = labels or {}
    teacher_acc = results["teacher"]["accuracy"]
    sft = _group(results, "sft", seeds, "accuracy")
    sft_mean = summarize(sft)[0] if sft else 0.0
    gap = teacher_acc - sft_mean
    summary: dict = {"teacher": {"accuracy": teacher_acc, "loss": results["teacher"]["loss"]}, "seeds": seeds}
    print(f"\nHeld-out test results ({len(seeds)} student seeds: {' '.join(map(str, seeds))}; mean ± std; "
          "gain = paired per-seed difference to SFT, significant when mean > 2 std)")  # fmt: skip
    print(f"{'model':<30} {'exact match %':>14} {'held-out loss':>16} {'gain over SFT':>16} {'gap closed':>10}  sig.")
    print(f"{'teacher':<30} {teacher_acc * 100:>14.1f} {results['teacher']['loss']:>16.3f}")
    for arm in arms:
        accs, losses = _group(results, arm, seeds, "accuracy"), _group(results, arm, seeds, "loss")
        if not accs:
            continue
        (acc_mean, acc_std), (loss_mean, loss_std) = summarize(accs), summarize(losses)
        row = {"accuracy": accs, "mean": acc_mean, "std": acc_std, "loss": losses, "loss_mean": loss_mean}
        text = f"{labels.get(arm, arm):<30} {acc_mean * 100:>7.1f} ± {acc_std * 100:4.1f} {loss_mean:>9.3f} ± {loss_std:5.3f}"
        if arm != "sft" and sft:
            gain = paired_gain(accs, sft)
            closed = (acc_mean - sft_mean) / gap if gap > 0 else float("nan")
            row.update(gain_over_sft=gain, gap_closed=closed)
            verdict = "yes" if gain["significant"] else "no"
            text += f" {gain['mean'] * 100:>+8.1f} ± {gain['std'] * 100:4.1f} {closed * 100:>9.0f}%  {verdict}"
        summary[arm] = row
        print(text)
    print("\nper seed (exact match %):  " + "".join(f"{'seed ' + str(s):>9}" for s in seeds))
    for arm in arms:
        print(f"  {labels.get(arm, arm):<26}" + "".join(f"{results[f'{arm}_seed{s}']['accuracy'] * 100:>9.1f}"
                                                      for s in seeds if f"{arm}_seed{s}" in results))  # fmt: skip
    tasks = sorted(results["teacher"]["per_task"])
    print("\nexact match per task (mean over seeds): " + "".join(f"{t:>9}" for t in tasks))
    print(f"  {'teacher':<38}" + "".join(f"{results['teacher']['per_task'][t] * 100:>8.1f}%" for t in tasks))
    for arm in arms:
        per = [results[f"{arm}_seed{s}"]["per_task"] for s in seeds if f"{arm}_seed{s}" in results]
        print(
            f"  {labels.get(arm, arm):<38}"
            + "".join(f"{statistics.fmean(p[t] for p in per) * 100:>8.1f}%" for t in tasks)
        )
    verdicts = [a for a in arms if a != "sft" and summary.get(a, {}).get("gain_over_sft", {}).get("significant")]
    print("\nsignificant gains over SFT: " + (", ".join(labels.get(a, a) for a in verdicts) or "none"))
    # the first test example (not hand-picked), answered by every model (seed of the first run)
    prompt, answer, _ = results["teacher"]["samples"][0]
    print(f"\nfirst test example: {prompt!r} (expected {answer!r})")
    for name in ["teacher", *(f"{a}_seed{seeds[0]}" for a in arms)]:
        if name in results:
            print(f"  {name:<22} -> {results[name]['samples'][0][2]!r}")
    return summary


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


def plot_runs(runs: dict[str, Path], results: dict, summary: dict, path: Path) -> Path | None:
    """Write a PNG: every run's validation-loss curve (each named in the legend), and each arm's exact match per seed
    (dots) with its mean ± std (bar and error bar) against the teacher; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    arms = [a for a in summary if a not in ("teacher", "seeds")]
    palette = ["tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:red", "tab:brown", "tab:pink"]
    colors = {"teacher": "black", **{a: palette[i % len(palette)] for i, a in enumerate(arms)}}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(14, 5))
    for name, run_dir in runs.items():
        kind = name.rsplit("_seed", 1)[0]
        steps, losses, val_steps, val_losses = read_loss_curve(run_dir)
        if val_steps:
            ax_loss.plot(val_steps, val_losses, color=colors.get(kind, "grey"), alpha=0.7, label=name)
        elif steps:
            ax_loss.plot(steps, losses, color=colors.get(kind, "grey"), alpha=0.4, label=f"{name} (train)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("validation cross-entropy (per answer token)")
    ax_loss.set_yscale("log")
    ax_loss.set_title("loss curves (every run)")
    ax_loss.legend(fontsize=6, ncol=2)
    for i, arm in enumerate(arms):
        row = summary[arm]
        ax_acc.bar(i, row["mean"] * 100, yerr=row["std"] * 100, color=colors[arm], alpha=0.5, capsize=4,
                   label=f"{arm}: mean ± std")  # fmt: skip
        ax_acc.scatter([i] * len(row["accuracy"]), [a * 100 for a in row["accuracy"]], color=colors[arm],
                       edgecolor="black", zorder=3, label=f"{arm}: seeds {' '.join(map(str, summary['seeds']))}")  # fmt: skip
    ax_acc.axhline(summary["teacher"]["accuracy"] * 100, color="black", linestyle="--", label="teacher")
    ax_acc.set_xticks(range(len(arms)), arms, rotation=20, ha="right", fontsize=8)
    ax_acc.set_ylabel("exact match on held-out test (%)")
    ax_acc.set_title("accuracy per arm (dots: seeds)")
    ax_acc.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
