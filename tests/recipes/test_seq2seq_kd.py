"""The KD recipe on encoder-decoder (tiny T5 in the flan-t5 layout, tiny BART) and OPT models, from the shipped tiny
configs (configs/tiny/kd_{t5,bart,opt}.yaml) on the files ``kdtune make-tiny`` writes.

References are independent of kdtune: ``transformers`` runs the models for the step-1 loss (float64 formula written
here) and loads the final HF directories, ``peft`` loads the adapters; the equivalence tests compare two kdtune runs
that must be the same computation (accumulation, resume).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdtune.config import apply_overrides, load_config
from kdtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
HF_CLASS = {"t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration", "opt": "OPTForCausalLM"}
FP32 = ("dtype=fp32",)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kdtune.testing.tiny import make_tiny_assets

    return make_tiny_assets(tmp_path_factory.mktemp("tiny_seq2seq"))


@pytest.fixture
def cfg_for(assets):
    """``cfg_for(family, out, *overrides, teacher=family)``: configs/tiny/kd_<family>.yaml pointed at the assets."""

    def make(family: str, out: Path, *extra: str, teacher: str | None = None):
        data = assets["text_data" if family == "opt" else "seq2seq_data"]
        ov = [
            f"output_dir={out}",
            f"checkpointer.checkpoint_dir={assets[f'{family}_student']}",
            f"teacher_checkpointer.checkpoint_dir={assets[f'{teacher or family}_teacher']}",
            f"dataset.data_files={data}",
        ]
        return apply_overrides(load_config(ROOT / "configs" / "tiny" / f"kd_{family}.yaml"), [*ov, *extra])

    return make


def _hf(family: str, path: Path):
    import transformers

    model = getattr(transformers, HF_CLASS[family]).from_pretrained(str(path), attn_implementation="eager")
    return model.to(torch.float64).eval()


def _hf_logits(family: str, model, batch: dict) -> torch.Tensor:
    if family == "opt":
        return model(batch["tokens"]).logits
    return model(
        input_ids=batch["encoder_tokens"],
        attention_mask=batch["encoder_padding_mask"].long(),
        decoder_input_ids=batch["tokens"],
    ).logits


# ------------------------------------------------------------------------------------------- the shipped tiny configs
@pytest.mark.parametrize("family", ["t5", "bart", "opt"])
def test_tiny_config_trains_and_its_final_model_loads_in_transformers(family, cfg_for, recipe, tmp_path) -> None:
    """Each tiny config as shipped (T5: Adafactor, warmup_ratio, T=4, fp16) trains, validates, and writes an HF model
    that transformers loads with the logits of kdtune's own forward of it."""
    from kdtune.models import load_hf_model

    out = tmp_path / family
    summary = recipe("knowledge_distillation_single_device").train(cfg_for(family, out, "max_steps=6"))
    assert len(summary.steps) == 6 and len(summary.evals) == 2
    assert all(torch.isfinite(torch.tensor(s["loss"])) and s["kd_loss"] > 0 for s in summary.steps)
    if family == "t5":  # fp16 config: scaler metrics are logged
        assert all("loss_scale" in s and "skipped_steps" in s for s in summary.steps)
    else:
        assert summary.steps[-1]["loss"] < summary.steps[0]["loss"]
    before = load_file(Path(cfg_for(family, out).checkpointer.checkpoint_dir) / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    ours = load_hf_model(out / "final").eval()
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, 290, (2, 9), generator=g)}
    if family != "opt":
        batch["encoder_tokens"] = torch.randint(0, 290, (2, 11), generator=g)
        batch["encoder_padding_mask"] = torch.ones(2, 11, dtype=torch.bool)
        batch["encoder_padding_mask"][1, 7:] = False
    with torch.no_grad():
        want = _hf_logits(family, _hf(family, out / "final"), batch).float()
        kw = {k: v for k, v in batch.items() if k != "tokens"}
        got = ours(batch["tokens"], **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_first_step_losses_match_transformers_and_a_float64_formula(family, assets, cfg_for, recipe, tmp_path) -> None:
    """Step 1's logged loss/class_loss/kd_loss == transformers logits (float64) + CE and T²·KL(teacher‖student) over
    the decoder positions of the step's 2 micro-batches, divided by their total token count, mixed by kd_ratio=0.3."""
    import torch.nn.functional as F

    from kdtune.config import read_settings
    from kdtune.data import load_hf_tokenizer
    from kdtune.training import build_data
    from kdtune.training.settings import KDSettings

    T = 3.0
    extra = [*FP32, "max_steps=1", "batch_size=3", "gradient_accumulation_steps=2", "kd_ratio=0.3", f"temperature={T}"]
    cfg = cfg_for(family, tmp_path / "run", *extra)
    summary = recipe("knowledge_distillation_single_device").train(cfg)
    s = read_settings(KDSettings, cfg)
    _, micro_batches = next(build_data(s, load_hf_tokenizer(assets[f"{family}_student"], max_seq_len=64)).steps())
    student, teacher = _hf(family, assets[f"{family}_student"]), _hf(family, assets[f"{family}_teacher"])
    ce_sum = kl_sum = 0.0
    n = 0
    for batch in micro_batches:
        assert batch["encoder_padding_mask"].sum() < batch["encoder_padding_mask"].numel()  # padded sources
        with torch.no_grad():
            s_logits = _hf_logits(family, student, batch)[:, :-1]  # [B, T-1, V]
            t_logits = _hf_logits(family, teacher, batch)[:, :-1]
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


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_batch8_accum1_equals_batch2_accum4(family, cfg_for, recipe, tmp_path) -> None:
    kd = recipe("knowledge_distillation_single_device")
    common = [*FP32, "max_steps=3", "val_split_ratio=0.0", "save_every_n_steps=null", "eval_every_n_steps=null"]
    a = kd.train(cfg_for(family, tmp_path / "a", *common, "batch_size=8", "gradient_accumulation_steps=1"))
    b = kd.train(cfg_for(family, tmp_path / "b", *common, "batch_size=2", "gradient_accumulation_steps=4"))
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
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("family, dtype, group", [("bart", "fp32", False), ("t5", "fp16", False), ("t5", "fp32", True)])
def test_stop_and_resume_equals_straight_run(family, dtype, group, cfg_for, recipe, tmp_path) -> None:
    """6 steps over 2 epochs straight vs resumed from the mid-epoch checkpoint of step 2: identical later steps and
    final weights. The fp16 run also restores its loss scaler (a fresh scaler would skip step 3 again); with
    group_by_length the length-sorted order resumes where it was."""
    kd = recipe("knowledge_distillation_single_device")
    common = [f"dtype={dtype}", "epochs=2", "max_steps_per_epoch=3", "max_steps=null", "save_every_n_steps=2",
              "keep_last_n_checkpoints=5", "eval_every_n_steps=null", *(["+group_by_length=true"] if group else [])]  # fmt: skip
    out = tmp_path / "run"
    straight = kd.train(cfg_for(family, out, *common))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out, resumed_dir)
    for d in (resumed_dir / "checkpoints").iterdir():
        if d.name != "step_00000002":
            shutil.rmtree(d)
    shutil.rmtree(resumed_dir / "final")
    resumed = kd.train(cfg_for(family, resumed_dir, *common, "resume_from_checkpoint=true"))
    assert [s["step"] for s in resumed.steps] == [3, 4, 5, 6]
    keys = ("loss", "class_loss", "kd_loss", "lr", "num_tokens", "grad_norm")
    keys += ("loss_scale", "skipped_steps") if dtype == "fp16" else ()
    for key in keys:
        assert [s[key] for s in resumed.steps] == [s[key] for s in straight.steps[2:]], key
    wa, wb = load_file(out / "final" / "model.safetensors"), load_file(resumed_dir / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------------------- LoRA student, PEFT
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_lora_student_adapter_loads_in_peft(family, assets, cfg_for, recipe, tmp_path) -> None:
    from peft import PeftModel

    lora = ["+model.lora_attn_modules=[q_proj,v_proj,output_proj]", "+model.apply_lora_to_mlp=true",
            "+model.lora_rank=4", "+model.lora_alpha=8", "optimizer=torch.optim.AdamW", "optimizer.lr=1e-2"]  # fmt: skip
    out = tmp_path / "lora"
    summary = recipe("knowledge_distillation_single_device").train(cfg_for(family, out, *FP32, *lora, "max_steps=3"))
    assert len(summary.steps) == 3
    g = torch.Generator().manual_seed(1)
    batch = {
        "tokens": torch.randint(0, 290, (2, 7), generator=g),
        "encoder_tokens": torch.randint(0, 290, (2, 10), generator=g),
        "encoder_padding_mask": torch.ones(2, 10, dtype=torch.bool),
    }
    batch["encoder_padding_mask"][0, 6:] = False
    peft_model = PeftModel.from_pretrained(_hf(family, assets[f"{family}_student"]).float(), str(out / "final_adapter"))
    with torch.no_grad():
        peft_logits = _hf_logits(family, peft_model.eval(), batch)
        merged = _hf_logits(family, _hf(family, out / "final").float(), batch)
        base = _hf_logits(family, _hf(family, assets[f"{family}_student"]).float(), batch)
    torch.testing.assert_close(merged, peft_logits, atol=1e-5, rtol=1e-5)
    assert (merged - base).abs().max() > 1e-4  # the adapter changed the model


# ------------------------------------------------------------------------------------------- refusals
def test_causal_seq2seq_mix_is_refused_in_one_line(cfg_for, recipe, tmp_path) -> None:
    kd = recipe("knowledge_distillation_single_device")
    with pytest.raises(ConfigError, match="both must be causal or both seq2seq") as info:
        kd.train(cfg_for("t5", tmp_path / "a", "max_steps=1", teacher="opt"))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="both must be causal or both seq2seq"):
        kd.train(cfg_for("opt", tmp_path / "b", "max_steps=1", teacher="t5"))


def test_seq2seq_model_with_causal_data_is_refused(assets, cfg_for, recipe, tmp_path) -> None:
    cfg = cfg_for("bart", tmp_path / "a", "max_steps=1", "dataset=kdtune.data.text_completion_dataset",
                  f"dataset.data_files={assets['text_data']}", "~dataset.max_source_len", "~dataset.max_target_len")  # fmt: skip
    with pytest.raises(ConfigError, match="encoder-decoder.*seq2seq_dataset"):
        recipe("knowledge_distillation_single_device").train(cfg)


# ------------------------------------------------------------------------------------------- SFT recipes
@pytest.mark.parametrize("name, family, dtype", [("full_finetune_single_device", "t5", "fp16"),
                                                 ("lora_finetune_single_device", "bart", "fp32")])  # fmt: skip
def test_sft_recipes_train_encoder_decoder_models(name, family, dtype, cfg_for, recipe, tmp_path) -> None:
    """The fine-tuning recipes take the same seq2seq configs without the teacher keys (LoRA: a lora_* student)."""
    from omegaconf import OmegaConf

    cfg = cfg_for(family, tmp_path / "run", f"dtype={dtype}", "max_steps=4", "optimizer=torch.optim.AdamW",
                  "optimizer.lr=1e-2", "eval_every_n_steps=null")  # fmt: skip
    for key in ("teacher_model", "teacher_checkpointer", "teacher_tokenizer", "kd_loss", "kd_ratio", "temperature"):
        cfg.pop(key)
    if name.startswith("full"):
        cfg.pop("save_adapter_weights_only")
    else:
        cfg.model = OmegaConf.merge(cfg.model, {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4})
    cfg.recipe = name
    summary = recipe(name).train(cfg)
    assert len(summary.steps) == 4 and "kd_loss" not in summary.steps[0]
    assert summary.steps[-1]["loss"] < summary.steps[0]["loss"]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
