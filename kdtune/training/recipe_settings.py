"""Typed settings of the training recipes: every top-level config key a recipe reads, its default and its meaning.

A recipe reads its config with ``kdtune.config.read_settings(<Settings>, cfg)``; an unknown or misspelt key is an error
naming the closest field, so a typo never silently falls back to a default. ``_component_`` nodes (``model``,
``optimizer``, ...) stay ``DictConfig`` and are built by :mod:`kdtune.training.builders`. The recipe docs
(``docs/recipes/*.md``) are generated from the ``help`` metadata below by :func:`settings_markdown_table`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a one-line ``help`` (read by ``kdtune validate`` and the docs generator)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(kw_only=True)
class FinetuneSettings:
    """Settings shared by every training recipe (full fine-tuning reads exactly these)."""

    # --- where things come from and go to
    output_dir: str = _f(help="Directory for checkpoints/, final/, logs/ and the resolved config.yaml.")
    model: Any = _f(help="Model `_component_` (e.g. kdtune.models.llama3_2.llama3_2_1b or kdtune.models.hf_model).")
    tokenizer: Any = _f(help="Tokenizer `_component_`, usually kdtune.data.load_hf_tokenizer with checkpoint_dir.")
    checkpointer: Any = _f(help="kdtune.models.HFCheckpointer `_component_` the model's weights are loaded from.")
    dataset: Any = _f(help="Training dataset `_component_` (or a list of them, concatenated).")
    val_dataset: Any = _f(None, help="Validation dataset `_component_`; null = none (see val_split_ratio).")
    val_split_ratio: float = _f(
        0.0, help="Fraction of the training dataset held out (seeded) for validation when val_dataset is null."
    )
    # --- data order
    seed: int = _f(42, help="Seed for weights init (LoRA), data order and dropout; saved for exact resume.")
    deterministic: bool = _f(False, help="torch.use_deterministic_algorithms(True) (slower, bit-reproducible).")
    shuffle: bool = _f(True, help="Shuffle the training data each epoch (seed + epoch).")
    num_workers: int = _f(0, help="DataLoader worker processes.")
    # --- steps
    batch_size: int = _f(2, help="Micro-batch size (sequences per forward pass).")
    gradient_accumulation_steps: int = _f(
        1, help="Micro-batches per optimizer step; the loss is normalised by the step's total valid tokens."
    )
    epochs: int = _f(1, help="Passes over the training data.")
    max_steps_per_epoch: int | None = _f(None, help="Cap on optimizer steps per epoch; null = the whole epoch.")
    max_steps: int | None = _f(None, help="Cap on total optimizer steps over all epochs; null = no cap.")
    # --- optimisation
    optimizer: Any = _f(help="Optimizer `_component_`, built with the trainable parameters (e.g. torch.optim.AdamW).")
    lr_scheduler: Any = _f(
        None, help="LR schedule `_component_` (kdtune.training.*_schedule), built with optimizer + total steps."
    )
    num_output_chunks: int | None = _f(
        None,
        help="Chunks the valid positions are split into for the output projection + loss (memory at large vocab); "
        "null = the kd_loss's num_output_chunks (KD) or 8.",
    )
    clip_grad_norm: float | None = _f(None, help="Max gradient L2 norm; null = no clipping (norm still logged).")
    # --- precision and speed
    device: str = _f("auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    dtype: str = _f("fp32", help="fp32 or bf16 (weights and compute); fp16 is refused.")
    enable_activation_checkpointing: bool = _f(False, help="Recompute each decoder layer in backward (less memory).")
    compile: bool = _f(False, help="torch.compile each decoder layer.")
    # --- logging, eval, checkpoints
    metric_logger: Any = _f(None, help="Metric logger `_component_`; null = kdtune.training.DiskLogger in logs/.")
    log_every_n_steps: int = _f(1, help="Log metrics every N optimizer steps.")
    log_peak_memory_stats: bool = _f(True, help="Log peak memory (CUDA allocator on GPU, RSS on CPU).")
    progress_bar: bool = _f(True, help="Show a tqdm progress bar (step/total, loss, lr, tokens/s, ETA).")
    eval_every_n_steps: int | None = _f(
        None, help="Validation loss every N optimizer steps (and always at the end when there is a val split)."
    )
    max_eval_batches: int | None = _f(None, help="Cap on validation batches per evaluation; null = all.")
    save_every_n_steps: int | None = _f(None, help="Resume checkpoint every N steps (also at each epoch end).")
    keep_last_n_checkpoints: int = _f(1, help="Resume checkpoints kept under output_dir/checkpoints/.")
    resume_from_checkpoint: bool = _f(
        False, help="Continue exactly from the latest output_dir/checkpoints/step_N (model, optimizer, LR, RNG, data)."
    )
    save_final_hf: bool = _f(True, help="Write the HF-format model to output_dir/final/ at the end.")


@dataclass(kw_only=True)
class LoRAFinetuneSettings(FinetuneSettings):
    """Settings of ``lora_finetune_single_device``: fine-tuning plus adapter output options."""

    save_adapter_weights_only: bool = _f(
        False, help="Only write the PEFT adapter (final_adapter/), not the merged HF model (final/)."
    )


@dataclass(kw_only=True)
class KDSettings(LoRAFinetuneSettings):
    """Settings of ``knowledge_distillation_single_device``: a frozen teacher and a trainable (full or LoRA) student."""

    teacher_model: Any = _f(help="Teacher model `_component_` (its weights come from teacher_checkpointer).")
    teacher_checkpointer: Any = _f(help="kdtune.models.HFCheckpointer for the teacher (e.g. a merged LoRA final/ dir).")
    teacher_tokenizer: Any = _f(
        None, help="Teacher tokenizer `_component_`, used only to check vocab compatibility; null = skip that check."
    )
    kd_loss: Any = _f(help="Distillation loss `_component_` (kdtune.losses.ForwardKLLoss, JSDLoss, ...).")
    kd_ratio: float = _f(0.5, help="loss = (1 - kd_ratio) * cross-entropy + kd_ratio * KD.")
    temperature: float | None = _f(None, help="Overrides kd_loss.temperature when set (logits / T).")


def settings_markdown_table(settings_cls: type) -> str:
    """A Markdown table of every key of ``settings_cls``: name, type, default, meaning.

    Args:
        settings_cls: one of the settings dataclasses above.

    Returns:
        The table as a string (used to generate ``docs/recipes/*.md``).
    """
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(settings_cls):
        if f.default is dataclasses.MISSING:
            default = "**required**"
        elif f.default is None:
            default = "`null`"
        else:
            default = f"`{str(f.default).lower() if isinstance(f.default, bool) else f.default}`"
        typ = str(f.type).replace("|", "or").replace("Any", "component")
        rows.append(f"| `{f.name}` | {typ} | {default} | {f.metadata.get('help', '')} |")
    return "\n".join(rows)
