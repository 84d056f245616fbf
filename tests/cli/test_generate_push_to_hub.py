"""``generate_distillation_data push_to_hub=...`` against the local Hub stand-in: the file lands in a (private) dataset
repo byte for byte, the run summary counts what was filtered, the token is never printed or written, and each upload
failure is one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.models import make_tiny_hf_checkpoint
    from kdtune.testing.tokenizers import write_bpe_tokenizer

    root = tmp_path_factory.mktemp("teacher")
    tok = write_bpe_tokenizer(root / "tok", style="qwen2")
    vocab = load_hf_tokenizer(tok).vocab_size
    model_dir = make_tiny_hf_checkpoint(root / "model", family="qwen2", vocab_size=vocab, dim=32, layers=2, tie=True)
    for f in tok.iterdir():
        shutil.copy2(f, model_dir / f.name)
    return model_dir


def _prompts(path: Path) -> Path:
    rows = [{"source": f"say something about {i}", "target": "x"} for i in range(3)]
    rows += [{"source": "a very long prompt " * 40, "target": "x"} for _ in range(2)]  # over max_prompt_tokens
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(hub: str, tmp: Path, teacher: Path, out: Path, token: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub,
        "HF_HOME": str(tmp / "hf_home"),  # no saved login
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HF_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    args = [
        "generate_distillation_data",
        "--config",
        "llama3_1/8B_generate_distillation_data",
        "model._component_=kdtune.models.hf_model",
        f"+model.checkpoint_dir={teacher}",
        f"checkpointer.checkpoint_dir={teacher}",
        f"tokenizer.checkpoint_dir={teacher}",
        "prompts.source=json",
        f"prompts.data_files={_prompts(tmp / 'prompts.jsonl')}",
        "prompts.split=train",
        "prompts.format=auto",
        f"output_dir={out}",
        "max_prompt_tokens=100",
        "max_new_tokens=4",
        "batch_size=2",
        "device=cpu",
        "dtype=fp32",
        *extra,
    ]
    cmd = [sys.executable, "-m", "kdtune", "run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp)


def _no_token_anywhere(token: str, proc: subprocess.CompletedProcess, out: Path) -> None:
    assert token not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_push_to_hub_uploads_the_file_and_reports_what_was_filtered(fake_hub, teacher_dir, tmp_path: Path) -> None:
    # without keep_unfinished: completions cut at max_new_tokens are dropped and counted
    out = tmp_path / "dropped"
    proc = _run(fake_hub, tmp_path, teacher_dir, out, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "generation_summary.json").read_text())
    assert summary["prompts"] == 5 and summary["prompts_over_max_prompt_tokens"] == 2
    assert summary["completions"] == 3 and summary["unfinished_dropped"] == summary["unfinished_completions"]
    assert summary["pairs_written"] + summary["unfinished_dropped"] == 3 and summary["pushed_to"] is None
    assert "2 prompts over max_prompt_tokens=100" in proc.stdout
    assert f"{summary['unfinished_dropped']} unfinished completions" in proc.stdout
    assert not fake_hub.requests  # nothing was sent to the Hub

    # kept and pushed to a private dataset repo
    token = fake_hub.good_token
    out = tmp_path / "pushed"
    proc = _run(fake_hub, tmp_path, teacher_dir, out, token, "keep_unfinished=true", "push_to_hub=kd-org/gen-data",
                "hub_private=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = out / "ultrachat_llama3_1_8b.jsonl"
    assert len(local.read_text().splitlines()) == 3
    repo = fake_hub.uploads[("dataset", "kd-org/gen-data")]
    assert repo["private"] is True
    assert repo["files"] == {"ultrachat_llama3_1_8b.jsonl": local.read_bytes()}
    summary = json.loads((out / "generation_summary.json").read_text())
    assert summary["pushed_to"] == "kd-org/gen-data" and summary["pairs_written"] == 3
    assert summary["unfinished_dropped"] == 0
    assert "pushed to the Hub dataset kd-org/gen-data" in proc.stdout
    assert any(tok == token for _, _, tok in fake_hub.requests)  # sent to the Hub...
    _no_token_anywhere(token, proc, out)  # ...never printed nor written

    # pushing again to the existing repo (a new commit) works too
    proc = _run(fake_hub, tmp_path, teacher_dir, tmp_path / "again", token, "keep_unfinished=true",
                "push_to_hub=kd-org/gen-data")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "token,message",
    [
        (None, "push_to_hub: no Hugging Face token was found (HTTP 401)"),
        ("hf_revokedToken42", "push_to_hub: the Hugging Face token was rejected (HTTP 401)"),
        ("no_access", "push_to_hub: the token may not write to kd-org/gen-data (HTTP 403)"),
    ],
)
def test_push_to_hub_failures_are_one_line_without_the_token(
    fake_hub, teacher_dir, tmp_path: Path, token: str | None, message: str
) -> None:
    token = fake_hub.no_access_token if token == "no_access" else token
    out = tmp_path / "out"
    proc = _run(fake_hub, tmp_path, teacher_dir, out, token, "keep_unfinished=true", "push_to_hub=kd-org/gen-data")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("kdtune: error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (out / "ultrachat_llama3_1_8b.jsonl").is_file()  # the local file is kept
    if token:
        _no_token_anywhere(token, proc, out)
