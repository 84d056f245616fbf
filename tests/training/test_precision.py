"""fp16 mixed precision on CPU (torch's CPU autocast runs fp16 matmuls): the :class:`Precision` object, an fp16 step
vs the same fp32 step, overflow -> a skipped step (no update, no schedule step, counted, the guard quiet), an overflow
at the minimum scale -> the NaN/inf guard, and the scaler's state round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from kdtune.errors import ConfigError
from kdtune.losses import DistillationObjective, ForwardKLLoss
from kdtune.models._family import registered_families
from kdtune.testing.models import tiny_hf_config
from kdtune.training import (
    NonFiniteLossError,
    Precision,
    StepAccumulator,
    get_constant_schedule_with_warmup,
    get_dtype,
    get_precision,
    optimizer_step,
    setup_runtime,
)


def _model(seed: int, dim: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = registered_families()["qwen2"].build(tiny_hf_config("qwen2", vocab_size=96, dim=dim, layers=2))
    model.init_weights(std=0.05)
    return model


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 96, (3, 17), generator=g)
    labels = tokens.clone()
    labels[:, :5] = -100
    labels[2, 11:] = -100
    return {"tokens": tokens, "labels": labels}


def _fp16(init_scale: float) -> Precision:
    return Precision("fp16", torch.float32, "cpu", torch.float16, torch.amp.GradScaler("cpu", init_scale=init_scale))


def _step(model, precision, objective, batches, *, lr: float = 1.0, scheduler: bool = False):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=4) if scheduler else None
    acc = StepAccumulator(model, precision=precision)
    for batch in batches:
        with precision.autocast():
            out = objective(model, batch)
        acc.backward(out)
    return optimizer_step(acc, model, opt, sched, clip_grad_norm=None, step=1), opt, sched


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_precision_from_config() -> None:
    fp32, bf16, fp16 = (get_precision(d, "cpu") for d in ("fp32", "bf16", "fp16"))
    assert (fp32.param_dtype, fp32.autocast_dtype, fp32.scaler) == (torch.float32, None, None)
    assert (bf16.param_dtype, bf16.autocast_dtype, bf16.scaler) == (torch.bfloat16, None, None)
    assert fp16.name == "fp16" and fp16.param_dtype is torch.float32 and fp16.autocast_dtype is torch.float16
    assert isinstance(fp16.scaler, torch.amp.GradScaler) and fp16.scaler.get_scale() == 2.0**16
    with fp16.autocast():
        assert torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4)).dtype is torch.float16
    with fp32.autocast():
        assert torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4)).dtype is torch.float32
    with pytest.raises(ConfigError, match="fp16 is mixed precision .* training recipes only"):
        get_dtype("fp16")


def test_setup_runtime_takes_fp16_only_for_training(tmp_path) -> None:
    rt = setup_runtime("cpu", "fp16", str(tmp_path / "a"), 0, mixed_precision=True)
    assert rt.dtype is torch.float32 and rt.precision.scaler is not None  # fp32 master weights
    with pytest.raises(ConfigError, match="fp16"):
        setup_runtime("cpu", "fp16", str(tmp_path / "b"), 0)  # an inference recipe: no loss scaling there
    assert setup_runtime("cpu", "bf16", str(tmp_path / "c"), 0, mixed_precision=True).precision.scaler is None


@pytest.mark.parametrize("kd", [False, True])
def test_fp16_step_equals_fp32_step_within_fp16_tolerance(kd: bool) -> None:
    """The same micro-batches through an fp32 step and an fp16 mixed-precision step (a loss scale that does not
    overflow): losses, gradient norm and the SGD update agree to fp16 precision; the master weights stay fp32."""
    student = _model(0)
    teacher = _model(1, dim=48).eval() if kd else None
    objective = DistillationObjective(
        ForwardKLLoss() if kd else None, teacher=teacher, kd_ratio=0.5, temperature=2.0, num_output_chunks=3
    )
    batches = [_batch(0), _batch(1)]
    s32, s16 = copy.deepcopy(student), copy.deepcopy(student)
    r32, _, _ = _step(s32, Precision("fp32", torch.float32), objective, batches, lr=1.0)
    r16, _, _ = _step(s16, _fp16(2.0**8), objective, batches, lr=1.0)
    assert not r16.skipped and r16.skipped_steps == 0 and r16.loss_scale == 2.0**8
    assert r16.loss == pytest.approx(r32.loss, rel=2e-3)
    if kd:
        assert r16.kd_loss == pytest.approx(r32.kd_loss, rel=2e-2, abs=1e-4)
    assert r16.grad_norm == pytest.approx(r32.grad_norm, rel=1e-2)
    base = _flat(student)
    d32, d16 = _flat(s32) - base, _flat(s16) - base  # the update = -grad (SGD, lr 1)
    assert ((d16 - d32).norm() / d32.norm()).item() < 1e-2
    assert all(p.dtype is torch.float32 for p in s16.parameters())


def test_overflow_skips_the_step_without_tripping_the_guard() -> None:
    """A loss scale that overflows the fp16 backward: no update, no optimizer state, no schedule step, the scale
    halves and the step is counted; the next step at the lower scale updates."""
    model = _model(0)
    objective = DistillationObjective(num_output_chunks=2)
    precision = _fp16(2.0**40)
    before = _flat(model).clone()
    result, opt, sched = _step(model, precision, objective, [_batch(0)], lr=0.1, scheduler=True)
    assert result.skipped and result.skipped_steps == 1 and precision.skipped_steps == 1
    assert not torch.isfinite(torch.tensor(result.grad_norm)) and torch.isfinite(torch.tensor(result.loss))
    assert torch.equal(_flat(model), before) and not opt.state and sched.last_epoch == 0
    assert precision.scaler.get_scale() == 2.0**39 and result.loss_scale == 2.0**40
    assert all(p.grad is None for p in model.parameters())
    precision.scaler.update(2.0**6)  # as if it had backed off far enough
    result2, _, _ = _step(model, precision, objective, [_batch(1)], lr=0.1)
    assert not result2.skipped and result2.skipped_steps == 1 and not torch.equal(_flat(model), before)


def test_overflow_at_the_minimum_scale_trips_the_guard() -> None:
    """Gradients that are non-finite even unscaled (scale 1) are not an fp16 overflow: the run stops, weights kept."""
    model = _model(0)
    model.tok_embeddings.weight.register_hook(lambda g: g * float("inf"))
    before = _flat(model).clone()
    with pytest.raises(NonFiniteLossError, match="grad_norm is (inf|nan) at step 1"):
        _step(model, _fp16(1.0), DistillationObjective(num_output_chunks=1), [_batch(0)], lr=0.1)
    assert torch.equal(_flat(model), before)


def test_scaler_state_round_trip() -> None:
    a = _fp16(2.0**7)
    a.skipped_steps = 3
    state = a.state_dict()
    b = get_precision("fp16", "cpu")
    b.load_state_dict(state)
    assert b.scaler.get_scale() == 2.0**7 and b.skipped_steps == 3 and b.state_dict() == state
    assert get_precision("fp32").state_dict() == {}
    b.load_state_dict(None)  # a checkpoint of an fp32 run: the scaler keeps its state
    assert b.scaler.get_scale() == 2.0**7
