"""Metric loggers, progress bar, dtype/device/seed helpers, clipping, memory and the NaN/inf guard."""

import importlib.util
import io
import json
import math

import pytest
import torch

from kdtune.errors import ConfigError, KDTuneError
from kdtune.training import (
    DiskLogger,
    NonFiniteLossError,
    ProgressBar,
    StdoutLogger,
    TensorBoardLogger,
    WandBLogger,
    check_finite,
    clip_grad_norm,
    get_device,
    get_dtype,
    peak_memory,
    set_seed,
)


def test_disk_logger_writes_jsonl(tmp_path):
    with DiskLogger(log_dir=tmp_path / "logs", filename="m.jsonl", run_id="r1") as lg:
        lg.log_dict({"loss": torch.tensor(1.5), "lr": 2e-5, "kd_loss": float("nan")}, step=1)
        lg.log("loss", 1.25, step=2)
        lg.log_config({"kd_ratio": 0.5})
    rows = [json.loads(x) for x in (tmp_path / "logs" / "m.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 1, "run_id": "r1", "loss": 1.5, "lr": 2e-5, "kd_loss": "nan"},
        {"step": 2, "run_id": "r1", "loss": 1.25},
    ]
    # without a file name: a file of its own per run (never appended to another run's), named by the run id
    a, b = DiskLogger(log_dir=tmp_path / "l2", run_id="same"), DiskLogger(log_dir=tmp_path / "l2", run_id="same")
    assert (a.path.name, b.path.name) == ("log_same.jsonl", "log_same-1.jsonl")
    a.close()
    b.close()
    assert json.loads((tmp_path / "logs" / "config.json").read_text()) == {"kd_ratio": 0.5}


def test_disk_logger_silent_on_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    lg = DiskLogger(log_dir=tmp_path / "r1")
    lg.log("loss", 1.0, 1)
    lg.close()
    assert not (tmp_path / "r1").exists()


def test_stdout_logger():
    buf = io.StringIO()
    StdoutLogger(stream=buf).log_dict({"loss": 1.23456, "lr": 3e-5, "num_tokens": 10}, step=7)
    assert buf.getvalue().strip() == "Step 7 | loss:1.2346 lr:3.0000e-05 num_tokens:10"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard installed")
def test_tensorboard_missing_says_which_extra(tmp_path):
    with pytest.raises(ConfigError, match=r"pip install 'kdtune\[tensorboard\]'"):
        TensorBoardLogger(log_dir=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")
def test_wandb_missing_says_which_extra():
    with pytest.raises(ConfigError, match=r"pip install 'kdtune\[wandb\]'"):
        WandBLogger(project="x")


def test_progress_bar_reports_tokens_per_second():
    bar = ProgressBar(total_steps=3, disable=True)
    tps = bar.update(num_tokens=1000, loss=1.0, kd_loss=0.5, lr=1e-4)
    assert tps > 0 and bar.tokens_per_second == tps
    bar.close()


def test_get_dtype():
    assert get_dtype("fp32") is torch.float32 and get_dtype(None) is torch.float32
    assert get_dtype("bf16") is torch.bfloat16 and get_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 is mixed precision.*dtype=bf16"):
        get_dtype("fp16")
    with pytest.raises(ConfigError, match="not recognised"):
        get_dtype("int8")


def test_get_device():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a valid device"):
        get_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            get_device("cuda")


def test_set_seed_reproducible():
    assert set_seed(7) == 7
    a = torch.rand(3)
    set_seed(7)
    torch.testing.assert_close(torch.rand(3), a)
    assert isinstance(set_seed(None), int)
    with pytest.raises(ConfigError):
        set_seed(-1)


def test_clip_grad_norm_matches_manual():
    lin = torch.nn.Linear(4, 3)
    lin(torch.randn(2, 4)).pow(2).sum().backward()
    manual = math.sqrt(sum(p.grad.pow(2).sum().item() for p in lin.parameters()))
    assert clip_grad_norm(lin, None).item() == pytest.approx(manual, rel=1e-6)
    assert clip_grad_norm(lin.parameters(), 0.1).item() == pytest.approx(manual, rel=1e-6)
    after = math.sqrt(sum(p.grad.pow(2).sum().item() for p in lin.parameters()))
    assert after == pytest.approx(0.1, rel=1e-4)


def test_peak_memory_cpu():
    m = peak_memory("cpu")
    assert m["peak_memory_rss"] > 0.01 and m["peak_memory_rss"] >= m.get("memory_rss", 0) * 0.5


def test_check_finite_names_the_step():
    check_finite(torch.tensor(1.0), 3)
    with pytest.raises(
        NonFiniteLossError, match="loss is nan at step 12; the last usable checkpoint is /x/step_10"
    ) as e:
        check_finite(torch.tensor(float("nan")), 12, last_checkpoint="/x/step_10")
    assert isinstance(e.value, KDTuneError)
    with pytest.raises(NonFiniteLossError, match="grad_norm is inf at step 2"):
        check_finite(float("inf"), 2, name="grad_norm")
