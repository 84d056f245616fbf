"""Run lm-evaluation-harness tasks on a kdtune model: task lookup with clear errors, evaluation, tables, results files.

Everything here imports ``lm_eval`` lazily; :func:`require_lm_eval` turns its absence into one line with the install
command.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from kdtune.errors import ConfigError, KDTuneError

__all__ = [
    "INSTALL_HINT",
    "MissingDependencyError",
    "check_tasks",
    "evaluate",
    "format_tables",
    "make_task_manager",
    "require_lm_eval",
    "write_results",
]

INSTALL_HINT = "pip install 'kdtune[eval]'"


class MissingDependencyError(KDTuneError):
    """An optional dependency (an extra of kdtune) is not installed."""


def require_lm_eval() -> Any:
    """Import ``lm_eval`` or raise :class:`MissingDependencyError` naming the install command."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"evaluation needs EleutherAI's lm-evaluation-harness (import failed: {e}); install it with {INSTALL_HINT}"
        ) from None
    return lm_eval


def make_task_manager(include_path: list[str] | None = None, include_defaults: bool = True) -> Any:
    """An lm-eval ``TaskManager`` over the built-in tasks (unless ``include_defaults`` is False) and ``include_path``.

    Raises:
        ConfigError: an ``include_path`` entry that is not a directory.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).expanduser()) for p in include_path or []]
    for p in paths:
        if not Path(p).is_dir():
            raise ConfigError(f"include_path: {p!r} is not a directory; point it at a folder of lm-eval task YAMLs")
    if not paths and not include_defaults:
        raise ConfigError("include_default_tasks=false needs include_path (a folder of task YAMLs); set one of them")
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def check_tasks(task_manager: Any, tasks: list[str]) -> list[str]:
    """Expand glob patterns and check every name is a task, group or tag lm-eval knows (or a task YAML file).

    Returns:
        The task names to evaluate.

    Raises:
        ConfigError: an unknown name (with the closest known names), or an empty list.
    """
    if not tasks:
        raise ConfigError("tasks: no task given; set tasks=[hellaswag,arc_easy] (any lm-eval task, group or tag)")
    known = task_manager.all_tasks
    names: list[str] = []
    for name in tasks:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            names.append(name)
            continue
        matched = task_manager.match_tasks([name]) if any(c in name for c in "*?[") else []
        if matched:
            names.extend(m for m in matched if m not in names)
            continue
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise ConfigError(
            f"tasks: lm-eval does not know task {name!r}{hint}; list the known ones with `lm-eval ls tasks`, or add "
            "the folder of your own task YAML with include_path=[DIR]"
        )
    return names


def evaluate(
    lm: Any,
    tasks: list[str],
    task_manager: Any,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100000,
    seed: int = 1234,
) -> dict[str, Any]:
    """Evaluate ``lm`` on ``tasks`` with ``lm_eval.simple_evaluate``.

    Returns:
        lm-eval's results dict (``results``, ``groups``, ``configs``, ``n-shot``, ``samples`` when logged, ...).
    """
    require_lm_eval()
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        num_fewshot=num_fewshot,
        limit=limit,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=apply_chat_template,
        system_instruction=system_instruction,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # only on non-zero ranks, which a single-device recipe never has
        raise KDTuneError("lm-eval returned no results")
    return dict(out)


def format_tables(results: dict[str, Any]) -> str:
    """lm-eval's Markdown tables: tasks, then groups when there are any."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def write_results(results: dict[str, Any], output_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``results.json`` (everything but the per-sample logs) and ``samples_<task>.jsonl`` into ``output_dir``.

    Args:
        results: what :func:`evaluate` returned.
        output_dir: directory (created).
        extra: more top-level entries for ``results.json`` (e.g. the model and adapter paths).

    Returns:
        The path of ``results.json``.
    """
    from lm_eval.utils import handle_non_serializable

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in results.items() if k != "samples"}
    summary.update(extra or {})
    path = out / "results.json"
    tmp = out / f"results.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    for task, samples in (results.get("samples") or {}).items():
        with open(out / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path
