"""Hand-off files of a run's final/: the chat template it trained with (checked with `transformers`' own
``apply_chat_template`` against the ids the recipe trained on) and the generated model card (YAML metadata)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import yaml

from kdtune import __version__

transformers = pytest.importorskip("transformers")


def _front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_kd_final_has_training_chat_template_and_model_card(tiny, tiny_cfg, recipe, tmp_path: Path) -> None:
    from kdtune.data import load_hf_tokenizer, sft_dataset

    student = tmp_path / "student"  # a base model with its own README and licence, as downloaded
    shutil.copytree(tiny["student"], student)
    (student / "README.md").write_text("---\nlicense: apache-2.0\n---\n# The base model's card\n")
    (student / "LICENSE").write_text("licence text")
    out = tmp_path / "kd"
    summary = recipe("knowledge_distillation_single_device").train(
        tiny_cfg("kd", out, "max_steps=2", f"checkpointer.checkpoint_dir={student}")
    )
    final = out / "final"
    # chat template: transformers formats the training data exactly as the run tokenized it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoTokenizer.from_pretrained(str(final))
    assert (final / "chat_template.jinja").read_text() == json.loads((final / "tokenizer_config.json").read_text())[
        "chat_template"
    ]
    tok = load_hf_tokenizer(student, max_seq_len=128)
    data = sft_dataset(tok, "json", data_files=str(tiny["data"]))
    rows = [json.loads(line) for line in tiny["data"].read_text().splitlines()[:5]]
    for i, row in enumerate(rows):
        ids = ref.apply_chat_template(row["messages"], tokenize=True)
        ids = list(ids) if isinstance(ids, list) else list(ids["input_ids"])
        assert ids == list(data[i]["tokens"]), i
    # model card: YAML metadata with the run's facts; the base README replaced, its licence kept
    meta = _front_matter(final / "README.md")
    run = meta["kdtune"]
    assert meta["library_name"] == "kdtune" and meta["license"] == "apache-2.0"
    assert "base_model" not in meta  # a local path is no Hub repo id
    assert run["base_model"] == str(student) and run["teacher"] == str(tiny["teacher"])
    assert run["datasets"] == [str(tiny["data"])] and run["loss"] == "ForwardKLLoss"
    assert run["kd_ratio"] == 0.5 and run["temperature"] == 1.0 and run["steps"] == 2
    assert run["version"] == __version__ and run["command"]
    assert run["metrics"]["val_loss"] == pytest.approx(summary.evals[-1]["val_loss"])
    assert run["metrics"]["train_loss"] == pytest.approx(summary.steps[-1]["loss"])
    assert "The base model's card" not in (final / "README.md").read_text()
    assert (final / "LICENSE").read_text() == "licence text"


def test_sft_card_and_hub_ids(tiny, tiny_cfg, recipe, tmp_path: Path) -> None:
    student = tmp_path / "student"
    shutil.copytree(tiny["student"], student)
    (student / "kdtune_source.json").write_text(json.dumps({"repo_id": "Qwen/Qwen2-0.5B-Instruct"}))
    out = tmp_path / "lora"
    recipe("lora_finetune_single_device").train(
        tiny_cfg("lora", out, "max_steps=1", f"checkpointer.checkpoint_dir={student}", "val_split_ratio=0.0")
    )
    meta = _front_matter(out / "final" / "README.md")
    assert meta["base_model"] == "Qwen/Qwen2-0.5B-Instruct" and "fine-tuned" in meta["tags"]
    assert meta["kdtune"]["loss"] == "cross_entropy" and "teacher" not in meta["kdtune"]
    assert "kd_ratio" not in meta["kdtune"] and meta["kdtune"]["steps"] == 1
    assert (out / "final" / "chat_template.jinja").is_file()


def test_command_recorded_as_typed_by_kdtune_run(tiny, overrides, tmp_path: Path) -> None:
    from kdtune.cli.main import main
    from kdtune.handoff import COMMAND_ENV

    out = tmp_path / "full"
    argv = ["run", "full_finetune_single_device", "--config", "tiny/full", *overrides(out, None), "max_steps=1"]
    assert main(argv) == 0
    meta = _front_matter(out / "final" / "README.md")
    assert meta["kdtune"]["command"] == "kdtune " + " ".join(argv)
    assert COMMAND_ENV not in os.environ


def test_llama2_format_skips_the_template_with_a_warning(tiny, caplog, tmp_path: Path) -> None:
    from kdtune.handoff import RunCard, write_handoff

    class Llama2Like:  # a tokenizer whose builtin chat format has no jinja form
        chat_template = None
        name_or_path = "llama2"

        class chat_format:  # noqa: N801
            name = "llama2"

    final = tmp_path / "final"
    final.mkdir()
    with caplog.at_level("WARNING", logger="kdtune"):
        written = write_handoff(final, Llama2Like(), RunCard(base_model="meta-llama/Llama-2-7b-hf", steps=3))
    assert [p.name for p in written] == ["README.md"] and "no chat template written" in caplog.text
    assert not (final / "chat_template.jinja").exists()
