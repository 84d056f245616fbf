"""Evaluation with EleutherAI's lm-evaluation-harness (the optional ``eval`` extra: ``pip install 'kdtune[eval]'``).

- :class:`EvalSettings`: the keys of the ``eleuther_eval`` recipe.
- :func:`build_eval_model`, :func:`lora_kwargs_from_adapter`: a checkpoint dir (+ PEFT adapter) as a kdtune model.
- ``KDTuneLM`` (in :mod:`kdtune.eval.lm`, imported on first use because it needs ``lm_eval``): a kdtune model and
  tokenizer as an lm-eval ``LM``, registered with lm-eval as ``kdtune``.
- :func:`make_task_manager`, :func:`check_tasks`, :func:`evaluate`, :func:`format_tables`, :func:`write_results`.
"""

from typing import Any

from kdtune.eval._model import build_eval_model, lora_kwargs_from_adapter
from kdtune.eval.harness import (
    INSTALL_HINT,
    MissingDependencyError,
    check_tasks,
    evaluate,
    format_tables,
    make_task_manager,
    require_lm_eval,
    write_results,
)
from kdtune.eval.settings import EvalSettings

__all__ = [
    "INSTALL_HINT",
    "EvalSettings",
    "KDTuneLM",
    "MissingDependencyError",
    "build_eval_model",
    "check_tasks",
    "evaluate",
    "format_tables",
    "lora_kwargs_from_adapter",
    "make_task_manager",
    "require_lm_eval",
    "write_results",
]


def __getattr__(name: str) -> Any:
    if name == "KDTuneLM":
        require_lm_eval()
        from kdtune.eval.lm import KDTuneLM

        return KDTuneLM
    raise AttributeError(f"module 'kdtune.eval' has no attribute {name!r}")
