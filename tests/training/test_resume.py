"""ResumeState: train N steps straight == N/2, save, fresh objects, load, N/2; atomicity, keep-last-K, errors."""

import json
import random

import numpy as np
import pytest
import torch

from kdtune.errors import CheckpointError
from kdtune.training import ResumeState, get_cosine_schedule_with_warmup


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        self.drop = torch.nn.Dropout(0.3)  # consumes torch RNG: exact resume needs the RNG state
        self.b = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)
    return model, opt, sched


def _train(model, opt, sched, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 6)  # data drawn from the torch RNG, plus python / numpy draws
        noise = random.random() + float(np.random.rand())
        loss = (model(x) - noise).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    return losses


def test_resume_round_trip_gives_identical_losses(tmp_path):
    random.seed(1)
    np.random.seed(1)
    straight = _train(*_setup(), 8)

    random.seed(1)
    np.random.seed(1)
    model, opt, sched = _setup()
    first = _train(model, opt, sched, 4)
    rs = ResumeState(tmp_path, keep_last=2)
    path = rs.save(
        4,
        epoch=1,
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        data_state={"batches_seen": 4},
        config={"seed": 0, "optimizer": {"lr": 0.01}},
    )
    _train(model, opt, sched, 2)  # keep going and disturb every RNG before resuming

    model2, opt2, sched2 = _setup(seed=123)
    loaded = rs.load(model=model2, optimizer=opt2, lr_scheduler=sched2)
    assert loaded.path == path and loaded.step == 4 and loaded.epoch == 1
    assert loaded.data_state == {"batches_seen": 4} and loaded.config["optimizer"]["lr"] == 0.01
    second = _train(model2, opt2, sched2, 4)
    assert first + second == straight  # bit-identical


def test_keep_last_and_find_latest_ignore_partial(tmp_path):
    model, opt, _ = _setup()
    rs = ResumeState(tmp_path / "out", keep_last=2)
    for step in (1, 2, 3):
        rs.save(step, model=model, optimizer=opt)
    names = [p.name for p in ResumeState.list_checkpoints(rs.root)]
    assert names == ["step_00000002", "step_00000003"]
    # a crashed write (tmp dir) and a dir without state.json are never picked
    (rs.root / "step_00000009.tmp-1234").mkdir()
    (rs.root / "step_00000010").mkdir()
    assert rs.find_latest().name == "step_00000003"
    meta = json.loads((rs.find_latest() / "state.json").read_text())
    assert meta["step"] == 3 and "model.pt" in meta["files"]
    with pytest.raises(CheckpointError, match="no state.json"):
        rs.load(rs.root / "step_00000010")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        ResumeState(tmp_path / "empty").load()


def test_trainable_only_adapter_state(tmp_path):
    model, opt, _ = _setup()
    model.a.requires_grad_(False)  # frozen base, trainable "adapter" b
    rs = ResumeState(tmp_path)
    path = rs.save(7, model=model, trainable_only=True)
    saved = torch.load(path / "model.pt", weights_only=True)
    assert set(saved) == {"b.weight", "b.bias"}
    other = Net()
    other.a.requires_grad_(False)
    rs.load(model=other)
    torch.testing.assert_close(other.b.weight, model.b.weight)


def test_mismatched_model_is_a_checkpoint_error(tmp_path):
    model, _, _ = _setup()
    rs = ResumeState(tmp_path)
    rs.save(1, model=model)
    wrong = torch.nn.Sequential(torch.nn.Linear(6, 8))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        rs.load(model=wrong)
    bigger = Net()
    bigger.b = torch.nn.Linear(8, 2)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        rs.load(model=bigger)
