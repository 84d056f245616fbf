"""Full-parameter supervised fine-tuning on many devices (torchrun + FSDP2), e.g. the teacher SFT before distillation.

The same recipe as ``full_finetune_single_device`` except where distribution needs it:

* the process group comes from ``torchrun`` (NCCL on GPUs, Gloo on CPU), one device per local rank;
* the model is built on the meta device, sharded per decoder layer with ``fully_shard`` and filled from its HF files
  one weight file at a time, so no rank ever holds a full copy;
* every rank reads its own slice of each optimizer step's global batch; the step's valid-token count and loss sums are
  all-reduced, so the gradient is normalised over the global batch exactly and the logged metrics are global;
* resume checkpoints are sharded (``torch.distributed.checkpoint``); the final HF model is gathered and written by
  rank 0.

Run:  kdtune run --nproc_per_node 8 full_finetune_distributed --config llama2/7B_full
      (multi-node: add --nnodes N --node_rank R --rdzv_endpoint HOST:PORT)
Copy and edit:  kdtune cp full_finetune_distributed ./my_sft.py
Every config key: docs/distributed.md and docs/recipes/full_finetune_single_device.md
"""

import sys

from omegaconf import DictConfig

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
    build_tokenizer,
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
from kdtune.training.settings import FinetuneDistributedSettings

RECIPE_DISTRIBUTED = True
RECIPE_SETTINGS = "kdtune.training.settings.FinetuneDistributedSettings"


def train(cfg: DictConfig) -> RunSummary:
    """Fine-tune every parameter of the model as configured by ``cfg`` on every rank; returns what the run measured."""
    s = read_settings(FinetuneDistributedSettings, cfg)
    env = D.init_distributed(s.device)
    try:
        return _train(cfg, s, env)
    finally:
        D.destroy_distributed()


def _train(cfg: DictConfig, s: FinetuneDistributedSettings, env: D.DistEnv) -> RunSummary:
    rt = setup_runtime(str(env.device), s.dtype, s.output_dir, s.seed, s.deterministic, cfg=cfg, mixed_precision=True,
                         num_threads=s.num_threads, save_config_file=env.is_rank_zero)  # fmt: skip
    set_seed(s.seed, s.deterministic, rank=env.rank)  # dropout masks differ per rank; data order does not

    # ---- model (all parameters train; built on meta, sharded, filled shard by shard), then the tokenizer
    model, checkpointer = D.build_sharded_model(
        s.model, s.checkpointer, rt, seed=s.seed, activation_checkpointing=s.enable_activation_checkpointing,
        compile=s.compile, cpu_offload=s.fsdp_cpu_offload, reshard_after_forward=s.fsdp_reshard_after_forward,
    )  # fmt: skip
    if is_lora_model(model):
        raise ConfigError(
            "model: this is a LoRA model; run lora_finetune_distributed for it, or use a non-lora builder"
        )
    tokenizer = build_tokenizer(s.tokenizer)
    objective = build_objective(s)  # cross-entropy over the trained tokens, chunked

    # ---- data (this rank's slice of every global batch), optimizer, LR schedule, sharded checkpoints, metrics
    with D.rank_zero_first():  # rank 0 fills the datasets cache, the others then read it
        data = build_data(s, tokenizer, rank=env.rank, world_size=env.world_size)
    if data.val_loader is not None:  # every validation example once over all ranks, same batch count everywhere
        data.val_loader = D.EvenEvalLoader(data.val_loader, env.rank, env.world_size)
    optimizer = build_optimizer(s.optimizer, trainable_parameters(model))
    scheduler = build_lr_scheduler(s.lr_scheduler, optimizer, data.total_steps)
    ckpt = D.DistributedResumeCheckpoints(rt, s, model, optimizer, scheduler, data, cfg)
    if s.resume_from_checkpoint:
        ckpt.resume()
    report = Reporter(rt, s, data, enabled=env.is_rank_zero)

    def validate(pos: DataPosition) -> None:
        if data.val_loader is not None and report.last_eval_step != pos.global_step:
            metrics = evaluate(objective, model, data.val_loader, rt.device, s.max_eval_batches, D.all_reduce_sum,
                               autocast=rt.precision.autocast)  # fmt: skip
            report.eval(pos, metrics)

    # ---- the loop: one optimizer step per `gradient_accumulation_steps` micro-batches on every rank
    acc = StepAccumulator(
        model, all_reduce=D.all_reduce_sum, grad_average_factor=env.world_size, precision=rt.precision
    )
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

    # ---- the end: validation and the HF-format model in output_dir/final, gathered and written by rank 0
    validate(data.position)
    card = run_card(s, report, data.position)  # README.md of final/: base model, data, loss, metrics, command
    D.save_final_distributed(rt, checkpointer, model, s.model, tokenizer=tokenizer, card=card)
    return report.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point (on every rank): ``--config <name|path> [overrides...]``."""
    train(parse_recipe_args(sys.argv[1:] if argv is None else argv, settings=FinetuneDistributedSettings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
