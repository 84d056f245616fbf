"""`kdtune estimate`: the fake-tensor replay of a step against the peak measured on a real run of the tiny configs."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdtune.cli.main import main
from kdtune.estimate import LiveTensorTracker, calibrate, estimate_memory, optimizer_state_bytes


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("kd", []),
        ("kd", ["enable_activation_checkpointing=true"]),
        ("kd", ["num_output_chunks=null", "temperature=2.0"]),
        ("kd", ["compile=true"]),
        ("lora", []),
        ("full", []),
        ("full", ["enable_activation_checkpointing=true"]),
    ],
)
def test_estimate_within_15_percent_of_measured_peak(tiny_cfg, tmp_path, kind, extra):
    # measured: the CPU allocator's live bytes (profiler memory events) during a steady-state step, plus the weights
    # and optimizer state the step starts with; the estimate is recomputed at that step's micro-batch shapes
    cal = calibrate(tiny_cfg(kind, tmp_path / "run", *extra), steps=2)
    err = abs(cal.estimate.peak_bytes - cal.peak_bytes) / cal.peak_bytes
    assert err <= 0.15, (cal.estimate.peak_bytes, cal.peak_bytes, cal.shapes)
    assert cal.step_seconds > 0 and cal.tokens_per_second > 0
    assert not (tmp_path / "run").exists()  # calibration writes nothing


def test_estimate_rows_and_worst_case(tiny_cfg, tmp_path):
    cfg = tiny_cfg("kd", tmp_path / "run")
    worst = estimate_memory(cfg)  # batch_size x max_seq_len, every position trained
    short = estimate_memory(cfg, seq_len=32)
    assert worst.seq_len == 128 and worst.trained_tokens == 4 * 127
    assert worst.peak_bytes > short.peak_bytes
    rows = {r.name: r.nbytes for r in worst.rows}
    student = rows["student weights"]
    assert rows["gradients"] == student  # full fine-tuning: every parameter trains (tied embedding counted once)
    assert rows["optimizer state"] == 2 * student  # AdamW
    assert rows["activations (checkpointed)"] < rows["activations"]
    assert worst.flops_per_step > 0


def test_optimizer_state_matches_torch():
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Linear(20, 3, bias=False))
    params = list(model.parameters())
    for cls, kwargs in [
        (torch.optim.AdamW, {}),
        (torch.optim.SGD, {"momentum": 0.9}),
        (torch.optim.SGD, {}),
        (torch.optim.RMSprop, {"momentum": 0.5, "centered": True}),
        (torch.optim.Adafactor, {}),
    ]:
        opt = cls(params, lr=1e-3, **kwargs)
        model(torch.randn(4, 12)).sum().backward()
        opt.step()
        real = sum(v.nbytes for st in opt.state.values() for k, v in st.items() if torch.is_tensor(v) and k != "step")
        cfg = OmegaConf.create({"_component_": f"torch.optim.{cls.__name__}", **kwargs})
        assert optimizer_state_bytes(cfg, params)[0] == real, cls.__name__
        model.zero_grad()


def test_tracker_counts_views_once_and_frees():
    with LiveTensorTracker() as tr:
        a = torch.zeros(1000)  # 4000 B
        v = a[10:]  # a view: no new storage
        b = torch.ones(250)  # 1000 B
        del b
        c = torch.ones(100)  # 400 B
    assert tr.peak == 5000 and tr.sweep() == 4400
    del a, v, c


def test_estimate_cli(tiny, tmp_path, capsys, overrides):
    ov = overrides(tmp_path / "run")
    assert main(["estimate", "--config", "tiny/kd", *ov, "--calibrate", "2"]) == 0
    out = capsys.readouterr().out
    for word in ("student weights", "teacher weights", "optimizer state", "activations", "KD loss chunk", "peak"):
        assert word in out
    assert "measured peak" in out and "step time" in out
    # one-line errors for a bad config
    assert main(["estimate", "--config", "tiny/kd", *ov, "batch_sise=3"]) == 1
    assert main(["estimate", "--config", "tiny/eval"]) == 1
    assert main(["estimate", "--config", "tiny/kd", *ov, "--calibrate", "1"]) == 1
    assert main(["estimate", "--config", "tiny/kd", f"checkpointer.checkpoint_dir={tmp_path}/nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("kdtune: error: ") for line in err), err
