"""Knowledge distillation on many devices (torchrun + FSDP2): teacher and student are both sharded over all ranks.

    loss = (1 - kd_ratio) * cross-entropy(student, labels) + kd_ratio * KD(student, teacher)

The same recipe as ``knowledge_distillation_single_device`` except where distribution needs it:

* the process group comes from ``torchrun`` (NCCL on GPUs, Gloo on CPU), one device per local rank;
* student and teacher are built on the meta device, sharded per decoder layer with ``fully_shard`` and filled from
  their HF files one weight file at a time, so no rank ever holds a full copy of either model;
* every rank reads its own slice of each optimizer step's global batch; the step's valid-token count and loss sums are
  all-reduced, so the gradient is normalised over the global batch exactly and the logged metrics are global;
* resume checkpoints are sharded (``torch.distributed.checkpoint``); the final HF model (and PEFT adapter for a LoRA
  student) is gathered and written by rank 0.

Run:  kdtune run --nproc_per_node 8 knowledge_distillation_distributed --config llama3_1/70B_to_8B_kd_distributed
      (multi-node: add --nnodes N --node_rank R --rdzv_endpoint HOST:PORT)
Copy and edit:  kdtune cp knowledge_distillation_distributed ./my_kd.py
Every config key: docs/distributed.md and docs/recipes/knowledge_distillation_single_device.md
"""

import sys

from omegaconf import DictConfig
from torch import nn

from kdtune.config import parse_recipe_args, read_settings
from kdtune.errors import ConfigError
from kdtune.training import (
    DataPosition,
    Reporter,
    RunSummary,
    StepAccumulator,
    build_data,
    build_lr_scheduler,
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
    set_seed,
    setup_runtime,
    to_device,
    trainable_parameters,
)
from kdtune.training import distributed as D
from kdtune.training.settings import KDDistributedSettings

RECIPE_DISTRIBUTED = True
RECIPE_SETTINGS = "kdtune.training.settings.KDDistributedSettings"


def train(cfg: DictConfig) -> RunSummary:
    """Distil the teacher into the student as configured by ``cfg`` on every rank; returns what the run measured."""
    s = read_settings(KDDistributedSettings, cfg)
    env = D.init_distributed(s.device)
    try:
        return _train(cfg, s, env)
    finally:
        D.destroy_distributed()


def _train(cfg: DictConfig, s: KDDistributedSettings, env: D.DistEnv) -> RunSummary:
    rt = setup_runtime(str(env.device), s.dtype, s.output_dir, s.seed, s.deterministic, cfg=cfg, mixed_precision=True,
                         num_threads=s.num_threads, save_config_file=env.is_rank_zero)  # fmt: skip
    set_seed(s.seed, s.deterministic, rank=env.rank)  # dropout masks differ per rank; data order does not

    # ---- models: both built on meta and sharded; the student (full or LoRA) trains, the teacher is frozen
    fsdp = {"cpu_offload": s.fsdp_cpu_offload, "reshard_after_forward": s.fsdp_reshard_after_forward}
    student, checkpointer = D.build_sharded_model(
        s.model, s.checkpointer, rt, seed=s.seed, activation_checkpointing=s.enable_activation_checkpointing,
        compile=s.compile, **fsdp,
    )  # fmt: skip
    if s.save_adapter_weights_only and not is_lora_model(student):
        raise ConfigError("save_adapter_weights_only=true needs a LoRA student (a lora_* builder); set it to false")
    tokenizer = build_tokenizer(s.tokenizer)
    with D.rank_zero_first():  # rank 0 fills the datasets cache, the others then read it
        data = build_data(s, tokenizer, rank=env.rank, world_size=env.world_size)  # this rank's slice of each step
    if data.val_loader is not None:  # every validation example once over all ranks, same batch count everywhere
        data.val_loader = D.EvenEvalLoader(data.val_loader, env.rank, env.world_size)

    # ---- the teacher (a frozen sharded model, or its cached top-k logits) and the objective that mixes CE and KD
    def load_teacher() -> nn.Module:
        return D.build_sharded_model(
            s.teacher_model, s.teacher_checkpointer, rt, key="teacher_model", compile=s.compile, **fsdp
        )[0]

    teacher = build_teacher(s, student, tokenizer, data, load_teacher)
    objective = build_objective(s, teacher, tokenizer)  # divergence, kd_ratio, T, chunks, on_policy: validated once
    # the teacher check: teacher vs student on the transfer set, a warning when the teacher is not better
    teacher_metrics = check_teacher(s, student, teacher, data, rt.device, D.all_reduce_sum)

    # ---- optimizer, LR schedule, sharded checkpoints, metrics
    optimizer = build_optimizer(s.optimizer, trainable_parameters(student))
    scheduler = build_lr_scheduler(s.lr_scheduler, optimizer, data.total_steps)
    ckpt = D.DistributedResumeCheckpoints(
        rt, s, student, optimizer, scheduler, data, cfg, components={"objective": objective}
    )
    if s.resume_from_checkpoint:
        ckpt.resume()
    report = Reporter(rt, s, data, enabled=env.is_rank_zero)
    report.log(teacher_metrics, step=data.position.global_step)

    def validate(pos: DataPosition) -> None:
        if data.val_loader is not None and report.last_eval_step != pos.global_step:
            metrics = evaluate(objective, student, data.val_loader, rt.device, s.max_eval_batches, D.all_reduce_sum,
                               autocast=rt.precision.autocast)  # fmt: skip
            report.eval(pos, metrics)

    # ---- the loop: one optimizer step per `gradient_accumulation_steps` micro-batches on every rank
    acc = StepAccumulator(
        student, all_reduce=D.all_reduce_sum, grad_average_factor=env.world_size, precision=rt.precision
    )
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

    # ---- the end: validation, HF model (+ PEFT adapter for a LoRA student), gathered and written by rank 0
    validate(data.position)
    card = run_card(s, report, data.position)  # README.md of final/: student, teacher, data, loss, metrics, command
    D.save_final_distributed(rt, checkpointer, student, s.model, adapter_only=s.save_adapter_weights_only,
                             tokenizer=tokenizer, card=card)  # fmt: skip
    return report.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point (on every rank): ``--config <name|path> [overrides...]``."""
    train(parse_recipe_args(sys.argv[1:] if argv is None else argv, settings=KDDistributedSettings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
