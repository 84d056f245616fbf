"""The hand-run KD benchmark stays runnable: one tiny step and a tiny loss-memory probe, in-process."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "kd_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kd_throughput", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_and_loss_probe_tiny(bench):
    args = bench.parse_args(
        [
            "--vocab",
            "128",
            "--seq-len",
            "16",
            "--student-dim",
            "32",
            "--student-layers",
            "1",
            "--teacher-dim",
            "64",
            "--teacher-layers",
            "1",
            "--steps",
            "1",
            "--warmup-steps",
            "0",
            "--loss-vocab",
            "256",
            "--loss-tokens",
            "32",
            "--loss-hidden",
            "16",
            "--num-output-chunks",
            "4",
        ]
    )
    out = bench.bench_train(args)
    assert out["tokens_per_second"] > 0 and out["vocab"] == 128 and out["teacher_params_M"] > out["student_params_M"]
    a, b = bench.loss_probe(args, "unchunked"), bench.loss_probe(args, "chunked")
    assert a["loss_per_token"] == pytest.approx(b["loss_per_token"], rel=1e-5)


def test_named_builders_lora_and_mfu(bench, monkeypatch):
    # the GPU check's path (named builders through build_model, a LoRA student, counted FLOPs) on tiny Llamas
    import kdtune.models.llama as family
    from kdtune.models._builders import apply_lora_if_requested

    def tiny(dim: int = 32):
        return family.llama(
            vocab_size=128, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=dim, intermediate_dim=64
        )

    def lora_tiny(**lora):
        return apply_lora_if_requested(tiny(), lora)

    monkeypatch.setattr(family, "tiny_student", tiny, raising=False)
    monkeypatch.setattr(family, "lora_tiny_student", lora_tiny, raising=False)
    monkeypatch.setattr(family, "tiny_teacher", lambda: tiny(64), raising=False)
    args = bench.parse_args(
        ["--student-model", "kdtune.models.llama.tiny_student", "--teacher-model", "kdtune.models.llama.tiny_teacher",
         "--lora-rank", "4", "--mfu", "--seq-len", "16", "--steps", "1", "--warmup-steps", "0", "--num-output-chunks", "0"]
    )  # fmt: skip
    out = bench.bench_train(args)
    assert out["vocab"] == 128 and out["lora_rank"] == 4 and out["tokens_per_second"] > 0
    assert out["flops_per_step"] > 0 and 0 < out["mfu_vs_measured_peak"] < 1
