"""``kdtune.handoff.write_model_card``: YAML metadata the Hub reads, the run described, licence kept."""

from __future__ import annotations

import json

import yaml

from kdtune import __version__
from kdtune.handoff import base_model_id, write_model_card


def test_model_card_replaces_base_readme_and_keeps_licence(tmp_path) -> None:
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "README.md").write_text("---\nlicense: llama3.2\nextra_gated_prompt: accept\n---\n# Base model card\n")
    (final / "LICENSE.txt").write_text("licence text")
    (final / "USE_POLICY.md").write_text("policy")
    command = ["kdtune", "run", "knowledge_distillation_single_device", "--config", "llama3_2/kd", "kd_ratio=0.25"]
    path = write_model_card(
        final, base_model="meta-llama/Llama-3.2-1B-Instruct", teacher="/tmp/teacher/final",
        datasets=["yahma/alpaca-cleaned"], loss="ForwardKLLoss", kd_ratio=0.25, temperature=2.0, steps=1200,
        metrics={"val_loss": 1.2345678, "val_kd_loss": 0.5}, command=command,
    )  # fmt: skip
    text = path.read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert meta["datasets"] == ["yahma/alpaca-cleaned"]
    assert meta["library_name"] == "kdtune" and meta["license"] == "llama3.2"
    assert "knowledge-distillation" in meta["tags"] and "extra_gated_prompt" not in meta
    assert "# Base model card" not in text
    for needle in ("/tmp/teacher/final", "ForwardKLLoss", "`0.25`", "`2`", "`1200`", "1.235", __version__,
                   "kdtune run knowledge_distillation_single_device --config llama3_2/kd kd_ratio=0.25",
                   "LICENSE.txt, USE_POLICY.md"):  # fmt: skip
        assert needle in text, needle
    assert (final / "LICENSE.txt").read_text() == "licence text" and (final / "USE_POLICY.md").is_file()


def test_model_card_without_teacher_and_base_model_id(tmp_path) -> None:
    src = tmp_path / "base"
    src.mkdir()
    (src / "kdtune_source.json").write_text(json.dumps({"repo_id": "Qwen/Qwen2-0.5B-Instruct", "commit": "a" * 40}))
    assert base_model_id(src) == "Qwen/Qwen2-0.5B-Instruct" and base_model_id(tmp_path) is None
    path = write_model_card(tmp_path / "out", base_model=base_model_id(src), license="apache-2.0", tags=["sft"])
    meta = yaml.safe_load(path.read_text().split("---\n")[1])
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["kdtune", "fine-tuned", "sft"]
    assert "teacher" not in path.read_text().split("## Training")[1].split("##")[0]
