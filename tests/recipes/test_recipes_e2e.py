"""End-to-end runs of the single-device recipes on tiny generated HF models, a tiny tokenizer and local chat data.

References are independent of kdtune: `transformers` loads the final HF directories and `peft` the adapters; the
equivalence tests compare two kdtune runs that must be the same computation (accumulation, resume).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdtune.errors import KDTuneError

ROOT = Path(__file__).resolve().parents[2]


def _log_rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted((out / "logs").glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines()]
    return rows


def _train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in _log_rows(out) if "loss" in r]


def _kdtune_run(recipe: str, config: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kdtune", "run", recipe, "--config", config, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _hf_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


# ------------------------------------------------------------------------------------------- CLI, each recipe
def test_kd_recipe_via_kdtune_run(tiny, overrides, tmp_path: Path) -> None:
    out = tmp_path / "kd"
    r = _kdtune_run(
        "knowledge_distillation_single_device", "tiny/kd", *overrides(out), "max_steps=8", "optimizer.lr=1e-2"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _log_rows(out)
    train = [x for x in rows if "loss" in x]
    assert [x["step"] for x in train] == list(range(1, 9))
    for key in ("loss", "class_loss", "kd_loss", "lr", "grad_norm", "tokens_per_second", "peak_memory_rss"):
        assert key in train[0], key
    assert any("val_loss" in x for x in rows)
    losses = [x["loss"] for x in train]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]
    # the final student loads in transformers and matches kdtune's own forward of it
    from kdtune.models import load_hf_model

    ref = _hf_logits(out / "final", TOKENS)
    ours = load_hf_model(out / "final")(TOKENS)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    before = load_file(tiny["student"] / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert (out / "final" / "tokenizer_config.json").is_file()  # tokenizer files travel with the model


def test_lora_recipe_via_kdtune_run(tiny, overrides, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    r = _kdtune_run("lora_finetune_single_device", "tiny/lora", *overrides(out, None), "max_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _train_losses(out)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    base = AutoModelForCausalLM.from_pretrained(tiny["student"], torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "final_adapter").eval()
    with torch.no_grad():
        peft_logits = peft_model(TOKENS).logits
    merged_logits = _hf_logits(out / "final", TOKENS)
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)
    base_logits = _hf_logits(tiny["student"], TOKENS)
    assert (merged_logits - base_logits).abs().max() > 1e-4  # the adapter changed the model


def test_full_recipe_via_kdtune_run(tiny, overrides, tmp_path: Path) -> None:
    out = tmp_path / "full"
    r = _kdtune_run("full_finetune_single_device", "tiny/full", *overrides(out, None), "max_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _train_losses(out)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert torch.isfinite(_hf_logits(out / "final", TOKENS)).all()
    assert not (out / "final_adapter").exists()


# ------------------------------------------------------------------------------------------- in-process checks
LORA_STUDENT = ["+model.lora_attn_modules=[q_proj,v_proj]", "+model.lora_rank=4", "+model.lora_alpha=8"]


def test_teacher_frozen_and_bit_identical(tiny, tiny_cfg, recipe, tmp_path: Path, monkeypatch) -> None:
    from kdtune.training import assert_frozen, param_fingerprint, setup_teacher

    kd = recipe("knowledge_distillation_single_device")
    seen = {}

    def spy(model):
        setup_teacher(model)
        seen["teacher"], seen["fingerprint"] = model, param_fingerprint(model)
        return model

    monkeypatch.setattr("kdtune.training.setup.setup_teacher", spy)  # build_teacher freezes the teacher
    summary = kd.train(tiny_cfg("kd", tmp_path / "run", *LORA_STUDENT, "max_steps=3", "val_split_ratio=0.0"))
    assert len(summary.steps) == 3 and summary.evals == []
    assert_frozen(seen["teacher"], seen["fingerprint"])  # eval mode, no grads, weights unchanged bit for bit
    # and the teacher on disk was not touched either
    loaded = load_file(tiny["teacher"] / "model.safetensors")
    from kdtune.models import load_hf_model

    assert param_fingerprint(load_hf_model(tiny["teacher"])) == param_fingerprint(seen["teacher"])
    assert loaded  # file still readable


def test_grad_accumulation_equivalence(tiny_cfg, recipe, tmp_path: Path) -> None:
    """batch 8 x accum 1 == batch 2 x accum 4: same losses per step and same final weights."""
    kd = recipe("knowledge_distillation_single_device")
    common = ["max_steps=3", "val_split_ratio=0.0", "save_every_n_steps=null", "optimizer.lr=1e-2"]
    a = kd.train(tiny_cfg("kd", tmp_path / "a", *common, "batch_size=8", "gradient_accumulation_steps=1"))
    b = kd.train(tiny_cfg("kd", tmp_path / "b", *common, "batch_size=2", "gradient_accumulation_steps=4"))
    for key in ("loss", "class_loss", "kd_loss", "num_tokens", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([s[key] for s in a.steps], dtype=torch.float64),
            torch.tensor([s[key] for s in b.steps], dtype=torch.float64),
            atol=1e-6,
            rtol=1e-5,
            msg=key,
        )
    wa, wb = (
        load_file(tmp_path / "a" / "final" / "model.safetensors"),
        load_file(tmp_path / "b" / "final" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("student, resume_step", [("lora", 3), ("full", 2)])
def test_resume_equals_straight_run(tiny_cfg, recipe, tmp_path: Path, student: str, resume_step: int) -> None:
    """Train 6 steps over 2 epochs straight; resume from the checkpoint of step 3 (an epoch end) or step 2 (mid-epoch):
    every later step's losses and the final weights are identical."""
    kd = recipe("knowledge_distillation_single_device")
    extra = LORA_STUDENT if student == "lora" else []
    common = [*extra, "epochs=2", "max_steps_per_epoch=3", "max_steps=null", "save_every_n_steps=2",
              "keep_last_n_checkpoints=5", "eval_every_n_steps=null", "+model.lora_dropout=0.1" if student == "lora" else "optimizer.lr=5e-3"]  # fmt: skip
    out = tmp_path / "run"
    straight = kd.train(tiny_cfg("kd", out, *common))
    assert [s["step"] for s in straight.steps] == [1, 2, 3, 4, 5, 6]
    assert [s["epoch"] for s in straight.steps] == [0, 0, 0, 1, 1, 1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_0000000{i}" for i in (2, 3, 4, 6)]
    # keep only one checkpoint and pretend the run died there
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out, resumed_dir)
    for d in (resumed_dir / "checkpoints").iterdir():
        if d.name != f"step_{resume_step:08d}":
            shutil.rmtree(d)
    shutil.rmtree(resumed_dir / "final")
    if student == "lora":
        shutil.rmtree(resumed_dir / "final_adapter")
    resumed = kd.train(tiny_cfg("kd", resumed_dir, *common, "resume_from_checkpoint=true"))
    assert [s["step"] for s in resumed.steps] == list(range(resume_step + 1, 7))
    for key in ("loss", "class_loss", "kd_loss", "lr", "num_tokens", "epoch"):
        assert [s[key] for s in resumed.steps] == [s[key] for s in straight.steps[resume_step:]], key
    name = "final_adapter/adapter_model.safetensors" if student == "lora" else "final/model.safetensors"
    wa, wb = load_file(out / name), load_file(resumed_dir / name)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_padded_teacher_vocab_is_sliced(tiny, tiny_cfg, recipe, tmp_path: Path) -> None:
    kd = recipe("knowledge_distillation_single_device")
    summary = kd.train(tiny_cfg("kd", tmp_path / "run", "max_steps=2", "val_split_ratio=0.0", teacher="teacher_padded"))
    from kdtune.models import load_hf_model

    assert load_hf_model(tiny["teacher_padded"]).vocab_size == load_hf_model(tiny["student"]).vocab_size + 64
    assert all(torch.isfinite(torch.tensor(s["kd_loss"])) and s["kd_loss"] > 0 for s in summary.steps)


def test_incompatible_teacher_tokenizer_is_refused(tiny_cfg, recipe, tmp_path: Path) -> None:
    kd = recipe("knowledge_distillation_single_device")
    with pytest.raises(KDTuneError, match="(?i)vocab|tokenizer"):
        kd.train(tiny_cfg("kd", tmp_path / "run", "max_steps=1", teacher="other_tok_teacher"))


def test_nan_stop_names_a_usable_checkpoint_and_a_lower_lr_on_resume_takes_effect(
    tiny_cfg, recipe, tmp_path: Path, capsys
) -> None:
    """Three steps at a sane lr, then resumed at lr 1000 the run diverges (so the new lr took effect). The checkpoint
    of the step before the NaN holds the weights that produced it (resuming from it repeats the NaN whatever the lr):
    it is set aside, and the stop names an older one (finite, sane weights and optimizer state). Resuming from it with
    the sane lr again trains to the end with that lr."""
    from kdtune.training import NonFiniteLossError
    from kdtune.training.checkpoints import WEIGHT_SANITY_BOUND

    full = recipe("full_finetune_single_device")
    common = ["optimizer=torch.optim.SGD", "clip_grad_norm=null", "~lr_scheduler", "save_every_n_steps=1",
              "keep_last_n_checkpoints=9", "val_split_ratio=0.0"]  # fmt: skip
    out = tmp_path / "run"
    full.train(tiny_cfg("full", out, *common, "optimizer.lr=0.01", "max_steps=3"))
    capsys.readouterr()
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as info:
        full.train(tiny_cfg("full", out, *common, "optimizer.lr=1000.0", "max_steps=9", "resume_from_checkpoint=true"))
    assert "resume: optimizer.lr: 0.01 -> 1000.0" in capsys.readouterr().out
    message = str(info.value)
    bad_step = int(message.split("at step ")[1].split(";")[0])
    named = Path(message.split("the last usable checkpoint is ")[1].split(" ")[0])
    assert named.parent == out / "checkpoints" and int(named.name.split("_")[1]) == bad_step - 2
    assert sorted(p.name for p in named.parent.iterdir())[-1] == f"step_{bad_step - 1:08d}.diverged"
    weights = torch.load(named / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() and w.abs().max() < WEIGHT_SANITY_BOUND for w in weights.values())
    state = torch.load(named / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.isfinite(t).all() for s in state.values() for t in s.values() if torch.is_tensor(t))
    # the advice: resume from it with a lower learning rate
    resumed = full.train(
        tiny_cfg("full", out, *common, "optimizer.lr=0.01", "max_steps=9", "resume_from_checkpoint=true")
    )
    assert "resume: optimizer.lr: 1000.0 -> 0.01" in capsys.readouterr().out
    first = bad_step - 1
    assert [s["step"] for s in resumed.steps] == list(range(first, 10))
    assert all(s["lr"] == 0.01 and math.isfinite(s["loss"]) for s in resumed.steps)


def test_nan_stop_without_a_usable_checkpoint_says_start_again(tiny_cfg, recipe, tmp_path: Path) -> None:
    """At lr 1e30 the first update already blows the weights up: that checkpoint is not written (nor any later)."""
    from kdtune.training import NonFiniteLossError

    full = recipe("full_finetune_single_device")
    out = tmp_path / "run"
    cfg = tiny_cfg(
        "full", out, "optimizer=torch.optim.SGD", "optimizer.lr=1e30",
        "clip_grad_norm=null", "~lr_scheduler", "save_every_n_steps=1", "keep_last_n_checkpoints=1", "max_steps=6",
        "val_split_ratio=0.0",
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"after step 1 weight .* reaches .*no usable resume checkpoint"):
        full.train(cfg)
    assert not list((out / "checkpoints").glob("step_*")) and not (out / "final").exists()


def test_packed_data_and_activation_checkpointing(tiny_cfg, recipe, tmp_path: Path) -> None:
    """Packed sequences (document masks, positions) train; per-layer activation checkpointing changes no number."""
    kd = recipe("knowledge_distillation_single_device")
    common = ["+dataset.packed=true", "max_steps=2", "val_split_ratio=0.0", "batch_size=2", "save_every_n_steps=null"]
    plain = kd.train(tiny_cfg("kd", tmp_path / "a", *common))
    ac = kd.train(tiny_cfg("kd", tmp_path / "b", *common, "enable_activation_checkpointing=true"))
    assert [s["loss"] for s in plain.steps] == pytest.approx([s["loss"] for s in ac.steps], rel=1e-6, abs=1e-7)
    assert all(s["num_tokens"] > 0 for s in plain.steps)


def test_bf16_run(tiny_cfg, recipe, tmp_path: Path) -> None:
    kd = recipe("knowledge_distillation_single_device")
    summary = kd.train(tiny_cfg("kd", tmp_path / "run", "dtype=bf16", "max_steps=2", "val_split_ratio=0.0"))
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in summary.steps)
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "name, kind", [("full_finetune_single_device", "full"), ("lora_finetune_single_device", "lora"),
                   ("knowledge_distillation_single_device", "kd")],
)  # fmt: skip
def test_fp16_mixed_precision_in_every_recipe(name: str, kind: str, tiny_cfg, recipe, tmp_path: Path) -> None:
    """dtype=fp16: step 1 (same weights) matches the fp32 run to fp16 precision, overflowed steps are skipped and
    logged (loss_scale, skipped_steps) without tripping the NaN guard, the model trains and is written in fp32."""
    common = ["max_steps=8", "val_split_ratio=0.0", "save_every_n_steps=null", "optimizer.lr=1e-2"]
    fp32 = recipe(name).train(tiny_cfg(kind, tmp_path / "fp32", *common))
    fp16 = recipe(name).train(tiny_cfg(kind, tmp_path / "fp16", *common, "dtype=fp16"))
    assert fp16.steps[0]["loss"] == pytest.approx(fp32.steps[0]["loss"], rel=2e-3)
    assert fp16.steps[0]["skipped_steps"] >= 1  # the summed loss x 2^16 overflows fp16 at first: the scale backs off
    assert fp16.steps[-1]["skipped_steps"] < 6 and fp16.steps[-1]["loss"] < fp16.steps[0]["loss"]
    scales = [s["loss_scale"] for s in fp16.steps]
    assert scales[0] == 2.0**16 and scales == sorted(scales, reverse=True)
    assert "loss_scale" not in fp32.steps[0]
    config = json.loads((tmp_path / "fp16" / "final" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"


def test_qlora_finetune(tiny, tiny_cfg, recipe, tmp_path: Path) -> None:
    """QLoRA (NF4 base weights) on the dim-64 model: trains, and the merged final dir loads in transformers."""
    lora = recipe("lora_finetune_single_device")
    out = tmp_path / "q"
    cfg = tiny_cfg(
        "lora", out, "+model.quantize_base=true", "max_steps=2", f"checkpointer.checkpoint_dir={tiny['teacher']}"
    )
    summary = lora.train(cfg)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in summary.steps)
    assert torch.isfinite(_hf_logits(out / "final", TOKENS)).all()
    assert (out / "final_adapter" / "adapter_config.json").is_file()


def test_first_step_losses_match_an_independent_float64_reference(tiny, tiny_cfg, recipe, tmp_path: Path) -> None:
    """Step 1's logged loss/class_loss/kd_loss == transformers logits + float64 formulas over the same micro-batches:
    CE and T²·KL(teacher‖student) at T=2, summed over every valid token of the step's 2 micro-batches and divided by
    their total count, mixed with kd_ratio=0.3; the teacher's vocabulary is padded (+64) and sliced."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from kdtune.config import read_settings
    from kdtune.data import load_hf_tokenizer
    from kdtune.training import build_data
    from kdtune.training.settings import KDSettings

    kd = recipe("knowledge_distillation_single_device")
    extra = ["max_steps=1", "batch_size=2", "gradient_accumulation_steps=2", "kd_ratio=0.3", "temperature=2.0"]
    cfg = tiny_cfg("kd", tmp_path / "run", *extra, teacher="teacher_padded")
    summary = kd.train(cfg)
    # the same micro-batches, rebuilt from the same settings
    s = read_settings(KDSettings, cfg)
    _, micro_batches = next(build_data(s, load_hf_tokenizer(tiny["student"], max_seq_len=128)).steps())
    student = AutoModelForCausalLM.from_pretrained(tiny["student"]).double().eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher_padded"]).double().eval()
    ce_sum = kl_sum = 0.0
    n = 0
    T = 2.0
    for batch in micro_batches:
        with torch.no_grad():
            s_logits = student(batch["tokens"]).logits[:, :-1]  # [B, T-1, V]
            t_logits = teacher(batch["tokens"]).logits[:, :-1, : s_logits.shape[-1]]
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        s_v, t_v, y = s_logits[valid], t_logits[valid], labels[valid]
        ce_sum += F.cross_entropy(s_v, y, reduction="sum").item()
        log_ps, log_pt = F.log_softmax(s_v / T, -1), F.log_softmax(t_v / T, -1)
        kl_sum += (T**2 * (log_pt.exp() * (log_pt - log_ps)).sum()).item()
        n += int(valid.sum())
    step = summary.steps[0]
    assert step["num_tokens"] == n
    assert step["class_loss"] == pytest.approx(ce_sum / n, rel=1e-5)
    assert step["kd_loss"] == pytest.approx(kl_sum / n, rel=1e-4, abs=1e-7)
    assert step["loss"] == pytest.approx(0.7 * ce_sum / n + 0.3 * kl_sum / n, rel=1e-5)


def test_kd_with_ratio_zero_is_plain_finetuning(tiny_cfg, recipe, tmp_path: Path) -> None:
    """One recipe, two views: KD with kd_ratio=0 trains exactly like the full fine-tuning recipe."""
    common = ["max_steps=3", "val_split_ratio=0.0", "save_every_n_steps=null"]
    kd = recipe("knowledge_distillation_single_device").train(tiny_cfg("kd", tmp_path / "kd", *common, "kd_ratio=0.0"))
    sft = recipe("full_finetune_single_device").train(tiny_cfg("full", tmp_path / "sft", *common))
    assert [s["loss"] for s in kd.steps] == [s["loss"] for s in sft.steps]


def test_tutorial_flow_lora_teacher_then_distil(tiny, tiny_cfg, recipe, tmp_path: Path) -> None:
    """Seed 003 in small: LoRA-fine-tune the teacher, then distil its merged final/ into the student."""
    teacher_run = tmp_path / "teacher"
    recipe("lora_finetune_single_device").train(
        tiny_cfg("lora", teacher_run, "max_steps=2", f"checkpointer.checkpoint_dir={tiny['teacher']}")
    )
    summary = recipe("knowledge_distillation_single_device").train(
        tiny_cfg(
            "kd",
            tmp_path / "kd",
            *LORA_STUDENT,
            "max_steps=2",
            f"teacher_checkpointer.checkpoint_dir={teacher_run / 'final'}",
        )
    )
    assert len(summary.steps) == 2 and all(s["kd_loss"] > 0 for s in summary.steps)
    assert (tmp_path / "kd" / "final_adapter" / "adapter_config.json").is_file()


def test_resume_with_a_different_data_order_is_refused(tiny_cfg, recipe, tmp_path: Path) -> None:
    full = recipe("full_finetune_single_device")
    out = tmp_path / "run"
    full.train(tiny_cfg("full", out, "max_steps=2", "save_every_n_steps=1", "val_split_ratio=0.0"))
    with pytest.raises(KDTuneError, match="batch_size is 2 but the checkpoint .* was trained with 4"):
        full.train(
            tiny_cfg("full", out, "max_steps=4", "batch_size=2", "val_split_ratio=0.0", "resume_from_checkpoint=true")
        )


def test_adapter_only_outputs(tiny_cfg, recipe, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    recipe("lora_finetune_single_device").train(tiny_cfg("lora", out, "max_steps=1", "save_adapter_weights_only=true"))
    assert (out / "final_adapter" / "adapter_model.safetensors").is_file() and not (out / "final").exists()
    with pytest.raises(
        KDTuneError, match="save_adapter_weights_only"
    ):  # a full student has no adapter: refused at setup
        recipe("knowledge_distillation_single_device").train(
            tiny_cfg("kd", tmp_path / "kd", "max_steps=1", "save_adapter_weights_only=true")
        )
    assert not (tmp_path / "kd" / "checkpoints").exists()
