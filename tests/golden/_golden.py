"""Golden per-step figures of the shipped tiny configs: the proof that a refactor changed no number.

``python tests/golden/_golden.py record`` (re)writes ``golden_single.json`` from the current code; the tests compare
every run with it. Each case runs a shipped ``configs/tiny`` config (plus overrides) on tiny models and data that
this module builds deterministically, on one thread, and records per optimizer step the loss, its parts, the gradient
norm and the token count, every validation pass, and checksums of the final weights.

Exactness: on the machine that recorded the file the figures are bit-identical (``KDTUNE_GOLDEN_EXACT=1`` checks
the SHA-256 of the final weights too); elsewhere (other CPU instruction sets reorder float sums) they agree to 1e-6.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
GOLDEN_SINGLE = Path(__file__).with_name("golden_single.json")
GOLDEN_DISTRIBUTED = Path(__file__).with_name("golden_distributed.json")
WORDS = ["red", "blue", "green", "cat", "dog", "bird", "one", "two", "three", "big", "small", "fast", "slow"]
STEP_KEYS = ("loss", "class_loss", "kd_loss", "grad_norm", "num_tokens", "lr")

KD = "knowledge_distillation_single_device"
LORA_STUDENT = ("+model.lora_attn_modules=[q_proj,v_proj]", "+model.lora_rank=8", "+model.lora_alpha=16")
#: name -> (recipe, configs/tiny/<kind>.yaml, teacher fixture or None, overrides)
SINGLE_CASES: dict[str, tuple[str, str, str | None, tuple[str, ...]]] = {
    "full": ("full_finetune_single_device", "full", None, ("max_steps=4",)),
    "lora": ("lora_finetune_single_device", "lora", None, ("max_steps=4",)),
    "kd": (KD, "kd", "teacher", ()),
    "kd_lora_student": (KD, "kd", "teacher", ("max_steps=4", *LORA_STUDENT)),
    "kd_reverse_T2": (KD, "kd", "teacher", ("max_steps=4", "kd_loss=kdtune.losses.ReverseKLLoss", "temperature=2.0")),
    "kd_jsd_packed_ac": (
        KD,
        "kd",
        "teacher",
        (
            "max_steps=3",
            "kd_loss=kdtune.losses.JSDLoss",
            "+kd_loss.beta=0.3",
            "temperature=1.5",
            "+dataset.packed=true",
            "batch_size=2",
            "enable_activation_checkpointing=true",
            "num_output_chunks=1",
        ),
    ),  # fmt: skip
    "kd_ratio0_padded_teacher": (KD, "kd", "teacher_padded", ("max_steps=3", "kd_ratio=0.0")),
    "kd_ratio1_symmetric": (
        KD,
        "kd",
        "teacher",
        ("max_steps=3", "kd_ratio=1.0", "kd_loss=kdtune.losses.SymmetricKLLoss"),
    ),
}


def _chats(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        out.append(
            {
                "messages": [
                    {"role": "user", "content": "reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return out


def make_fixtures(root: Path) -> dict[str, Path]:
    """Tiny qwen2-style student (dim 32, tied), teacher (dim 64), padded-vocab teacher, tokenizer and chat data."""
    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.models import make_tiny_hf_checkpoint
    from kdtune.testing.tokenizers import write_bpe_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    write_bpe_tokenizer(root / "tok", [json.dumps(e) for e in _chats(200, 1)] + WORDS, vocab_size=300, style="qwen2")
    vocab = load_hf_tokenizer(root / "tok").vocab_size
    dims = {"dim": 32, "layers": 2, "heads": 4, "kv_heads": 2}
    paths = {}
    for name, v, d, seed in (
        ("student", vocab, dims, 0),
        ("teacher", vocab, {**dims, "dim": 64}, 1),
        ("teacher_padded", vocab + 64, {**dims, "dim": 64}, 2),
    ):
        make_tiny_hf_checkpoint(root / name, family="qwen2", vocab_size=v, seed=seed, tie=name == "student", **d)
        for f in (root / "tok").iterdir():
            shutil.copy2(f, root / name / f.name)
        paths[name] = root / name
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in _chats(72, 0)) + "\n")
    paths["data"] = data
    return paths


def overrides(paths: dict[str, Path], out: Path, teacher: str | None) -> list[str]:
    ov = [f"output_dir={out}", f"checkpointer.checkpoint_dir={paths['student']}", f"dataset.data_files={paths['data']}"]
    if teacher is not None:
        ov.append(f"teacher_checkpointer.checkpoint_dir={paths[teacher]}")
    return ov


def weight_checksums(final_dir: Path) -> dict:
    """SHA-256 over every tensor's name and bytes (sorted), plus float64 sum / abs-sum / sum of squares."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(final_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    h = hashlib.sha256()
    total = abs_total = sq_total = 0.0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        t64 = t.double()
        total += float(t64.sum())
        abs_total += float(t64.abs().sum())
        sq_total += float((t64 * t64).sum())
    return {"sha256": h.hexdigest(), "sum": total, "abs_sum": abs_total, "sq_sum": sq_total}


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def summarise(steps: list[dict], evals: list[dict], out: Path) -> dict:
    """The recorded figures of one run."""
    final = out / "final" if (out / "final").is_dir() else out / "final_adapter"
    return {
        "steps": [{k: _clean(m.get(k)) for k in ("step", *STEP_KEYS)} for m in steps],
        "evals": [{k: _clean(v) for k, v in e.items()} for e in evals],
        "weights": weight_checksums(final),
    }


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"_golden_recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_single(case: str, paths: dict[str, Path], out: Path) -> dict:
    """Run one single-device case on one thread; returns its figures."""
    from kdtune.config import apply_overrides, load_config

    recipe, kind, teacher, extra = SINGLE_CASES[case]
    cfg = load_config(REPO / "configs" / "tiny" / f"{kind}.yaml")
    cfg = apply_overrides(cfg, [*overrides(paths, out, teacher), *extra, "progress_bar=false"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = _recipe(recipe).train(cfg)
    finally:
        torch.set_num_threads(threads)
    return summarise(summary.steps, summary.evals, out)


def assert_matches(got: dict, want: dict, where: str, *, exact: bool) -> None:
    """Every step, eval and weight figure of ``got`` equals ``want`` (bit-exact when ``exact``, else to 1e-6)."""

    def same(a, b) -> bool:
        if a is None or b is None or isinstance(a, str):
            return a == b
        return a == b if exact else math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)

    assert len(got["steps"]) == len(want["steps"]), f"{where}: {len(got['steps'])} steps, golden {len(want['steps'])}"
    for g, w in zip(got["steps"], want["steps"]):
        for k in w:
            assert same(g.get(k), w[k]), f"{where} step {w['step']} {k}: {g.get(k)!r} != golden {w[k]!r}"
    assert len(got["evals"]) == len(want["evals"]), f"{where}: evals differ"
    for g, w in zip(got["evals"], want["evals"]):
        for k in w:
            assert same(g.get(k), w[k]), f"{where} eval at step {w['step']} {k}: {g.get(k)!r} != golden {w[k]!r}"
    for k, w in want["weights"].items():
        if k == "sha256" and not exact:
            continue
        assert same(got["weights"][k], w), f"{where} final weights {k}: {got['weights'][k]!r} != golden {w!r}"


def record(root: Path) -> None:
    paths = make_fixtures(root / "fixtures")
    result = {case: run_single(case, paths, root / case) for case in SINGLE_CASES}
    GOLDEN_SINGLE.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_SINGLE} ({len(result)} cases)")


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python tests/golden/_golden.py record")
    with tempfile.TemporaryDirectory() as tmp:
        record(Path(tmp))
