"""LR schedules vs their formulas, warmup_ratio, and exact resume from a state dict."""

import math

import pytest
import torch

from kdtune.errors import ConfigError
from kdtune.training import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)


def _opt(lr=1.0):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_cosine_formula():
    lrs = _lrs(get_cosine_schedule_with_warmup(_opt(2.0), num_warmup_steps=4, num_training_steps=20), 21)
    for s, lr in enumerate(lrs):
        want = s / 4 if s < 4 else 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))
        assert lr == pytest.approx(2.0 * want, abs=1e-12)
    assert lrs[4] == pytest.approx(2.0) and lrs[20] == pytest.approx(0.0, abs=1e-12)


def test_linear_constant_min_lr_and_warmup_ratio():
    lin = _lrs(get_linear_schedule_with_warmup(_opt(), num_warmup_steps=2, num_training_steps=10, min_lr_ratio=0.1), 11)
    assert lin[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert lin[6] == pytest.approx(0.1 + 0.9 * (1 - 4 / 8)) and lin[10] == pytest.approx(0.1)
    const = _lrs(get_constant_schedule_with_warmup(_opt(), num_warmup_steps=3), 6)
    assert const == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    ratio = _lrs(get_cosine_schedule_with_warmup(_opt(), num_training_steps=100, warmup_ratio=0.05), 6)
    assert ratio == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_bad_settings():
    with pytest.raises(ConfigError, match="both num_warmup_steps and warmup_ratio"):
        get_cosine_schedule_with_warmup(_opt(), num_warmup_steps=2, num_training_steps=10, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        get_linear_schedule_with_warmup(_opt(), num_training_steps=10, warmup_ratio=1.5)
    with pytest.raises(ConfigError, match="num_training_steps"):
        get_cosine_schedule_with_warmup(_opt(), num_warmup_steps=2)


def test_resume_from_state_dict_continues_exactly():
    ref = get_cosine_schedule_with_warmup(_opt(3e-4), num_warmup_steps=3, num_training_steps=12)
    full = _lrs(ref, 12)

    first = get_cosine_schedule_with_warmup(_opt(3e-4), num_warmup_steps=3, num_training_steps=12)
    _lrs(first, 5)
    opt_state, sched_state = first.optimizer.state_dict(), first.state_dict()

    opt = _opt(3e-4)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=12)
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    assert _lrs(sched, 7) == pytest.approx(full[5:], abs=1e-15)

    # loading the schedule alone (optimizer state not restored) also sets the current LR
    opt2 = _opt(3e-4)
    sched2 = get_cosine_schedule_with_warmup(opt2, num_warmup_steps=3, num_training_steps=12)
    sched2.load_state_dict(sched_state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(full[5])
