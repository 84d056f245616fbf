"""Knowledge distillation on a single device: a frozen teacher and a trainable student see the same batch.

    loss = (1 - kd_ratio) * cross-entropy(student, labels) + kd_ratio * KD(student, teacher)

The student is trained in full or with LoRA/QLoRA — whichever its ``model`` component builds (e.g.
``kdtune.models.llama3_2.llama3_2_1b`` or ``...lora_llama3_2_1b``). The teacher is loaded by its own checkpointer (e.g.
the merged ``final/`` of a LoRA run), put in eval mode without gradients, and its vocabulary is checked against the
student's (a teacher padded to a larger vocab is sliced; incompatible tokenizers are refused).

Both losses are computed from the final hidden states one chunk of positions at a time, so neither model's full
``[batch, seq, vocab]`` logits are held; gradients are normalised by the valid tokens of the whole optimizer step.

Run:  kdtune run knowledge_distillation_single_device --config llama3_2/kd [key=value ...]
Copy and edit:  kdtune cp knowledge_distillation_single_device ./my_kd.py
Every config key: docs/recipes/knowledge_distillation_single_device.md
"""

import sys

from omegaconf import DictConfig
from torch import nn

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
    build_teacher,
    build_tokenizer,
    check_teacher,
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
from kdtune.training.settings import KDSettings

RECIPE_DISTRIBUTED = False
RECIPE_SETTINGS = "kdtune.training.settings.KDSettings"  # read by `kdtune validate`


def train(cfg: DictConfig) -> RunSummary:
    """Distil the teacher into the student as configured by ``cfg``; returns what the run measured."""
    s = read_settings(KDSettings, cfg)
    rt = setup_runtime(s.device, s.dtype, s.output_dir, s.seed, s.deterministic, cfg=cfg, mixed_precision=True,
                       num_threads=s.num_threads)  # fmt: skip

    # ---- models: the student (full or LoRA) trains; the teacher is frozen
    student, checkpointer = build_model(
        s.model,
        s.checkpointer,
        rt,
        activation_checkpointing=s.enable_activation_checkpointing,
        compile=s.compile,
        lora_seed=s.seed,
    )
    if s.save_adapter_weights_only and not is_lora_model(student):
        raise ConfigError("save_adapter_weights_only=true needs a LoRA student (a lora_* builder); set it to false")
    tokenizer = build_tokenizer(s.tokenizer)
    data = build_data(s, tokenizer)

    # ---- the teacher (a frozen model, or its cached top-k logits) and the objective that mixes CE and KD
    def load_teacher() -> nn.Module:
        return build_model(s.teacher_model, s.teacher_checkpointer, rt, compile=s.compile, key="teacher_model")[0]

    teacher = build_teacher(s, student, tokenizer, data, load_teacher)
    objective = build_objective(s, teacher, tokenizer)  # divergence, kd_ratio, T, chunks, on_policy: validated once
    # the teacher check: teacher vs student on the transfer set, a warning when the teacher is not better
    teacher_metrics = check_teacher(s, student, teacher, data, rt.device)

    # ---- optimizer, LR schedule, checkpoints (resume), metrics
    optimizer = build_optimizer(s.optimizer, trainable_parameters(student))
    scheduler = build_lr_scheduler(s.lr_scheduler, optimizer, data.total_steps)
    ckpt = ResumeCheckpoints(rt, s, student, optimizer, scheduler, data, cfg, components={"objective": objective})
    if s.resume_from_checkpoint:
        ckpt.resume()
    report = Reporter(rt, s, data)
    report.log(teacher_metrics, step=data.position.global_step)

    def validate(pos: DataPosition) -> None:
        if data.val_loader is not None and report.last_eval_step != pos.global_step:
            metrics = evaluate(
                objective, student, data.val_loader, rt.device, s.max_eval_batches, autocast=rt.precision.autocast
            )
            report.eval(pos, metrics)

    # ---- the loop: one optimizer step per `gradient_accumulation_steps` micro-batches
    acc = StepAccumulator(student, precision=rt.precision)
    for pos, micro_batches in data.steps():
        student.train()
        for batch in micro_batches:
            with rt.precision.autocast():  # fp16: the forward in autocast; fp32/bf16: nothing
                out = objective(student, to_device(batch, rt.device))
            acc.backward(out)  # (fp16: scaled) loss_sum.backward(), sums recorded
        result = optimizer_step(acc, student, optimizer, scheduler, s.clip_grad_norm, pos.global_step, ckpt)
        report.step(pos, result)
        if due(pos.global_step, s.eval_every_n_steps):
            validate(pos)
        if due(pos.global_step, s.save_every_n_steps) or data.is_epoch_end(pos):
            ckpt.save(pos)

    # ---- the end: validation, HF model (+ PEFT adapter for a LoRA student)
    validate(data.position)
    card = run_card(s, report, data.position)  # README.md of final/: student, teacher, data, loss, metrics, command
    save_final(rt, checkpointer, student, adapter_only=s.save_adapter_weights_only, tokenizer=tokenizer, card=card)
    return report.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``--config <name|path> [overrides...]``."""
    train(parse_recipe_args(sys.argv[1:] if argv is None else argv, settings=KDSettings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
