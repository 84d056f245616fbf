"""Evaluate a model with EleutherAI's lm-evaluation-harness: any kdtune family, a run's final/ or any HF dir, LoRA
adapters included.

    kdtune run eleuther_eval --config llama3_2/eval                       # the KD student's final/
    kdtune run eleuther_eval --config llama3_2/eval tasks=[arc_easy] limit=100 \
        checkpointer.checkpoint_dir=/tmp/Meta-Llama-3.1-8B-Instruct        # the same tasks on the teacher
    kdtune run eleuther_eval --config tiny/eval adapter_dir=<run>/final_adapter   # base + PEFT adapter

The model is wrapped as an lm-eval ``LM`` (log-likelihood, rolling log-likelihood, generate-until with the KV cache
and stop sequences) that follows lm-eval's own ``hf`` model, so scores match it on the same checkpoint. Prints lm-eval's
table and writes ``output_dir/results.json`` (+ ``samples_<task>.jsonl`` with ``log_samples=true``). Local tasks: put
task YAMLs in a folder and pass ``include_path=[DIR]`` (``include_default_tasks=false`` skips indexing the built-in
ones). Needs the eval extra: ``pip install 'kdtune[eval]'``.

Copy and edit:  kdtune cp eleuther_eval ./my_eval.py
"""

import sys

from omegaconf import DictConfig, OmegaConf

from kdtune.config import parse_recipe_args, read_settings
from kdtune.eval import (
    EvalSettings,
    build_eval_model,
    check_tasks,
    evaluate,
    format_tables,
    make_task_manager,
    require_lm_eval,
    write_results,
)
from kdtune.training import build_tokenizer, setup_runtime

RECIPE_DISTRIBUTED = False
RECIPE_SETTINGS = "kdtune.eval.settings.EvalSettings"  # read by `kdtune validate`


def main(argv: list[str] | None = None) -> dict:
    cfg: DictConfig = parse_recipe_args(argv, settings=EvalSettings)
    s = read_settings(EvalSettings, cfg)
    require_lm_eval()
    from kdtune.eval.lm import KDTuneLM

    task_manager = make_task_manager(s.include_path, s.include_default_tasks)
    tasks = check_tasks(task_manager, s.tasks)  # before loading the model: a typo fails in seconds
    rt = setup_runtime(s.device, s.dtype, s.output_dir, s.seed, cfg=cfg)
    tokenizer = build_tokenizer(s.tokenizer)
    model = build_eval_model(s.model, s.checkpointer, rt, adapter_dir=s.adapter_dir)
    lm = KDTuneLM(model, tokenizer, batch_size=s.batch_size, max_length=s.max_seq_len, max_gen_toks=s.max_gen_toks,
                  seed=s.seed)  # fmt: skip
    rt.save_config()  # everything built and checked: this run's config.yaml replaces the previous one
    print(f"evaluating on {', '.join(tasks)} (max_seq_len {lm.max_length}, batch size {s.batch_size})")
    results = evaluate(
        lm, tasks, task_manager, num_fewshot=s.num_fewshot, limit=s.limit, apply_chat_template=s.apply_chat_template,
        system_instruction=s.system_instruction, log_samples=s.log_samples, bootstrap_iters=s.bootstrap_iters,
        seed=s.seed,
    )  # fmt: skip
    print(format_tables(results))
    source = {
        "checkpoint_dir": OmegaConf.select(cfg, "checkpointer.checkpoint_dir"),
        "adapter_dir": s.adapter_dir,
        "max_seq_len": lm.max_length,
        "dtype": s.dtype,
    }
    path = write_results(results, rt.output_dir, extra={"kdtune": source})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
