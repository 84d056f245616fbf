"""``kdtune upload`` against the local stand-in for the Hub: success (new and existing repos, branch, dataset), and
one line for each failure (no token, 401, 403, connection refused); the token is never printed or written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DRIVER = r"""
import contextlib, io, json, os, sys
from kdtune.cli.main import main
results = []
for case in json.loads(sys.argv[1]):
    env = case.get("env", {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["upload", *case["args"]])
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print("RESULTS " + json.dumps(results))
"""


def run_cases(endpoint: str, home: Path, cases: list[dict]) -> list[dict]:
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "KDTUNE_DEBUG": "0",
    }
    env.pop("HF_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.split("RESULTS ", 1)[1])


def _folder(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    files = {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}\n',
        "model.safetensors": bytes(range(256)) * 3,
        "README.md": b"---\nlibrary_name: kdtune\n---\n# card\n",
        "sub/notes.txt": b"nested\n",
    }
    d = tmp_path / "final"
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    (d / ".cache").mkdir()
    (d / ".cache" / "junk").write_bytes(b"x")  # never uploaded
    return d, files


def test_upload_success(fake_hub, tmp_path: Path) -> None:
    folder, files = _folder(tmp_path)
    good = fake_hub.good_token
    cases = [
        {"args": [str(folder), "me/new-model", "--hf-token", good, "--private"]},
        {"args": [str(folder), "kd-org/tiny-llama", "--revision", "kd-run-1"], "env": {"HF_TOKEN": good}},
        {"args": [str(folder), "me/kd-data", "--repo-type", "dataset", "--hf-token", good]},
    ]
    results = run_cases(fake_hub, tmp_path / "hf_home", cases)
    for r in results:
        assert r["code"] == 0, r
        assert good not in r["out"] + r["err"]
    assert "uploaded 4 files" in results[0]["out"] and "me/new-model" in results[0]["out"]
    # a new private repo, an existing repo (409 on create is fine) on a new branch, a dataset repo
    assert fake_hub.created[("model", "me/new-model")]["private"] is True
    assert ("model", "kd-org/tiny-llama") not in fake_hub.created or "branches" in fake_hub.created[
        ("model", "kd-org/tiny-llama")
    ]
    assert "kd-run-1" in fake_hub.created[("model", "kd-org/tiny-llama")]["branches"]
    assert ("dataset", "me/kd-data") in fake_hub.created
    commits = {(c["type"], c["repo"]): c for c in fake_hub.commits}
    assert commits[("model", "me/new-model")]["revision"] == "main"
    assert commits[("model", "kd-org/tiny-llama")]["revision"] == "kd-run-1"
    for c in commits.values():
        assert c["files"] == files  # every file, byte-identical, nothing from .cache/
    for path in tmp_path.rglob("*"):  # the token is written nowhere
        if path.is_file():
            assert good.encode() not in path.read_bytes(), path


def test_upload_errors(fake_hub, closed_port_url, tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path)
    cases = [
        {"args": [str(folder), "me/new-model"]},  # no token at all
        {"args": [str(folder), "me/new-model", "--hf-token", "hf_revokedToken42"]},
        {"args": [str(folder), "me/new-model", "--hf-token", fake_hub.no_access_token]},
        {"args": [str(folder), "kd-org/tiny-llama", "--hf-token", fake_hub.no_access_token]},  # exists, read-only
        {"args": [str(tmp_path / "nope"), "me/new-model", "--hf-token", fake_hub.good_token]},
    ]
    results = run_cases(fake_hub, tmp_path / "hf_home", cases)
    expected = [
        "kdtune: error: uploading to me/new-model needs a Hugging Face token",
        "kdtune: error: the Hugging Face token was rejected (HTTP 401)",
        "kdtune: error: no write access to me/new-model (HTTP 403)",
        "kdtune: error: no write access to kd-org/tiny-llama (HTTP 403)",
        "is not a directory",
    ]
    for r, message in zip(results, expected, strict=True):
        assert r["code"] == 1, r
        lines = r["err"].strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r
        assert "hf_revokedToken42" not in r["err"] and fake_hub.no_access_token not in r["err"]
    assert not fake_hub.commits
    refused = run_cases(
        closed_port_url, tmp_path / "hf_home", [{"args": [str(folder), "me/m", "--hf-token", fake_hub.good_token]}]
    )
    assert refused[0]["code"] == 1
    line = refused[0]["err"].strip()
    assert "\n" not in line and "cannot reach the Hugging Face Hub" in line
    assert fake_hub.good_token not in line
