"""``kdtune download`` against a local stand-in for the Hub (``HF_ENDPOINT``): success, patterns, every error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs several `kdtune download` invocations in ONE fresh interpreter (huggingface_hub reads HF_ENDPOINT at import),
# each through the real CLI entry point, and reports exit code, stdout and stderr of each as JSON.
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
        code = main(["download", *case["args"]])
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print("RESULTS " + json.dumps(results))
"""


def run_cases(endpoint: str, home: Path, cases: list[dict], offline: str = "0") -> list[dict]:
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": offline,
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


def repo_files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts}


def test_download_success_patterns_and_tokens(fake_hub, tmp_path: Path) -> None:
    FILES, GOOD_TOKEN, SHA_MAIN, SHA_V1 = fake_hub.files, fake_hub.good_token, fake_hub.sha_main, fake_hub.sha_v1
    out = tmp_path / "out"
    cases = [
        {"args": ["kd-org/tiny-llama", "--output-dir", str(out / "a"), "--ignore-patterns", "original/*", "*.md"]},
        {
            "args": [
                "kd-org/tiny-llama",
                "--output-dir",
                str(out / "b"),
                "--revision",
                "v1",
                "--allow-patterns",
                "*.json",
            ]
        },
        {"args": ["kd-org/gated-llama", "--output-dir", str(out / "c"), "--hf-token", GOOD_TOKEN]},
        {"args": ["kd-org/gated-llama", "--output-dir", str(out / "d")], "env": {"HF_TOKEN": GOOD_TOKEN}},
    ]
    results = run_cases(fake_hub, tmp_path / "hf_home", cases)
    for r in results:
        assert r["code"] == 0, r
    # ignore patterns; files are byte-identical; the source is recorded
    a = out / "a"
    assert repo_files(a) == {"config.json", "model.safetensors", "tokenizer.json", "kdtune_source.json"}
    assert all((a / name).read_bytes() == FILES[name] for name in ("config.json", "model.safetensors"))
    assert json.loads((a / "kdtune_source.json").read_text()) == {
        "repo_id": "kd-org/tiny-llama",
        "repo_type": "model",
        "revision": "main",
        "commit": SHA_MAIN,
    }
    assert str(a) in results[0]["out"]
    # allow patterns and a tag revision
    b = out / "b"
    assert repo_files(b) == {"config.json", "tokenizer.json", "kdtune_source.json"}
    assert json.loads((b / "kdtune_source.json").read_text())["commit"] == SHA_V1
    assert json.loads((b / "kdtune_source.json").read_text())["revision"] == "v1"
    # gated repo with a token from the flag and from HF_TOKEN: everything downloaded, including the nested file
    for name in ("c", "d"):
        assert repo_files(out / name) == {*FILES, "kdtune_source.json"}
    assert any(tok == GOOD_TOKEN for _, _, tok in fake_hub.requests)  # the token was sent to the Hub...
    for r in results:  # ...but never printed
        assert GOOD_TOKEN not in r["out"] + r["err"]
    # offline (HF_HUB_OFFLINE=1): the existing directory is reused and the recorded commit kept
    again = run_cases(fake_hub, tmp_path / "hf_home", [cases[0]], offline="1")
    assert again[0]["code"] == 0, again
    assert json.loads((a / "kdtune_source.json").read_text())["commit"] == SHA_MAIN
    for path in out.rglob("*"):  # ...nor written anywhere
        if path.is_file():
            assert GOOD_TOKEN.encode() not in path.read_bytes(), path


def test_download_errors(fake_hub, closed_port_url, tmp_path: Path) -> None:
    NO_ACCESS_TOKEN = fake_hub.no_access_token
    out = tmp_path / "out"
    cases = [
        {"args": ["kd-org/gated-llama", "--output-dir", str(out / "1")]},
        {"args": ["kd-org/gated-llama", "--output-dir", str(out / "2"), "--hf-token", NO_ACCESS_TOKEN]},
        {"args": ["kd-org/tiny-llama", "--output-dir", str(out / "3"), "--hf-token", "hf_revokedToken42"]},
        {"args": ["kd-org/missing", "--output-dir", str(out / "4")]},
        {"args": ["kd-org/tiny-llama", "--output-dir", str(out / "5"), "--revision", "no-such-branch"]},
    ]
    results = run_cases(fake_hub, tmp_path / "hf_home", cases)
    expected = [
        "kd-org/gated-llama is a gated repo and this token has no access: accept its terms at",
        "kd-org/gated-llama is a gated repo and this token has no access",
        "the Hugging Face token was rejected (HTTP 401)",
        "repository kd-org/missing not found at",
        "revision 'no-such-branch' not found in kd-org/tiny-llama",
    ]
    for r, message in zip(results, expected, strict=True):
        assert r["code"] == 1, r
        lines = r["err"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdtune: error: ") and message in lines[0], r
        assert NO_ACCESS_TOKEN not in r["err"] and "hf_revokedToken42" not in r["err"]
    # no network: connection refused, then offline mode with nothing cached
    refused = run_cases(
        closed_port_url, tmp_path / "hf_home", [{"args": ["kd-org/tiny-llama", "--output-dir", str(out / "6")]}]
    )
    line = refused[0]["err"].strip()
    assert refused[0]["code"] == 1 and "\n" not in line
    assert "cannot reach the Hugging Face Hub" in line and "HF_HUB_OFFLINE=1" in line
    offline = run_cases(
        closed_port_url,
        tmp_path / "hf_home",
        [{"args": ["kd-org/tiny-llama", "--output-dir", str(out / "7")]}],
        offline="1",
    )
    assert offline[0]["code"] == 1 and "HF_HUB_OFFLINE is set" in offline[0]["err"]


def test_failed_download_leaves_no_empty_directory(fake_hub, closed_port_url, tmp_path: Path) -> None:
    out = tmp_path / "out"
    existing = tmp_path / "existing"
    existing.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        {"args": ["kd-org/gated-llama", "--output-dir", str(out / "a" / "b")]},  # fails after the directory is made
        {"args": ["kd-org/gated-llama", "--output-dir", str(existing)]},  # the user's directory is kept
        {"args": ["kd-org/tiny-llama", "--output-dir", str(a_file)]},
        {"args": ["kd-org/tiny-llama", "--output-dir", str(a_file / "sub")]},
    ]
    results = run_cases(fake_hub, tmp_path / "hf_home", cases)
    assert all(r["code"] == 1 and len(r["err"].strip().splitlines()) == 1 for r in results), results
    assert not out.exists()
    assert existing.is_dir() and repo_files(existing) == set()
    assert f"--output-dir '{a_file}' is a file, not a directory" in results[2]["err"]
    assert f"cannot create --output-dir '{a_file / 'sub'}': {a_file} is a file" in results[3]["err"]
    assert a_file.read_text() == "x"
    refused = run_cases(
        closed_port_url, tmp_path / "hf_home", [{"args": ["kd-org/tiny-llama", "--output-dir", str(out)]}]
    )
    assert refused[0]["code"] == 1 and not out.exists()
