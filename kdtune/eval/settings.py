"""Typed settings of the ``eleuther_eval`` recipe: every top-level config key it reads, its default and its meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdtune.config import setting

__all__ = ["EvalSettings"]


@dataclass(kw_only=True)
class EvalSettings:
    """Every key ``eleuther_eval`` reads (see ``recipes/eleuther_eval.py``)."""

    output_dir: str = setting(help="Directory for results.json, samples_<task>.jsonl and the resolved config.yaml.")
    model: Any = setting(
        help="Model `_component_`, usually kdtune.models.hf_model with checkpoint_dir (a run's final/).", component=True
    )
    checkpointer: Any = setting(
        help="kdtune.models.HFCheckpointer `_component_` the weights are loaded from.", component=True
    )
    tokenizer: Any = setting(
        help="Tokenizer `_component_`, usually kdtune.data.load_hf_tokenizer with checkpoint_dir.", component=True
    )
    adapter_dir: str | None = setting(
        None,
        help="PEFT LoRA adapter dir (e.g. a run's final_adapter/) loaded on top of the checkpoint; with "
        "kdtune.models.hf_model the LoRA settings are read from its adapter_config.json.",
    )
    tasks: list[str] = setting(
        help="lm-eval task, group or tag names (or task YAML paths), e.g. [hellaswag, arc_easy]."
    )
    include_path: list[str] | None = setting(None, help="Directories of extra (local) lm-eval task YAMLs.")
    include_default_tasks: bool = setting(
        True, help="Also index lm-eval's built-in tasks (false: only include_path, which is faster to start)."
    )
    limit: int | float | None = setting(
        None, help="Examples per task: an integer count, or a fraction < 1; null = all (use for quick checks only)."
    )
    num_fewshot: int | None = setting(None, help="Few-shot examples per prompt; null = each task's own default.")
    batch_size: int = setting(8, help="Requests per forward pass.")
    max_seq_len: int | None = setting(
        None,
        help="Context length; longer inputs are truncated from the left (like lm-eval's hf model). null = the "
        "model's max positions from config.json, else the tokenizer's max_seq_len, else 2048.",
    )
    max_gen_toks: int = setting(256, help="Default cap on generated tokens for generate_until tasks that set none.")
    apply_chat_template: bool = setting(
        False, help="Format prompts with the tokenizer's chat template (few-shot examples as turns)."
    )
    system_instruction: str | None = setting(None, help="System prompt prepended to every request; null = none.")
    log_samples: bool = setting(False, help="Also write every request's prompt and output to samples_<task>.jsonl.")
    bootstrap_iters: int = setting(100000, help="Bootstrap iterations for metric stderrs (0 = skip them).")
    device: str = setting("auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    dtype: str = setting("bf16", help="fp32 or bf16 weights; log-probabilities are always computed in fp32.")
    seed: int = setting(1234, help="Seed of few-shot sampling, sampling-based generation and torch/numpy.")
