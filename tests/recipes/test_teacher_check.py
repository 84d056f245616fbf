"""The teacher check before KD training: teacher vs student loss and next-token accuracy on the transfer set, a
warning when the teacher is not better; its numbers checked against `transformers`' own logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

KD = "knowledge_distillation_single_device"


@pytest.fixture(scope="module")
def trained(tiny, recipe, tmp_path_factory) -> dict[str, Path]:
    """Teacher and student fine-tuned on the chat data for a few steps (their final/ dirs)."""
    from kdtune.config import apply_overrides, load_config

    root = tmp_path_factory.mktemp("trained")
    out = {}
    for name in ("teacher", "student"):
        cfg = apply_overrides(
            load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny" / "full.yaml"),
            [f"output_dir={root / name}", f"checkpointer.checkpoint_dir={tiny[name]}",
             f"dataset.data_files={tiny['data']}", "max_steps=8", "optimizer.lr=1e-2", "val_split_ratio=0.0",
             "save_every_n_steps=null"],
        )  # fmt: skip
        recipe("full_finetune_single_device").train(cfg)
        out[name] = root / name / "final"
    return out


def _logged(out: Path) -> dict:
    rows = [json.loads(line) for f in sorted((out / "logs").glob("*.jsonl")) for line in f.read_text().splitlines()]
    return next(r for r in rows if "teacher_check/teacher_loss" in r)


def test_trained_teacher_passes(trained, tiny_cfg, recipe, tmp_path: Path, capsys) -> None:
    out = tmp_path / "kd"
    recipe(KD).train(tiny_cfg("kd", out, "max_steps=1", f"teacher_checkpointer.checkpoint_dir={trained['teacher']}"))
    captured = capsys.readouterr()
    assert "teacher check on" in captured.out and "validation tokens" in captured.out
    assert "not better" not in captured.err
    row = _logged(out)
    assert row["step"] == 0 and row["teacher_check/teacher_loss"] < row["teacher_check/student_loss"]
    assert row["teacher_check/teacher_accuracy"] > row["teacher_check/student_accuracy"]


def test_random_teacher_warns(trained, tiny_cfg, recipe, tmp_path: Path, capsys) -> None:
    """An un-fine-tuned (random) teacher for a student that already knows the task: the warning line."""
    out = tmp_path / "kd"
    recipe(KD).train(
        tiny_cfg("kd", out, "max_steps=1", "val_split_ratio=0.0", f"checkpointer.checkpoint_dir={trained['student']}")
    )
    captured = capsys.readouterr()
    assert "training tokens" in captured.out  # no validation split: the first training batches
    assert "kdtune: warning: the teacher is not better than the student" in captured.err
    assert "+teacher_check=false" in captured.err


def test_teacher_check_can_be_turned_off(tiny_cfg, recipe, tmp_path: Path, capsys) -> None:
    recipe(KD).train(tiny_cfg("kd", tmp_path / "kd", "max_steps=1", "+teacher_check=false"))
    assert "teacher check" not in capsys.readouterr().out


def test_teacher_check_does_not_change_training(tiny_cfg, recipe, tmp_path: Path) -> None:
    runs = [
        recipe(KD).train(tiny_cfg("kd", tmp_path / str(flag), "max_steps=2", f"+teacher_check={flag}"))
        for flag in ("true", "false")
    ]
    assert [s["loss"] for s in runs[0].steps] == [s["loss"] for s in runs[1].steps]
    assert runs[0].evals == runs[1].evals


def test_loss_and_accuracy_match_transformers(trained, tiny, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from kdtune.data import load_hf_tokenizer, padded_collate, sft_dataset
    from kdtune.models import load_hf_model
    from kdtune.training.evaluation import loss_and_accuracy

    tok = load_hf_tokenizer(trained["teacher"], max_seq_len=128)
    ds = sft_dataset(tok, "json", data_files=str(tiny["data"]))
    batches = [padded_collate([ds[i] for i in range(j, j + 4)], pad_id=tok.pad_id) for j in (0, 4)]
    ours = loss_and_accuracy(load_hf_model(trained["teacher"]), batches, torch.device("cpu"), num_output_chunks=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(trained["teacher"]), torch_dtype=torch.float32).eval()
    ce = ok = n = 0.0
    with torch.no_grad():
        for b in batches:
            logits = hf(b["tokens"]).logits[:, :-1].double()  # right padding: the mask alone is enough
            tgt = b["labels"][:, 1:]
            mask = tgt != -100
            ce += F.cross_entropy(logits[mask], tgt[mask], reduction="sum").item()
            ok += (logits[mask].argmax(-1) == tgt[mask]).sum().item()
            n += mask.sum().item()
    assert ours[2].item() == n and ours[1].item() == ok
    assert ours[0].item() == pytest.approx(ce, rel=1e-5)
