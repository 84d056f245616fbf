"""`kdtune make-tiny` writes what configs/tiny/* read, and `kdtune run ... --config tiny/kd` works right after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from kdtune.testing.tiny import TINY_CONFIG_KEYS

ROOT = Path(__file__).resolve().parents[2]


def test_make_tiny_then_run_kd(tmp_path: Path, capsys, monkeypatch) -> None:
    tokenizers = pytest.importorskip("tokenizers")  # test-only reference
    from kdtune.cli.main import main

    monkeypatch.setenv("KDTUNE_DEBUG", "0")
    d = tmp_path / "tiny"
    assert main(["make-tiny", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    overrides = out.split("--config tiny/kd", 1)[1].split()
    assert [o.split("=", 1)[0] for o in overrides] == [*TINY_CONFIG_KEYS, "output_dir"]

    rows = [json.loads(line) for line in (d / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 72 and all(r["messages"][1]["role"] == "assistant" for r in rows)
    for name in ("student", "teacher"):
        cfg = json.loads((d / name / "config.json").read_text())
        ref = tokenizers.Tokenizer.from_file(str(d / name / "tokenizer.json"))
        # every id the tokenizer can emit has an embedding row (the old header made 515 tokens for a 512-row model)
        assert ref.get_vocab_size(with_added_tokens=True) <= cfg["vocab_size"]
        with safe_open(str(d / name / "model.safetensors"), "pt") as f:
            assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == cfg["vocab_size"]
        text = "\n".join(m["content"] for r in rows for m in r["messages"])
        assert max(ref.encode(text).ids) < cfg["vocab_size"]

    # a second make-tiny gives the same files
    before = {p.name: p.read_bytes() for p in (d / "student").iterdir()}
    assert main(["make-tiny", "--dir", str(d)]) == 0
    assert {p.name: p.read_bytes() for p in (d / "student").iterdir()} == before

    run = ["run", "knowledge_distillation_single_device", "--config", "tiny/kd", *overrides, "max_steps=2"]
    run += ["eval_every_n_steps=null", "save_every_n_steps=null"]
    monkeypatch.delenv("KDTUNE_RECIPES_DIR", raising=False)
    monkeypatch.delenv("KDTUNE_CONFIGS_DIR", raising=False)
    assert main(run) == 0, capsys.readouterr().err
    assert (d / "runs" / "kd" / "final" / "model.safetensors").is_file()
