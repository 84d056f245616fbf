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

from kdtune.config import describe_settings, setting
from kdtune.eval.settings import EvalSettings
from kdtune.training.runtime import device_problem, dtype_problem, weights_dtype_problem

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


@dataclass(kw_only=True)
class FinetuneSettings:
    """Settings shared by every training recipe (full fine-tuning reads exactly these)."""

    # --- where things come from and go to
    output_dir: str = setting(
        help="Directory for checkpoints/, final/, logs/ and the resolved config.yaml.", non_empty=True
    )
    model: Any = setting(
        help="Model `_component_` (e.g. kdtune.models.llama3_2.llama3_2_1b or kdtune.models.hf_model).", component=True
    )
    tokenizer: Any = setting(
        help="Tokenizer `_component_`, usually kdtune.data.load_hf_tokenizer with checkpoint_dir.", component=True
    )
    checkpointer: Any = setting(
        help="kdtune.models.HFCheckpointer `_component_` the model's weights are loaded from.", component=True
    )
    dataset: Any = setting(help="Training dataset `_component_` (or a list of them, concatenated).", component=True)
    val_dataset: Any = setting(
        None, help="Validation dataset `_component_`; null = none (see val_split_ratio).", component=True
    )
    val_split_ratio: float = setting(
        0.0,
        help="Fraction of the training dataset held out (seeded) for validation when val_dataset is null.",
        ge=0.0,
        lt=1.0,
    )
    # --- data order
    seed: int = setting(42, help="Seed for weights init (LoRA), data order and dropout; saved for exact resume.", ge=0)
    deterministic: bool = setting(False, help="torch.use_deterministic_algorithms(True) (slower, bit-reproducible).")
    shuffle: bool = setting(True, help="Shuffle the training data each epoch (seed + epoch).")
    group_by_length: bool = setting(
        False,
        help="Batch examples of similar length together so little padding is trained: the shuffled order is cut into "
        "groups of 50 micro-batches (of every rank), each sorted longest first. For unpacked data (packing already "
        "trains no padding), e.g. the seq2seq KD configs; needs the dataset tokenized up front (lazy=false).",
    )
    num_workers: int = setting(0, help="DataLoader worker processes.", ge=0)
    # --- steps
    batch_size: int = setting(2, help="Micro-batch size (sequences per forward pass).", ge=1)
    gradient_accumulation_steps: int = setting(
        1, help="Micro-batches per optimizer step; the loss is normalised by the step's total valid tokens.", ge=1
    )
    epochs: int = setting(1, help="Passes over the training data.", ge=1)
    max_steps_per_epoch: int | None = setting(
        None, help="Cap on optimizer steps per epoch; null = the whole epoch.", ge=1
    )
    max_steps: int | None = setting(None, help="Cap on total optimizer steps over all epochs; null = no cap.", ge=1)
    # --- optimisation
    optimizer: Any = setting(
        help="Optimizer `_component_`, built with the trainable parameters (e.g. torch.optim.AdamW).", component=True
    )
    lr_scheduler: Any = setting(
        None,
        help="LR schedule `_component_` (kdtune.training.*_schedule), built with optimizer + total steps.",
        component=True,
    )
    num_output_chunks: int | None = setting(
        None,
        help="Chunks the trained positions are split into for the output projection + loss; null = chunks sized by a "
        "memory budget (512 MiB of fp32 vocabulary-sized tensors), which keeps the GEMMs efficient.",
        ge=1,
    )
    clip_grad_norm: float | None = setting(
        None, help="Max gradient L2 norm; null = no clipping (norm still logged).", gt=0
    )
    # --- precision and speed
    device: str = setting("auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N.", check=device_problem)
    dtype: str = setting(
        "fp32",
        help="fp32, bf16 (weights and compute) or fp16 (mixed precision: fp32 weights, fp16 autocast, dynamic loss "
        "scaling; overflowed steps are skipped and logged as skipped_steps).",
        check=dtype_problem,
    )
    num_threads: int | None = setting(
        None,
        help="CPU threads of torch; null = OMP_NUM_THREADS if set, else the physical cores (a warning when the "
        "machine is oversubscribed: busy cores make torch's threads several times slower).",
        ge=1,
    )
    enable_activation_checkpointing: bool = setting(
        False, help="Recompute each decoder layer in backward (less memory)."
    )
    compile: bool = setting(
        False,
        help="torch.compile each decoder layer (the student's, and a live teacher's in KD) and the fused loss's "
        "cross-entropy + forward-KL chunk; on a CPU through inductor's C++ wrapper.",
    )
    # --- logging, eval, checkpoints
    metric_logger: Any = setting(
        None, help="Metric logger `_component_`; null = kdtune.training.DiskLogger in logs/.", component=True
    )
    log_every_n_steps: int = setting(1, help="Log metrics every N optimizer steps.", ge=1)
    log_peak_memory_stats: bool = setting(True, help="Log peak memory (CUDA allocator on GPU, RSS on CPU).")
    progress_bar: bool = setting(True, help="Show a tqdm progress bar (step/total, loss, lr, tokens/s, ETA).")
    eval_every_n_steps: int | None = setting(
        None, help="Validation loss every N optimizer steps (and always at the end when there is a val split).", ge=1
    )
    max_eval_batches: int | None = setting(None, help="Cap on validation batches per evaluation; null = all.", ge=1)
    save_every_n_steps: int | None = setting(
        None, help="Resume checkpoint every N steps (also at each epoch end).", ge=1
    )
    keep_last_n_checkpoints: int = setting(1, help="Resume checkpoints kept under output_dir/checkpoints/.", ge=1)
    resume_from_checkpoint: bool = setting(
        False, help="Continue exactly from the latest output_dir/checkpoints/step_N (model, optimizer, LR, RNG, data)."
    )


@dataclass(kw_only=True)
class LoRAFinetuneSettings(FinetuneSettings):
    """Settings of ``lora_finetune_single_device``: fine-tuning plus adapter output options."""

    save_adapter_weights_only: bool = setting(
        False, help="Only write the PEFT adapter (final_adapter/), not the merged HF model (final/)."
    )


@dataclass(kw_only=True)
class OnPolicySettings:
    """``on_policy:`` of the KD recipes: where a training batch's completions come from (validated by
    :class:`kdtune.losses.OnPolicy`, which owns these values)."""

    lmbda: float = setting(
        0.0, help="Probability in [0, 1] that a micro-batch's completions are sampled from the student.", ge=0.0, le=1.0
    )
    max_new_tokens: int = setting(64, help="Longest sampled completion, in tokens.", ge=1)
    temperature: float = setting(1.0, help="Sampling temperature of the completions (0 = greedy).", ge=0.0)
    top_k: int | None = setting(None, help="Sample among the top-k tokens only; null = all.", ge=1)
    seq_kd: bool = setting(
        False, help="Batches not sampled from the student use the teacher's samples (sequence-level KD)."
    )


@dataclass(kw_only=True)
class KDSettings(LoRAFinetuneSettings):
    """Settings of ``knowledge_distillation_single_device``: a frozen teacher and a trainable (full or LoRA) student."""

    teacher_model: Any = setting(
        None,
        help="Teacher model `_component_` (its weights come from teacher_checkpointer); null with teacher_logits.",
        component=True,
    )
    teacher_checkpointer: Any = setting(
        None,
        help="kdtune.models.HFCheckpointer for the teacher (e.g. a merged LoRA final/ dir); null with teacher_logits.",
        component=True,
    )
    teacher_tokenizer: Any = setting(
        None,
        help="Teacher tokenizer `_component_`, used only to check vocab compatibility; null = skip that check.",
        component=True,
    )
    teacher_logits: Any = setting(
        None,
        help="Offline KD: a cached teacher (kdtune.losses.CachedTeacher with the path written by cache_teacher_logits) "
        "instead of teacher_model; no teacher is built.",
        component=True,
    )
    kd_loss: Any = setting(
        help="The divergence `_component_`, a kdtune.losses.Divergence (ForwardKLLoss, ReverseKLLoss, JSDLoss, ...).",
        component=True,
    )
    kd_ratio: float = setting(
        0.5, help="loss = (1 - kd_ratio) * cross-entropy + kd_ratio * KD, in [0, 1].", ge=0.0, le=1.0
    )
    temperature: float = setting(1.0, help="Both models' distributions are softmax(logits / temperature); > 0.", gt=0.0)
    scale_by_temperature_squared: bool = setting(
        True, help="Multiply the KD term by temperature^2 so its gradient does not shrink as 1/T^2 (Hinton et al.)."
    )
    teacher_check: bool = setting(
        True,
        help="Before training, compare the live teacher's and the student's loss and next-token accuracy on the "
        "validation data (max_eval_batches; else a few training batches); warn when the teacher is not better.",
    )
    on_policy: OnPolicySettings | None = setting(
        None,
        help="On-policy KD (GKD): {lmbda, max_new_tokens, temperature, top_k, seq_kd}; needs teacher_model; "
        "null = train on the dataset's completions.",
    )


def settings_markdown_table(settings_cls: type) -> str:
    """A Markdown table of every key of ``settings_cls``: name, type, default, meaning (and the values allowed).

    Args:
        settings_cls: one of the settings dataclasses above.

    Returns:
        The table as a string (used to generate ``docs/recipes/*.md``).
    """
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    allowed = {info.name: info.allowed for info in describe_settings(settings_cls)}
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
        limits = f" Allowed: {allowed[f.name]}." if allowed.get(f.name) else ""
        rows.append(f"| `{f.name}` | {typ} | {default} | {f.metadata.get('help', '')}{limits} |")
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
    max_prompts: int | None = setting(None, help="Use only the first N prompts; null = all.", ge=1)


@dataclass(kw_only=True)
class GenerateSettings:
    """Every key ``generate_distillation_data`` reads."""

    output_dir: str = setting(help="Directory for the generated file and the resolved config.yaml.", non_empty=True)
    output_file: str | None = field(
        default=None, metadata={"help": "JSON-lines output; null = output_dir/generated.jsonl."}
    )
    model: Any = setting(help="Teacher model `_component_` (e.g. kdtune.models.hf_model).", component=True)
    checkpointer: Any = setting(help="kdtune.models.HFCheckpointer the teacher's weights come from.", component=True)
    tokenizer: Any = setting(help="The teacher's tokenizer `_component_` (its chat template is used).", component=True)
    prompts: PromptSource = field(metadata={"help": "The prompt dataset (see PromptSource)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Replace/insert a system turn in every prompt."})
    num_generations: int = setting(1, help="Completions per prompt (use temperature > 0 for >1).", ge=1)
    max_prompt_tokens: int = setting(512, help="Skip prompts longer than this many tokens.", ge=1)
    max_new_tokens: int = setting(512, help="Longest completion, in tokens.", ge=1)
    temperature: float = setting(0.0, help="0 = greedy; > 0 samples from logits / temperature.", ge=0.0)
    top_k: int | None = setting(None, help="Sample among the top-k tokens only; null = all.", ge=1)
    batch_size: int = setting(8, help="Prompts generated together (left-padded).", ge=1)
    keep_unfinished: bool = field(default=False, metadata={"help": "Keep completions that hit max_new_tokens."})
    seed: int = setting(42, help="Sampling seed (same seed -> same file).", ge=0)
    device: str = setting("auto", help="auto, cpu, cuda, cuda:N.", check=device_problem)
    dtype: str = setting("fp32", help="fp32 or bf16.", check=weights_dtype_problem)
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
    "eleuther_eval": (
        EvalSettings,
        "Evaluate a model with EleutherAI's lm-evaluation-harness (`pip install 'kdtune[eval]'`): a run's `final/`, "
        "any HF directory, or a base model plus a PEFT adapter (`adapter_dir`, e.g. a run's `final_adapter/`), of "
        "any kdtune family. The model is wrapped as an lm-eval model (log-likelihood, rolling log-likelihood, "
        "generate-until with the KV cache and stop sequences) that scores like lm-eval's own `hf` model. Compare "
        "teacher, SFT student and KD student by running the same config with `checkpointer.checkpoint_dir` pointing "
        "at each (see docs/tutorial_distillation.md).",
    ),
}

_OUTPUTS = """## Outputs

| path | what |
|---|---|
| `output_dir/config.yaml` | the resolved config of the last run started there (written once setup succeeded) |
| `output_dir/logs/log_<run id>.jsonl` | one file per run, one JSON line per logged step / evaluation (run_id, loss, \
class_loss, kd_loss, lr, grad_norm, tokens_per_second, peak memory, val_*); after a resume, the rows of steps an \
earlier run had logged carry `"resumed": true` |
| `output_dir/checkpoints/step_N/` | resume checkpoints (model or LoRA adapter, optimizer, LR schedule, RNG, data \
position, config), written atomically every `save_every_n_steps` and at each epoch end; the newest \
`keep_last_n_checkpoints` are kept |
| `output_dir/final/` | the trained model in Hugging Face format (LoRA merged), loadable by `transformers`, with the \
chat template it trained with (`tokenizer_config.json`, `chat_template.jinja`) and a generated model card (`README.md`: \
base model, teacher, data, loss, metrics, command; licence files of the base model kept) |
| `output_dir/final_adapter/` | LoRA models only: the PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`) |

One run per `output_dir`: a second live run there is refused (naming its pid; a killed run leaves no lock), and a \
fresh run (`resume_from_checkpoint=false`) in a directory that holds an earlier run's checkpoints is refused. \
`resume_from_checkpoint=true` continues from the newest `step_N` exactly: same weights, optimizer and LR schedule \
state, RNG and data order (the order depends only on `seed` + epoch). Every key that differs from the checkpoint's \
config is either applied, with a printed line (`optimizer.*` such as a new lr, in the parameter groups and the \
schedule; `max_steps`/`epochs`/`lr_scheduler.*`, re-planning the schedule; logging/eval/save cadence, \
`keep_last_n_checkpoints`, `clip_grad_norm`, precision and speed settings), or refused in one line naming the key \
(the data order: `seed`, `shuffle`, `group_by_length`, `batch_size`, `gradient_accumulation_steps`, \
`max_steps_per_epoch`; `dataset`/`val_dataset`/`val_split_ratio`, `tokenizer`, `model`, `checkpointer`; the KD \
objective: `teacher_*`, \
`kd_loss`, `kd_ratio`, `temperature`, `scale_by_temperature_squared`; any key kdtune does not know). \
`kdtune runs <output_dir>` lists the checkpoints, their loss and config differences and which one resume picks.

A NaN/inf loss or gradient norm stops the run before the update, naming the step. The checkpoint of the step before \
holds the weights that produced it (resuming from it would repeat it), so it is set aside as `step_N.diverged` and \
the message names the newest older one (only finite, sane weights and optimizer state are ever saved): resume from \
it with a lower `optimizer.lr`, `clip_grad_norm=1.0` or `dtype=fp32` (`keep_last_n_checkpoints` >= 2 keeps one). With \
`dtype=fp16` (mixed precision) a step whose loss-scaled gradients overflow is skipped instead (no update, the loss \
scale halves) and counted: the logs then carry `loss_scale` and `skipped_steps`, and the scaler is checkpointed. \
`kdtune export output_dir/checkpoints/step_N --output-dir DIR` writes any resume checkpoint as `DIR/final` (and \
`DIR/final_adapter`), exactly as the run's final save would have at that step.

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


_EVAL_OUTPUTS = """## Outputs

| path | what |
|---|---|
| `output_dir/config.yaml` | the resolved config of the run |
| `output_dir/results.json` | lm-eval's results (per task and metric, with stderrs unless `bootstrap_iters=0`) plus a \
`kdtune` entry naming the checkpoint, adapter, max_seq_len and dtype |
| `output_dir/samples_<task>.jsonl` | with `log_samples=true`: every request's prompt, target and output |

lm-eval's table is printed at the end. A task, group or tag lm-eval does not know is an error naming the closest \
ones, before the model is loaded.

## Common overrides

```bash
tasks=[arc_easy,hellaswag] limit=100 num_fewshot=0       # a quick check on a subset
checkpointer.checkpoint_dir=/tmp/teacher/final            # the same tasks on another model
adapter_dir=/tmp/run/final_adapter                        # base model + PEFT adapter
apply_chat_template=true dtype=fp32 batch_size=16
include_path=[/my/tasks] include_default_tasks=false      # local task YAMLs only
```
"""


def recipe_doc(name: str) -> str:
    """The Markdown page of recipe ``name`` (intro, run command, every config key, outputs)."""
    cls, intro = RECIPES[name]
    if issubclass(cls, FinetuneSettings):
        outputs = _OUTPUTS + (_KD_OVERRIDES if issubclass(cls, KDSettings) else "")
    else:
        outputs = _EVAL_OUTPUTS
    return (
        f"# `{name}`\n\n<!-- generated by `python -m kdtune.training.settings docs/recipes`; edit the settings "
        f"dataclass in kdtune/training/settings.py instead -->\n\n{intro}\n\n"
        f"```bash\nkdtune run {name} --config <name or path.yaml> [key=value ...]\nkdtune cp {name} ./my_recipe.py"
        f"   # a standalone copy to edit\n```\n\n## Config keys\n\nEvery top-level key the recipe reads "
        "(plus `recipe:`); any other key is an error naming the closest one. `_component_` nodes are built with "
        "`kdtune.config.instantiate`.\n\n"
        f"{settings_markdown_table(cls)}\n\n{outputs}"
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
