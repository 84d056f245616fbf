"""Typed settings of the training recipes: every top-level config key a recipe reads, its default and its meaning.

A recipe reads its config with ``kdtune.config.read_settings(<Settings>, cfg)``; an unknown or misspelt key is an error
naming the closest field, so a typo never silently falls back to a default. ``_component_`` nodes (``model``,
``optimizer``, ...) stay ``DictConfig`` and are built by :mod:`kdtune.training.setup`. The recipe docs
(``docs/recipes/*.md``) are generated from the ``help`` metadata below by :func:`settings_markdown_table`
(``python -m kdtune.training.settings docs/recipes``). The distributed recipes add the FSDP settings at the end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RECIPES",
    "FinetuneDistributedSettings",
    "FinetuneSettings",
    "GenerateSettings",
    "KDDistributedSettings",
    "KDSettings",
    "LoRAFinetuneDistributedSettings",
    "LoRAFinetuneSettings",
    "OnPolicySettings",
    "PromptSource",
    "recipe_doc",
    "settings_markdown_table",
    "write_recipe_docs",
]


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
    num_output_chunks: int = _f(
        8, help="Chunks the trained positions are split into for the output projection + loss (memory at large vocab)."
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


@dataclass(kw_only=True)
class LoRAFinetuneSettings(FinetuneSettings):
    """Settings of ``lora_finetune_single_device``: fine-tuning plus adapter output options."""

    save_adapter_weights_only: bool = _f(
        False, help="Only write the PEFT adapter (final_adapter/), not the merged HF model (final/)."
    )


@dataclass(kw_only=True)
class OnPolicySettings:
    """``on_policy:`` of the KD recipes: where a training batch's completions come from (validated by
    :class:`kdtune.losses.OnPolicy`, which owns these values)."""

    lmbda: float = _f(0.0, help="Probability in [0, 1] that a micro-batch's completions are sampled from the student.")
    max_new_tokens: int = _f(64, help="Longest sampled completion, in tokens.")
    temperature: float = _f(1.0, help="Sampling temperature of the completions (0 = greedy).")
    top_k: int | None = _f(None, help="Sample among the top-k tokens only; null = all.")
    seq_kd: bool = _f(False, help="Batches not sampled from the student use the teacher's samples (sequence-level KD).")


@dataclass(kw_only=True)
class KDSettings(LoRAFinetuneSettings):
    """Settings of ``knowledge_distillation_single_device``: a frozen teacher and a trainable (full or LoRA) student."""

    teacher_model: Any = _f(
        None, help="Teacher model `_component_` (its weights come from teacher_checkpointer); null with teacher_logits."
    )
    teacher_checkpointer: Any = _f(
        None,
        help="kdtune.models.HFCheckpointer for the teacher (e.g. a merged LoRA final/ dir); null with teacher_logits.",
    )
    teacher_tokenizer: Any = _f(
        None, help="Teacher tokenizer `_component_`, used only to check vocab compatibility; null = skip that check."
    )
    teacher_logits: Any = _f(
        None,
        help="Offline KD: a cached teacher (kdtune.losses.CachedTeacher with the path written by cache_teacher_logits) "
        "instead of teacher_model; no teacher is built.",
    )
    kd_loss: Any = _f(
        help="The divergence `_component_`, a kdtune.losses.Divergence (ForwardKLLoss, ReverseKLLoss, JSDLoss, ...)."
    )
    kd_ratio: float = _f(0.5, help="loss = (1 - kd_ratio) * cross-entropy + kd_ratio * KD, in [0, 1].")
    temperature: float = _f(1.0, help="Both models' distributions are softmax(logits / temperature); > 0.")
    scale_by_temperature_squared: bool = _f(
        True, help="Multiply the KD term by temperature^2 so its gradient does not shrink as 1/T^2 (Hinton et al.)."
    )
    on_policy: OnPolicySettings | None = _f(
        None,
        help="On-policy KD (GKD): {lmbda, max_new_tokens, temperature, top_k, seq_kd}; needs teacher_model; "
        "null = train on the dataset's completions.",
    )


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
        elif isinstance(f.default, bool):
            default = f"`{str(f.default).lower()}`"
        else:
            default = f"`{f.default}`"
        typ = str(f.type).replace(" | ", " or ").replace("Any", "component")
        rows.append(f"| `{f.name}` | {typ} | {default} | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


#: recipe name -> (settings class, intro paragraph) for the generated docs pages
# --- offline distillation (recipes/generate_distillation_data.py)
@dataclass(kw_only=True)
class PromptSource:
    """Where the prompts come from (any ``datasets.load_dataset`` source, any kdtune row format)."""

    source: str = field(metadata={"help": "Hub dataset name, or json/csv/parquet/arrow with data_files."})
    data_files: Any = field(default=None, metadata={"help": "Local file(s) for a packaged builder."})
    split: str = field(default="train", metadata={"help": "Split, slicing allowed (train_sft[:1000])."})
    format: str = field(default="auto", metadata={"help": "Row format (openai, sharegpt, alpaca, ...); auto = detect."})
    column_map: Any = field(
        default=None, metadata={"help": "Canonical column -> your column, e.g. {source: question}."}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts; null = all."})


@dataclass(kw_only=True)
class GenerateSettings:
    """Every key ``generate_distillation_data`` reads."""

    output_dir: str = field(metadata={"help": "Directory for the generated file and the resolved config.yaml."})
    output_file: str | None = field(
        default=None, metadata={"help": "JSON-lines output; null = output_dir/generated.jsonl."}
    )
    model: Any = field(metadata={"help": "Teacher model `_component_` (e.g. kdtune.models.hf_model)."})
    checkpointer: Any = field(metadata={"help": "kdtune.models.HFCheckpointer the teacher's weights come from."})
    tokenizer: Any = field(metadata={"help": "The teacher's tokenizer `_component_` (its chat template is used)."})
    prompts: PromptSource = field(metadata={"help": "The prompt dataset (see PromptSource)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Replace/insert a system turn in every prompt."})
    num_generations: int = field(default=1, metadata={"help": "Completions per prompt (use temperature > 0 for >1)."})
    max_prompt_tokens: int = field(default=512, metadata={"help": "Skip prompts longer than this many tokens."})
    max_new_tokens: int = field(default=512, metadata={"help": "Longest completion, in tokens."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; > 0 samples from logits / temperature."})
    top_k: int | None = field(default=None, metadata={"help": "Sample among the top-k tokens only; null = all."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated together (left-padded)."})
    keep_unfinished: bool = field(default=False, metadata={"help": "Keep completions that hit max_new_tokens."})
    seed: int = field(default=42, metadata={"help": "Sampling seed (same seed -> same file)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N."})
    dtype: str = field(default="fp32", metadata={"help": "fp32 or bf16."})
    resume_from_checkpoint: bool = field(default=False, metadata={"help": "Continue an interrupted .partial file."})
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "Upload the finished file to this Hub dataset repo (<user or org>/<name>); token: HF_TOKEN."},
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the push_to_hub repository private."})


RECIPES: dict[str, tuple[type, str]] = {
    "knowledge_distillation_single_device": (
        KDSettings,
        "A frozen teacher and a trainable student see the same batch; the loss is "
        "`(1 - kd_ratio) * cross-entropy + kd_ratio * KD(student, teacher)`, normalised by the valid tokens of the "
        "whole optimizer step. The student is trained in full or with LoRA/QLoRA, whichever its `model` component "
        "builds (a `lora_*` builder, or `kdtune.models.hf_model` with `lora_*` arguments). The teacher comes from its "
        "own `teacher_checkpointer` (e.g. the merged `final/` of a LoRA run), is put in eval mode without gradients "
        "or optimizer state, and its vocabulary is checked against the student's at setup: a teacher whose output "
        "layer is only padded larger (Qwen2.5-14B 152064 vs 151936) is sliced to the student's vocabulary, "
        "incompatible tokenizers are refused. Both losses are computed from the final hidden states one chunk of "
        "positions at a time (`num_output_chunks`), so no full `[batch, seq, vocab]` "
        "logits tensor is held. `kd_ratio` and `temperature` are top-level so ablations are one override away: "
        "`kd_ratio=0.25 temperature=2.0`.",
    ),
    "lora_finetune_single_device": (
        LoRAFinetuneSettings,
        "LoRA / QLoRA supervised fine-tuning: only the adapters of the model train (`model.quantize_base=true` stores "
        "the frozen base weights in NF4). Used to fine-tune a teacher before distillation: `final/` holds the merged "
        "HF model (the teacher's `checkpoint_dir` for KD) and `final_adapter/` the PEFT adapter.",
    ),
    "full_finetune_single_device": (
        FinetuneSettings,
        "Full-parameter supervised fine-tuning (e.g. the teacher SFT of the Model Optimizer example, or a plain SFT "
        "baseline for a KD student). Cross-entropy summed over trained tokens and normalised by the step's tokens.",
    ),
}

_OUTPUTS = """## Outputs

| path | what |
|---|---|
| `output_dir/config.yaml` | the resolved config of the run |
| `output_dir/logs/*.jsonl` | one JSON line per logged step / evaluation (loss, class_loss, kd_loss, lr, grad_norm, \
tokens_per_second, peak memory, val_*) |
| `output_dir/checkpoints/step_N/` | resume checkpoints (model or LoRA adapter, optimizer, LR schedule, RNG, data \
position, config), written atomically every `save_every_n_steps` and at each epoch end; the newest \
`keep_last_n_checkpoints` are kept |
| `output_dir/final/` | the trained model in Hugging Face format (LoRA merged), loadable by `transformers` |
| `output_dir/final_adapter/` | LoRA models only: the PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`) |

`resume_from_checkpoint=true` (same `output_dir`) continues from the newest `step_N` exactly: same weights, \
optimizer and LR schedule state, RNG and data order (the order depends only on `seed` + epoch). A NaN/inf loss or \
gradient norm stops the run before the update, naming the step; the last good checkpoint stays on disk.

## Common overrides

```bash
optimizer.lr=1e-3 batch_size=4 gradient_accumulation_steps=8
optimizer=torch.optim.SGD ~optimizer.weight_decay          # swap a component, drop an argument it does not take
+lr_scheduler.warmup_ratio=0.03 ~lr_scheduler.num_warmup_steps
metric_logger=kdtune.training.TensorBoardLogger            # needs `pip install kdtune[tensorboard]`
metric_logger=kdtune.training.StdoutLogger ~metric_logger.log_dir
dtype=fp32 device=cpu enable_activation_checkpointing=true max_steps=20 resume_from_checkpoint=true
+model.quantize_base=true                                  # QLoRA, for a lora_* model that does not set it
```
"""

_KD_OVERRIDES = """
KD ablations are top-level keys:

```bash
kd_ratio=0.25 temperature=2.0                              # mixing weight and temperature
kd_loss=kdtune.losses.ReverseKLLoss                        # another divergence (JSDLoss +kd_loss.beta=0.5, TVDLoss, ...)
scale_by_temperature_squared=false num_output_chunks=16
```
"""


def recipe_doc(name: str) -> str:
    """The Markdown page of recipe ``name`` (intro, run command, every config key, outputs)."""
    cls, intro = RECIPES[name]
    return (
        f"# `{name}`\n\n<!-- generated by `python -m kdtune.training.settings docs/recipes`; edit the settings "
        f"dataclass in kdtune/training/settings.py instead -->\n\n{intro}\n\n"
        f"```bash\nkdtune run {name} --config <name or path.yaml> [key=value ...]\nkdtune cp {name} ./my_recipe.py"
        f"   # a standalone copy to edit\n```\n\n## Config keys\n\nEvery top-level key the recipe reads "
        "(plus `recipe:`); any other key is an error naming the closest one. `_component_` nodes are built with "
        "`kdtune.config.instantiate`.\n\n"
        f"{settings_markdown_table(cls)}\n\n{_OUTPUTS}{_KD_OVERRIDES if issubclass(cls, KDSettings) else ''}"
    )


def write_recipe_docs(out_dir: str) -> list[str]:
    """Write ``<out_dir>/<recipe>.md`` for every recipe above; returns the paths written."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in RECIPES:
        path = out / f"{name}.md"
        path.write_text(recipe_doc(name))
        written.append(str(path))
    return written


if __name__ == "__main__":
    import sys

    print("\n".join(write_recipe_docs(sys.argv[1] if len(sys.argv) > 1 else "docs/recipes")))


@dataclass(kw_only=True)
class _FSDPSettings:
    """What the distributed recipes add to the single-device settings."""

    fsdp_cpu_offload: bool = field(
        default=False,
        metadata={"help": "Keep sharded parameters, gradients and optimizer state in CPU memory (CUDA only)."},
    )
    fsdp_reshard_after_forward: bool = field(
        default=True,
        metadata={"help": "Free each layer's gathered weights after its forward (less memory, more communication)."},
    )


@dataclass(kw_only=True)
class FinetuneDistributedSettings(FinetuneSettings, _FSDPSettings):
    """Settings of ``full_finetune_distributed``: ``full_finetune_single_device``'s plus FSDP options."""


@dataclass(kw_only=True)
class LoRAFinetuneDistributedSettings(LoRAFinetuneSettings, _FSDPSettings):
    """Settings of ``lora_finetune_distributed``: ``lora_finetune_single_device``'s plus FSDP options."""


@dataclass(kw_only=True)
class KDDistributedSettings(KDSettings, _FSDPSettings):
    """Settings of ``knowledge_distillation_distributed``: the single-device KD settings plus FSDP options."""
