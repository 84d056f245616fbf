"""kdtune.training.distributed under 2 gloo processes vs a single-process reference, plus in-process error checks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdtune.errors import ConfigError
from kdtune.training import distributed as D

REPO = Path(__file__).resolve().parents[2]


def _load_helpers():
    spec = importlib.util.spec_from_file_location("_kdtune_dist_helpers", Path(__file__).parent / "_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_h = _load_helpers()


@pytest.fixture(scope="module")
def core_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("core")
    _h.torchrun(Path(__file__).parent / "_core_worker.py", str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_process_group_is_gloo_on_cpu(core_results: list[dict]) -> None:
    assert [r["world_size"] for r in core_results] == [2, 2]
    assert all(r["backend"] == "gloo" and r["device"] == "cpu" for r in core_results)


def test_meta_build_is_filled_shard_by_shard(core_results: list[dict]) -> None:
    r0, r1 = core_results
    assert r0["param_is_dtensor"] == "DTensor"
    assert r0["not_loaded"] == [] and r1["not_loaded"] == []
    assert r0["local_rows_output"] + r1["local_rows_output"] == 37  # each rank holds only its rows
    assert r0["gather_keys_equal"] and r0["gather_max_diff"] == 0.0  # exact copy of the checkpoint
    assert r0["buffer_diff"] == 0.0 and r1["buffer_diff"] == 0.0  # non-persistent buffers recomputed


def test_global_token_normalisation_matches_single_process(core_results: list[dict]) -> None:
    r0, r1 = core_results
    assert r0["tokens_local"] != r1["tokens_local"]  # uneven on purpose
    assert r0["tokens_global"] == r0["tokens_ref"] == r0["tokens_local"] + r1["tokens_local"]
    # float32 sums in a different order: tolerance 1e-5 on the loss, 1e-6 on gradients
    assert r0["loss_diff"] < 1e-5
    assert r0["grad_max_diff"] < 1e-6 and r1["grad_max_diff"] < 1e-6


def test_clip_grad_norm_on_dtensors(core_results: list[dict]) -> None:
    for r in core_results:
        assert r["norm_type"] == "DTensor"  # kdtune.training.clip_grad_norm returns a replicated DTensor; float() works
        assert r["norm"] == pytest.approx(r["norm_ref"], rel=1e-5)
        assert r["clipped_grad_max_diff"] < 1e-7


def test_sharded_checkpoint_resume_is_exact(core_results: list[dict]) -> None:
    r0 = core_results[0]
    assert r0["ckpt_dirs"] == ["step_2", "step_3"]  # keep_last=2, no .tmp left behind
    assert r0["latest"] == "step_3" and r0["resumed_state_note"] == "s3"
    assert r0["resume_param_diff"] == 0.0
    assert all(r["rng_restored"] for r in core_results)
    assert r0["loss2_diff"] < 1e-5 and r0["step2_param_diff"] < 1e-5


def test_sampler_shares_equal_single_process_global_batches() -> None:
    """builders.ResumableSampler: W ranks x micro-batch B see, step for step, one process's micro-batch W*B."""
    from kdtune.training.data import ResumableSampler

    n, W, B = 24, 2, 3
    for epoch in (0, 1):
        single = ResumableSampler(n, seed=7)
        single.set_epoch(epoch)
        order = list(single)
        shares = []
        for rank in range(W):
            s = ResumableSampler(n, seed=7, rank=rank, world_size=W)
            s.set_epoch(epoch)
            shares.append(list(s))
        for step in range(n // (W * B)):
            dist_batch = sorted(i for sh in shares for i in sh[step * B : (step + 1) * B])
            assert dist_batch == sorted(order[step * W * B : (step + 1) * W * B])


def test_global_grad_scale_compensates_fsdp_average() -> None:
    assert D.global_grad_scale(40, world_size=4) == pytest.approx(0.1)
    assert D.global_grad_scale(0, world_size=2) == 0.0


def test_cpu_offload_on_cpu_is_a_clear_error() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ConfigError, match="fsdp_cpu_offload"):
        D.shard_model(model, cpu_offload=True, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        D.init_distributed("cuda")
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        D.init_distributed("cuda:1")


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="launched 4 processes on this node but only 2 GPU"):
        D.init_distributed("auto")
