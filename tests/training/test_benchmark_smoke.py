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
