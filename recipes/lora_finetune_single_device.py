"""LoRA / QLoRA supervised fine-tuning on a single device (e.g. the teacher of the KD tutorial).

Only the LoRA adapters of the model (a ``lora_*`` builder, or ``kdtune.models.hf_model`` with ``lora_*`` arguments;
``quantize_base: true`` for QLoRA) train, on the token-summed cross-entropy of the dataset's trained tokens (prompts are
masked by the dataset), normalised by the valid tokens of the whole optimizer step. The output projection and the loss
are computed one chunk of positions at a time, so the full ``[batch, seq, vocab]`` logits are never held.

Run:  kdtune run lora_finetune_single_device --config llama3_1/8B_lora_single_device [key=value ...]
Copy and edit:  kdtune cp lora_finetune_single_device ./my_lora.py
Every config key: docs/recipes/lora_finetune_single_device.md

Outputs: output_dir/final (base + merged adapters, HF format; the teacher dir for KD) and output_dir/final_adapter
(PEFT adapter_config.json + adapter_model.safetensors).
"""

import sys

from omegaconf import DictConfig

from kdtune.config import parse_recipe_args, read_settings
from kdtune.errors import ConfigError
from kdtune.training import (
    DataPosition,
    Reporter,
    ResumeCheckpoints,
    RunSummary,
    StepAccumulator,
    build_data,
    build_lr_scheduler,
    build_model,
    build_objective,
    build_optimizer,
    build_tokenizer,
    due,
    evaluate,
    is_lora_model,
    optimizer_step,
    run_card,
    save_final,
    setup_runtime,
    to_device,
    trainable_parameters,
)
from kdtune.training.settings import LoRAFinetuneSettings

RECIPE_DISTRIBUTED = False
RECIPE_SETTINGS = "kdtune.training.settings.LoRAFinetuneSettings"  # read by `kdtune validate`


def train(cfg: DictConfig) -> RunSummary:
    """Fine-tune the LoRA adapters of the model as configured by ``cfg``; returns what the run measured."""
    s = read_settings(LoRAFinetuneSettings, cfg)
    rt = setup_runtime(s.device, s.dtype, s.output_dir, s.seed, s.deterministic, cfg=cfg, mixed_precision=True,
                       num_threads=s.num_threads)  # fmt: skip

    # ---- model (only the adapters train; the base weights are frozen) and tokenizer
    model, checkpointer = build_model(
        s.model,
        s.checkpointer,
        rt,
        activation_checkpointing=s.enable_activation_checkpointing,
        compile=s.compile,
        lora_seed=s.seed,
    )
    tokenizer = build_tokenizer(s.tokenizer)
    if not is_lora_model(model):
        raise ConfigError("model: no LoRA adapters in this model; use a lora_* builder, or full_finetune_single_device")
    objective = build_objective(s)  # cross-entropy over the trained tokens, chunked

    # ---- data, optimizer, LR schedule, checkpoints (resume), metrics
    data = build_data(s, tokenizer)
    optimizer = build_optimizer(s.optimizer, trainable_parameters(model))
    scheduler = build_lr_scheduler(s.lr_scheduler, optimizer, data.total_steps)
    ckpt = ResumeCheckpoints(rt, s, model, optimizer, scheduler, data, cfg)
    if s.resume_from_checkpoint:
        ckpt.resume()
    report = Reporter(rt, s, data)

    def validate(pos: DataPosition) -> None:
        if data.val_loader is not None and report.last_eval_step != pos.global_step:
            metrics = evaluate(
                objective, model, data.val_loader, rt.device, s.max_eval_batches, autocast=rt.precision.autocast
            )
            report.eval(pos, metrics)

    # ---- the loop: one optimizer step per `gradient_accumulation_steps` micro-batches
    acc = StepAccumulator(model, precision=rt.precision)
    for pos, micro_batches in data.steps():
        model.train()
        for batch in micro_batches:
            with rt.precision.autocast():  # fp16: the forward in autocast; fp32/bf16: nothing
                out = objective(model, to_device(batch, rt.device))
            acc.backward(out)  # (fp16: scaled) loss_sum.backward(), sums recorded
        result = optimizer_step(acc, model, optimizer, scheduler, s.clip_grad_norm, pos.global_step, ckpt)
        report.step(pos, result)
        if due(pos.global_step, s.eval_every_n_steps):
            validate(pos)
        if due(pos.global_step, s.save_every_n_steps) or data.is_epoch_end(pos):
            ckpt.save(pos)

    # ---- the end: validation, the PEFT adapter (final_adapter/) and the merged HF model (final/)
    validate(data.position)
    card = run_card(s, report, data.position)  # README.md of final/: base model, data, loss, metrics, command
    save_final(rt, checkpointer, model, adapter_only=s.save_adapter_weights_only, tokenizer=tokenizer, card=card)
    return report.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``--config <name|path> [overrides...]``."""
    train(parse_recipe_args(sys.argv[1:] if argv is None else argv, settings=LoRAFinetuneSettings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
