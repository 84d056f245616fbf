"""Resume that never surprises: every key that differs from the checkpoint's config is applied (with a line) or refused
(one line naming the key and why); a new lr reaches the optimizer's param groups AND the schedule's base_lrs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdtune.errors import ConfigError
from kdtune.training import get_cosine_schedule_with_warmup
from kdtune.training.checkpoints import (
    apply_resume_changes,
    plan_resume,
    resume_changes,
    set_aside_diverged,
    snapshot_hyperparameters,
    unusable_state,
)

SAVED = {
    "output_dir": "/runs/a",
    "seed": 1,
    "batch_size": 4,
    "max_steps": 6,
    "kd_ratio": 0.5,
    "model": {"_component_": "m.b", "lora_rank": 8},
    "checkpointer": {"_component_": "kdtune.models.HFCheckpointer", "checkpoint_dir": "/w", "output_dir": "/runs/a"},
    "tokenizer": {"_component_": "t.t", "max_seq_len": 128},
    "dataset": {"_component_": "d.d", "data_files": "/data.jsonl"},
    "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.0},
    "lr_scheduler": {"_component_": "kdtune.training.get_cosine_schedule_with_warmup", "num_warmup_steps": 1},
    "metric_logger": {"_component_": "kdtune.training.DiskLogger", "log_dir": "/runs/a/logs"},
    "save_every_n_steps": 3,
    "clip_grad_norm": 1.0,
    "resume_from_checkpoint": False,
}


def changed(**new) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SAVED.items()}
    for key, value in new.items():
        node = out
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


@pytest.mark.parametrize(
    ("new", "key", "why"),
    [
        ({"batch_size": 2}, "batch_size", "defines the data order"),
        ({"seed": 2}, "seed", "defines the data order"),
        ({"dataset__data_files": "/other.jsonl"}, "dataset.data_files", "which examples"),
        ({"tokenizer__max_seq_len": 64}, "tokenizer.max_seq_len", "tokens of every example"),
        ({"model__lora_rank": 16}, "model.lora_rank", "belong to the model"),
        ({"checkpointer__checkpoint_dir": "/w2"}, "checkpointer.checkpoint_dir", "belong to the model"),
        ({"kd_ratio": 0.9}, "kd_ratio", "changes the objective"),
        ({"group_by_length": True}, "group_by_length", "defines the data order"),  # absent = false before
        ({"optimizer___component_": "torch.optim.SGD"}, "optimizer._component_", "optimizer state belongs"),
        ({"mystery": 1}, "mystery", "cannot tell"),
    ],
)
def test_refused_keys_name_the_key_and_why(new: dict, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_resume(SAVED, changed(**new), Path("/runs/a/checkpoints/step_3"), 3, 6)
    msg = str(info.value)
    assert msg.startswith(f"resume_from_checkpoint: {key} is ") and why in msg and "\n" not in msg
    assert "start a new run in another output_dir" in msg


def test_applied_keys_and_a_moved_run_dir() -> None:
    new = changed(
        optimizer__lr=1e-3, max_steps=10, save_every_n_steps=5, clip_grad_norm=0.5, lr_scheduler__num_warmup_steps=2
    )
    # the run directory was copied elsewhere: output_dir and the paths that follow it are not changes
    new["output_dir"] = "/runs/b"
    new["checkpointer"]["output_dir"] = "/runs/b"
    new["metric_logger"]["log_dir"] = "/runs/b/logs"
    new["resume_from_checkpoint"] = True
    changes = plan_resume(SAVED, new, Path("/x"), 3, 10)
    assert [c.change.key for c in changes] == [
        "max_steps",
        "optimizer.lr",
        "lr_scheduler.num_warmup_steps",
        "save_every_n_steps",
        "clip_grad_norm",
    ]
    assert all(c.apply for c in changes)
    assert (
        changes[1].line() == "optimizer.lr: 0.003 -> 0.001 (set in the optimizer's parameter groups from the next step)"
    )


def test_a_setting_spelt_out_at_its_default_is_no_change() -> None:
    # the checkpoint's config omits shuffle / group_by_length / temperature; the resumed one states their defaults
    spelt_out = changed(shuffle=True, group_by_length=False, temperature=1.0)
    assert resume_changes(SAVED, spelt_out) == [] and resume_changes(spelt_out, SAVED) == []
    assert [c.change.key for c in resume_changes(SAVED, changed(shuffle=False))] == ["shuffle"]


def test_a_run_length_that_ends_before_the_checkpoint_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"at step 5 but max_steps now end the run after step 4; raise max_steps"):
        plan_resume(SAVED, changed(max_steps=4), Path("/x"), 5, 4)
    assert resume_changes(SAVED, SAVED) == []


def _model_opt(lr: float, total: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return model, opt, get_cosine_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=total)


def _train(model, opt, sched, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(2, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def test_new_lr_and_length_reach_param_groups_and_schedule(capsys) -> None:
    model, opt, sched = _model_opt(3e-3, 6)
    _train(model, opt, sched, 3)
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    # resumed with lr 1e-3 and 10 steps: the freshly built objects carry the new plan
    model2, opt2, sched2 = _model_opt(1e-3, 10)
    planned = snapshot_hyperparameters(opt2, sched2)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.base_lrs == [3e-3]  # what loading alone does: the old lr and the old length
    changes = plan_resume(changed(), changed(optimizer__lr=1e-3, max_steps=10), Path("/x"), 3, 10)
    apply_resume_changes(changes, planned, opt2, sched2, 3)
    out = capsys.readouterr().out
    assert "resume: optimizer.lr: 0.003 -> 0.001" in out and "resume: max_steps: 6 -> 10" in out
    # the schedule of a straight 10-step run at lr 1e-3, from step 3 on
    _, ref_opt, ref = _model_opt(1e-3, 10)
    for _ in range(3):
        ref_opt.step()
        ref.step()
    assert sched2.base_lrs == [1e-3] and opt2.param_groups[0]["initial_lr"] == 1e-3
    for _ in range(5):
        assert opt2.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
        opt2.step()
        sched2.step()
        ref_opt.step()
        ref.step()
    assert "resume: the learning rate of step 4 is" in out


def test_other_optimizer_hyperparameters_are_set_in_the_param_groups(capsys) -> None:
    model, opt, sched = _model_opt(3e-3, 6)
    _train(model, opt, sched, 2)
    state = opt.state_dict()
    _, opt2, sched2 = _model_opt(3e-3, 6)
    opt2 = torch.optim.AdamW(opt2.param_groups[0]["params"], lr=3e-3, weight_decay=0.1)
    planned = snapshot_hyperparameters(opt2, None)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["weight_decay"] == 0.01  # AdamW's default, from the checkpoint
    changes = plan_resume(changed(), changed(optimizer__weight_decay=0.1), Path("/x"), 2, 6)
    apply_resume_changes(changes, planned, opt2, None, 2)
    assert opt2.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(ConfigError, match="optimizer.no_such_arg changed but it is not a hyperparameter"):
        apply_resume_changes(
            plan_resume(changed(), changed(optimizer__no_such_arg=1), Path("/x"), 2, 6), planned, opt2, None, 2
        )


def test_unusable_state_and_set_aside(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    assert unusable_state(model) is None
    with torch.no_grad():
        model.weight[0, 0] = 1e12
    assert "reaches 1e+12" in unusable_state(model)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert unusable_state(model) == "weight weight is not finite"
    for n in (2, 3, 4):
        (tmp_path / f"step_{n:08d}").mkdir()
        (tmp_path / f"step_{n:08d}" / "state.json").write_text("{}")
    # a NaN at step 5: the weights of step 4 produced it; step 3 is where a lower lr can take another path
    assert set_aside_diverged(tmp_path, 5) == str(tmp_path / "step_00000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003", "step_00000004.diverged"]
    assert set_aside_diverged(tmp_path, 3) is None
