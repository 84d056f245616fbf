"""Offline distillation, step 1: the teacher writes the answers a student is then fine-tuned on.

For every prompt of a dataset (its conversation up to the last assistant turn), the teacher generates
``num_generations`` completions with the KV cache, and each (prompt, completion) pair is written as one JSON line with
both an OpenAI ``messages`` column and ``prompt``/``completion`` columns. Step 2 is an ordinary SFT run on that file:

    kdtune run generate_distillation_data --config llama3_2/generate_distillation_data
    kdtune run full_finetune_single_device --config llama3_2/sft_on_generated   # or any SFT config with
        dataset._component_=kdtune.data.chat_dataset dataset.source=json dataset.data_files=<output_file>

Prompts longer than ``max_prompt_tokens`` are skipped and completions cut at ``max_new_tokens`` are dropped (unless
``keep_unfinished``); the run summary (printed, and ``output_dir/generation_summary.json``) counts both. Lines are
appended batch by batch to ``<output_file>.partial``; a rerun with ``resume_from_checkpoint=True`` continues after the
last finished batch, and the file is renamed to ``output_file`` only when every prompt is done. With
``push_to_hub=<user or org>/<name>`` the finished file is uploaded to that Hub dataset repository (created, private with
``hub_private=true``), with the token ``huggingface_hub`` finds (``HF_TOKEN`` or ``hf auth login``; never printed).

Copy and edit:  kdtune cp generate_distillation_data ./my_generate.py
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kdtune.config import parse_recipe_args, read_settings
from kdtune.data import Message
from kdtune.data.datasets._load import load_rows
from kdtune.data.formats import detect_format, get_format, make_row_converter
from kdtune.errors import ConfigError, DataError
from kdtune.models.generation import generate
from kdtune.training import build_model, build_tokenizer, setup_runtime
from kdtune.training.settings import GenerateSettings, PromptSource

RECIPE_DISTRIBUTED = False
RECIPE_SETTINGS = "kdtune.training.settings.GenerateSettings"  # read by `kdtune validate`


def load_prompts(p: PromptSource, system_prompt: str | None) -> list[list[Message]]:
    """Each row as the conversation to continue: its messages up to (not including) the last assistant turn."""
    rows = load_rows(p.source, data_files=p.data_files, split=p.split)
    fmt = (
        detect_format(rows.column_names, p.column_map, kinds=("instruct", "chat"), source=p.source)
        if p.format == "auto"
        else get_format(p.format, key="prompts.format")
    )
    if fmt.kind == "text":
        raise ConfigError(f"prompts.format: {fmt.name!r} rows have no prompt to answer; use an instruction or chat set")
    to_messages = make_row_converter(fmt, column_map=p.column_map, new_system_prompt=system_prompt, source=p.source)
    conversations = []
    for index, row in enumerate(rows):
        if p.max_prompts is not None and len(conversations) >= p.max_prompts:
            break
        messages = to_messages(row, index)
        last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=len(messages))
        prompt = messages[:last_assistant]
        if prompt and prompt[-1].role != "assistant":
            conversations.append(prompt)
    if not conversations:
        raise DataError(f"prompts: no usable prompt in {p.source!r} split {p.split!r}")
    return conversations


def generate_data(cfg: DictConfig) -> dict[str, Any]:
    """Generate (and optionally push) the dataset configured by ``cfg``; returns the run summary."""
    s = read_settings(GenerateSettings, cfg)
    if s.num_generations > 1 and s.temperature == 0.0:
        raise ConfigError("num_generations > 1 with temperature=0 gives identical copies; set temperature (e.g. 0.7)")
    rt = setup_runtime(s.device, s.dtype, s.output_dir, s.seed, cfg=cfg)
    tokenizer = build_tokenizer(s.tokenizer)
    model, _ = build_model(s.model, s.checkpointer, rt)
    model.eval()
    output = Path(s.output_file or rt.output_dir / "generated.jsonl")
    partial = output.with_name(output.name + ".partial")

    conversations = load_prompts(s.prompts, s.system_prompt)
    encoded = [
        tokenizer.tokenize_messages(c, add_eos=False, add_generation_prompt=True, truncate_to_max_seq_len=False)[0]
        for c in conversations
    ]
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= s.max_prompt_tokens]
    print(
        f"{len(keep)} prompts to answer ({len(encoded) - len(keep)} longer than {s.max_prompt_tokens} tokens skipped)"
    )

    progress_file = partial.with_suffix(".progress")
    done_batches, written, unfinished = 0, 0, 0
    if s.resume_from_checkpoint and partial.exists():
        progress = json.loads(progress_file.read_text())
        done_batches = int(progress["batches"])
        written, unfinished = int(progress.get("written", 0)), int(progress.get("unfinished", 0))
        print(f"resuming after {done_batches} finished batches of {partial}")
    elif partial.exists():
        partial.unlink()
    rt.save_config()  # everything built and checked: this run's config.yaml replaces the previous one
    generator = torch.Generator(device=rt.device).manual_seed(s.seed)
    stop_ids = list(tokenizer.stop_ids)
    started = time.monotonic()
    batches = [keep[i : i + s.batch_size] for i in range(0, len(keep), s.batch_size)]
    with open(partial, "a", encoding="utf-8") as out:
        for batch_index, batch in enumerate(batches):
            # each batch draws from a generator seeded by (seed, batch): resuming gives the same completions
            generator.manual_seed(s.seed * 1_000_003 + batch_index)
            if batch_index < done_batches:
                continue
            prompts = [encoded[i] for i in batch for _ in range(s.num_generations)]
            with torch.no_grad():
                completions = generate(
                    model, prompts, s.max_new_tokens, eos_ids=stop_ids, pad_id=tokenizer.pad_id,
                    temperature=s.temperature, top_k=s.top_k, generator=generator,
                )  # fmt: skip
            for k, ids in enumerate(completions):
                finished = bool(ids) and ids[-1] in stop_ids
                if not finished:
                    unfinished += 1
                    if not s.keep_unfinished:
                        continue
                conversation = conversations[batch[k // s.num_generations]]
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                record = {
                    "messages": [{"role": m.role, "content": m.content} for m in conversation]
                    + [{"role": "assistant", "content": text}],
                    "prompt": conversation[-1].content,
                    "completion": text,
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            out.flush()
            os.fsync(out.fileno())
            progress_file.write_text(
                json.dumps({"batches": batch_index + 1, "written": written, "unfinished": unfinished})
            )
            print(f"batch {batch_index + 1}/{len(batches)}: {written} written, {time.monotonic() - started:.0f} s")
    os.replace(partial, output)
    progress_file.unlink(missing_ok=True)
    summary: dict[str, Any] = {
        "output_file": str(output),
        "prompts": len(encoded),
        "prompts_over_max_prompt_tokens": len(encoded) - len(keep),
        "max_prompt_tokens": s.max_prompt_tokens,
        "completions": len(keep) * s.num_generations,
        # completions that hit max_new_tokens without a stop token: dropped, or kept with keep_unfinished=true
        "unfinished_completions": unfinished,
        "unfinished_dropped": unfinished if not s.keep_unfinished else 0,
        "pairs_written": written,
        "pushed_to": None,
    }
    if s.push_to_hub:
        from kdtune.data.hub import push_file_to_hub

        summary["pushed_to"] = s.push_to_hub
        summary["commit_url"] = push_file_to_hub(output, s.push_to_hub, private=s.hub_private)
    (rt.output_dir / "generation_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"wrote {output}: {written} pairs from {len(keep)} of {len(encoded)} prompts; filtered: "
        f"{summary['prompts_over_max_prompt_tokens']} prompts over max_prompt_tokens={s.max_prompt_tokens}, "
        f"{summary['unfinished_dropped']} unfinished completions (hit max_new_tokens={s.max_new_tokens}) dropped"
        + (f"; pushed to the Hub dataset {s.push_to_hub}" if s.push_to_hub else "")
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``--config <name|path> [overrides...]``."""
    generate_data(parse_recipe_args(argv, settings=GenerateSettings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
