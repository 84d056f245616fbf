"""Suite-wide test settings: deterministic, fp32, few threads (CI has 2 cores and runs 2 workers)."""

import os

import pytest
import torch

os.environ.setdefault("KDTUNE_DEBUG", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # recipes keep it (kdtune.perf.configure_threads)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)
