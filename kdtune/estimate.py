"""``kdtune estimate``: a run's peak memory per component before it starts, and its step time from calibration steps.

The memory model is the recipe's own step replayed on *fake* tensors (``torch._subclasses.FakeTensorMode``: shapes,
dtypes, devices and kernel choices, no storage): the student and the teacher are built from their config nodes exactly
as the run builds them (exact parameter counts and dtypes, LoRA adapters, tied embeddings), then one or two
micro-batches of the configured shape go through the teacher forward, the student forward, the output layer + loss
and the backward, under :class:`LiveTensorTracker`, which follows every tensor storage the step allocates and frees.
So activations (with or without activation checkpointing), attention kernels' saved tensors and backward transients
come from the real modules, not from a formula. The output layer + loss is accounted per chunk from the objective's
chunking (:func:`kdtune.losses.fused.chunk_slices`): ``chunk rows × vocab × 4 bytes × fp32 tensors alive`` plus the
fused path's stored gradients. Optimizer state follows the optimizer class (AdamW two states per trainable element,
SGD one with momentum, Adafactor factored second moments, ...).

What "peak memory" means here (and what ``--calibrate`` and the tests measure): the most bytes of tensor storage
alive on the device at once during a steady-state optimizer step (optimizer state allocated), weights included; on
CUDA that is ``torch.cuda.max_memory_allocated``; on CPU the CPU allocator's live bytes (the profiler's memory
events). The process's own memory (Python, libraries; ~0.3-1 GiB on CPU) and allocator caching come on top; the
calibration also reports the peak RSS growth for that reason.

Default batch shape: ``batch_size`` sequences of the longest allowed length (the tokenizer's or dataset's
``max_seq_len``; a packed dataset always fills it) with every position trained: the worst case the run can meet.
"""

from __future__ import annotations

import contextlib
import math
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from kdtune.config import find_recipe, import_component, instantiate, read_settings
from kdtune.data.collate import model_inputs
from kdtune.errors import ConfigError, KDTuneError
from kdtune.losses import ForwardKLLoss
from kdtune.losses.fused import VOCAB_TENSORS_PER_ROW, chunk_slices, fused_output_weight
from kdtune.models import enable_activation_checkpointing
from kdtune.perf import configure_cpu_process
from kdtune.training import (
    Runtime,
    StepAccumulator,
    build_data,
    build_lr_scheduler,
    build_model,
    build_objective,
    build_optimizer,
    build_teacher,
    build_tokenizer,
    get_device,
    get_precision,
    optimizer_step,
    reset_peak_memory,
    set_seed,
    to_device,
    trainable_parameters,
)

__all__ = [
    "Calibration",
    "LiveTensorTracker",
    "MemoryEstimate",
    "MemoryRow",
    "calibrate",
    "estimate_memory",
    "format_report",
    "optimizer_state_bytes",
]

GIB = float(2**30)


# ------------------------------------------------------------------------------------------------- live storage
class LiveTensorTracker(TorchDispatchMode):
    """Follows the bytes of tensor storage alive that ops allocated while the mode is on, and their peak.

    Every op's output storages are recorded (views share a storage and count once); a storage counts until it is
    freed (checked through weak references). Storages that existed before (weights, optimizer state) are not counted:
    add them yourself. Works on real and fake tensors alike.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.add(t)
        return out

    def add(self, t: Tensor) -> None:
        """Count ``t``'s storage if it is new."""
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        known = self._live.get(ref.cdata)
        if known is not None:
            if not known[0].expired():
                return
            self.current -= known[1]  # the address was freed and reused
        nbytes = int(storage.nbytes())
        self._live[ref.cdata] = (ref, nbytes)
        self.current += nbytes
        if self.current > self.peak:  # stale entries only over-count: sweep before raising the peak
            self.sweep()
            self.peak = max(self.peak, self.current)

    def ignore(self, tensors: Sequence[Tensor]) -> None:
        """Treat the storages of ``tensors`` as pre-existing (never counted, even when an op returns them)."""
        for t in tensors:
            ref = StorageWeakRef(t.untyped_storage())
            self._live[ref.cdata] = (ref, 0)

    def sweep(self) -> int:
        """Drop freed storages; return the live bytes."""
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]
        return self.current


# ------------------------------------------------------------------------------------------------ optimizer state
#: optimizer class name -> (full-size states per trainable element, whether second moments are factored)
_OPTIMIZER_STATES = {
    "AdamW": 2,
    "Adam": 2,
    "NAdam": 2,
    "RAdam": 2,
    "Adamax": 2,
    "Adagrad": 1,
    "Adadelta": 2,
    "ASGD": 1,
    "Rprop": 2,
}


def optimizer_state_bytes(optimizer_cfg: DictConfig, params: Sequence[Tensor]) -> tuple[int, str]:
    """Bytes of optimizer state for ``params`` (trainable), from the optimizer class and its arguments.

    AdamW/Adam/NAdam/RAdam/Adamax: two states of each parameter's size (three with ``amsgrad``); SGD: one with
    ``momentum > 0``, else none; RMSprop: one (+ one with momentum, + one centred); Adagrad: one; Adafactor: factored
    second moments (a row and a column vector per matrix, a full one per vector). Per-parameter step counters are
    ignored (a few bytes each).

    Returns:
        ``(bytes, note)``; the note says what was assumed for an unknown class (two states).
    """
    target = str(optimizer_cfg.get("_component_", ""))
    name = target.rsplit(".", 1)[-1]
    elems = [p.numel() * p.element_size() for p in params]
    total = sum(elems)
    if name == "SGD":
        n = 1 if float(optimizer_cfg.get("momentum", 0.0) or 0.0) > 0 else 0
        return n * total, f"SGD: {n} state(s) per parameter"
    if name == "RMSprop":
        n = 1 + (float(optimizer_cfg.get("momentum", 0.0) or 0.0) > 0) + bool(optimizer_cfg.get("centered", False))
        return n * total, f"RMSprop: {n} state(s) per parameter"
    if name == "Adafactor":
        size = 0
        for p in params:
            if p.dim() >= 2:  # row [.., m, 1] and column [.., 1, n] second moments
                lead = math.prod(p.shape[:-2])
                size += lead * (p.shape[-2] + p.shape[-1]) * p.element_size()
            else:
                size += p.numel() * p.element_size()
        return size, "Adafactor: factored second moments"
    if name in _OPTIMIZER_STATES:
        n = _OPTIMIZER_STATES[name] + (1 if name in ("Adam", "AdamW") and optimizer_cfg.get("amsgrad", False) else 0)
        return n * total, f"{name}: {n} state(s) per parameter"
    return 2 * total, f"{name or target}: unknown optimizer, assumed 2 states per parameter"


def _optimizer_step_temp_bytes(optimizer_cfg: DictConfig, params: Sequence[Tensor], device: torch.device) -> int:
    """Temporaries of one optimizer step: the per-parameter implementation (CPU default) makes one parameter-sized
    temporary at a time; the multi-tensor one (CUDA default) one per parameter at once; ``fused=True`` none."""
    if not params or optimizer_cfg.get("fused", False):
        return 0
    foreach = optimizer_cfg.get("foreach", None)
    if foreach is None:
        foreach = device.type == "cuda"
    sizes = [p.numel() * p.element_size() for p in params]
    return sum(sizes) if foreach else max(sizes)


# ------------------------------------------------------------------------------------------------------- result
@dataclass
class MemoryRow:
    """One line of the table: a component, its bytes and how it was obtained."""

    name: str
    nbytes: int
    note: str = ""


@dataclass
class MemoryEstimate:
    """The estimate of one configuration.

    Attributes:
        rows: per-component bytes (not additive: activations and the loss chunk are parts of the step's transient).
        peak_bytes: the estimated peak of live tensor bytes during a steady-state step.
        peak_phase: where the peak falls (``forward + loss``, ``backward``, ``teacher forward``, ``optimizer step``).
        batch_size, seq_len, trained_tokens: the micro-batch shape estimated.
        flops_per_step: matmul/attention FLOPs of one optimizer step (forward + backward, both models, output layers).
        device: the device the estimate is for.
    """

    rows: list[MemoryRow]
    peak_bytes: int
    peak_phase: str
    batch_size: int
    seq_len: int
    trained_tokens: int
    flops_per_step: float
    device: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Calibration:
    """What ``--calibrate N`` measured.

    Attributes:
        steps: optimizer steps run (plus one profiled step on CPU).
        step_seconds: median wall time of the timed steps after the first (data loading and optimizer step included).
        tokens_per_second: trained tokens per second of those steps.
        peak_bytes: measured peak live tensor bytes of a steady-state step (see the module docstring).
        rss_growth_bytes: CPU: growth of the process's peak RSS over the RSS before the models were built.
        shapes: per micro-batch of the measured step: ``(seq_len, trained_tokens)``.
        estimate: the estimate at the measured step's shapes.
    """

    steps: int
    step_seconds: float
    tokens_per_second: float
    peak_bytes: int
    rss_growth_bytes: int | None
    shapes: list[tuple[int, int]]
    estimate: MemoryEstimate


# -------------------------------------------------------------------------------------------------- settings
def _settings(cfg: DictConfig) -> Any:
    recipe_name = cfg.get("recipe") if "recipe" in cfg.keys() else None
    if recipe_name is None:
        raise ConfigError("recipe: the config names no recipe; add `recipe: <name>` (see `kdtune ls`)")
    recipe = find_recipe(str(recipe_name))
    if not recipe.settings:
        raise ConfigError(f"recipe: {recipe.name} declares no RECIPE_SETTINGS; kdtune estimate needs a training recipe")
    settings = read_settings(import_component(recipe.settings, "RECIPE_SETTINGS"), cfg)
    for key in ("model", "optimizer", "batch_size"):
        if not hasattr(settings, key):
            raise ConfigError(f"recipe: {recipe.name} is not a training recipe (no `{key}`); kdtune estimate needs one")
    return settings


def _max_seq_len(settings: Any) -> int | None:
    for node in (settings.dataset, settings.tokenizer):
        if isinstance(node, DictConfig) and node.get("max_seq_len") is not None:
            return int(node.get("max_seq_len"))
    return None


def _packed(settings: Any) -> bool:
    return isinstance(settings.dataset, DictConfig) and bool(settings.dataset.get("packed", False))


def _is_kd(settings: Any) -> bool:
    return getattr(settings, "kd_loss", None) is not None


# ------------------------------------------------------------------------------------------------ the fake step
def _unique_bytes(tensors: Sequence[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[StorageWeakRef(st).cdata] = int(st.nbytes())
    return sum(seen.values())


def _model_tensors(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


def _build_fake(model_cfg: DictConfig, key: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = instantiate(model_cfg)
    except KDTuneError:
        raise
    except Exception as e:  # noqa: BLE001 - a builder that cannot run without real data
        raise ConfigError(
            f"{key}: could not build the model without weights for the estimate ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); estimates need a kdtune model builder"
        ) from e
    finally:
        torch.set_default_dtype(prev)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{key}: _component_ built a {type(model).__name__}, not a model; use a kdtune.models builder"
        )
    if getattr(model, "is_encoder_decoder", False):
        raise ConfigError(
            f"{key}: kdtune estimate does not model encoder-decoder (seq2seq) models yet; use --calibrate"
        )
    return model


def _chunk_tensors(kd: bool, fast: bool, *, compiled: bool, cpu: bool, shared: bool) -> int:
    """fp32 ``[rows, vocab]`` tensors alive at once in one chunk of the objective's output layer + loss.

    ``compiled``: ``compile: true`` (the chunk loss through torch.compile); ``cpu``: the device is a CPU (row blocks
    of the eager loss stay cache-sized there, one block is the whole chunk elsewhere); ``shared``: T = 1 on a shared
    vocabulary (the eager loss then needs no buffer for the student's tempered log-probabilities).
    """
    if not kd:
        return 2  # logits, log-softmax (its buffer becomes the gradient)
    if not fast:
        return VOCAB_TENSORS_PER_ROW  # any divergence through autograd: the objective's own budget figure
    if compiled:
        return 3  # the student's and the teacher's logits, and the gradient (a tensor of its own)
    # ce_forward_kl: the student's logits (overwritten by their gradient) and the teacher's logits; on a CPU everything
    # else it holds is a few row blocks of at most BLOCK_ELEMENTS logits each, on an accelerator two (three) buffers
    # of the whole chunk
    return 2 if cpu else (4 if shared else 5)


def _batch(b: int, t: int, vocab: int, packed: bool, device: torch.device) -> dict[str, Tensor]:
    tokens = torch.zeros(b, t, dtype=torch.long, device=device)
    batch = {"tokens": tokens, "labels": tokens.clone()}
    if packed:
        batch["input_pos"] = torch.zeros(b, t, dtype=torch.long, device=device)
        batch["document_ids"] = torch.zeros(b, t, dtype=torch.long, device=device)
    return batch


def _positions(b: int, t: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row-major (batch, position) indices of ``n`` trained positions among ``[b, t - 1]``."""
    flat = torch.arange(n, device=device)
    return flat // (t - 1), flat % (t - 1)


def estimate_memory(
    cfg: DictConfig,
    *,
    seq_len: int | None = None,
    trained_tokens: int | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
) -> MemoryEstimate:
    """Estimate a training config's peak memory per component (nothing is allocated; see the module docstring).

    Args:
        cfg: the run's config (overrides applied).
        seq_len: sequence length of every micro-batch; default the ``max_seq_len`` of the dataset or tokenizer.
        trained_tokens: trained positions per micro-batch; default all of them (``batch_size × (seq_len − 1)``).
        shapes: instead of the two above, ``(seq_len, trained_tokens)`` of each micro-batch of a step, in order.

    Returns:
        The :class:`MemoryEstimate`.

    Raises:
        ConfigError: the config is not a training config, or a value the estimate needs is missing.
    """
    s = _settings(cfg)
    kd = _is_kd(s)
    device = torch.device(s.device) if str(s.device).startswith("cuda") else get_device(s.device)
    notes: list[str] = []
    fake_device = device
    if device.type == "cuda" and not torch.cuda.is_available():
        fake_device = torch.device("cpu")
        notes.append("no CUDA here: kernels chosen as on CPU (attention's saved tensors may differ on a GPU)")
    precision = get_precision(s.dtype, device)
    dtype = precision.param_dtype
    b = int(s.batch_size)
    grad_accum = int(getattr(s, "gradient_accumulation_steps", 1))
    if shapes is None:
        t = seq_len if seq_len is not None else _max_seq_len(s)
        if t is None:
            raise ConfigError("seq_len unknown: set tokenizer.max_seq_len or dataset.max_seq_len, or pass --seq-len N")
        if t < 2:
            raise ConfigError(f"seq_len={t} is too short: a trained sequence needs at least 2 tokens")
        n = trained_tokens if trained_tokens is not None else b * (t - 1)
        shapes = [(int(t), int(n))] * min(grad_accum, 2)  # from the 2nd micro-batch on, gradients exist
    if kd and getattr(s, "teacher_logits", None) is not None:
        notes.append("cached teacher (teacher_logits): its per-position top-k state is not counted")

    rows: list[MemoryRow] = []
    with FakeTensorMode():
        student = _build_fake(s.model, "model", dtype, fake_device)
        teacher = None
        if kd and getattr(s, "teacher_model", None) is not None:
            teacher = _build_fake(s.teacher_model, "teacher_model", dtype, fake_device)
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        if s.enable_activation_checkpointing:
            enable_activation_checkpointing(student)
        trainable = [p for p in student.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("model: the model has no trainable parameters; check lora_attn_modules / the builder")
        w_student = _unique_bytes(_model_tensors(student))
        w_teacher = _unique_bytes(_model_tensors(teacher)) if teacher is not None else 0
        grads = _unique_bytes(trainable)
        opt_bytes, opt_note = optimizer_state_bytes(s.optimizer, trainable)
        opt_temp = _optimizer_step_temp_bytes(s.optimizer, trainable, device)
        n_train = sum(p.numel() for p in trainable)
        n_total = sum(p.numel() for p in student.parameters())
        rows.append(
            MemoryRow("student weights", w_student, f"{n_total / 1e6:.2f}M params, {dtype}".replace("torch.", ""))
        )
        if teacher is not None:
            n_t = sum(p.numel() for p in teacher.parameters())
            rows.append(MemoryRow("teacher weights", w_teacher, f"{n_t / 1e6:.2f}M params, frozen"))
        rows.append(MemoryRow("gradients", grads, f"{n_train / 1e6:.3f}M trainable params"))
        rows.append(MemoryRow("optimizer state", opt_bytes, opt_note))

        fast = kd and type(instantiate(s.kd_loss)) is ForwardKLLoss and teacher is not None
        vocab = int(student.vocab_size)
        t_vocab = int(teacher.vocab_size) if teacher is not None else 0
        shared = not kd or (s.temperature == 1.0 and t_vocab >= vocab)
        k_vocab = _chunk_tensors(kd, fast, compiled=s.compile, cpu=device.type == "cpu", shared=shared)
        packed = _packed(s)
        tracker = LiveTensorTracker()
        tracker.ignore([*_model_tensors(student), *(_model_tensors(teacher) if teacher is not None else [])])
        phase_peaks: dict[str, int] = {}
        act_bytes = loss_bytes = teacher_bytes = 0
        student.train()
        with tracker:
            for t, n in shapes:
                n = max(1, min(int(n), b * (t - 1)))
                batch = _batch(b, t, vocab, packed, fake_device)
                rb, rt = _positions(b, t, n, fake_device)
                base = tracker.sweep()
                tracker.peak = base
                # 1. teacher forward (no graph); its hidden states at the trained positions are kept
                t_state = None
                if teacher is not None:
                    with torch.no_grad():
                        hidden_t = teacher(batch["tokens"], return_hidden=True, **model_inputs(batch))  # [B, T, Dt]
                        t_state = hidden_t[:, :-1][rb, rt]  # [N, Dt]
                        del hidden_t
                    teacher_bytes = max(teacher_bytes, tracker.peak - base)
                    phase_peaks["teacher forward"] = max(phase_peaks.get("teacher forward", 0), tracker.peak)
                # 2. student forward
                with precision.autocast():
                    hidden = student(batch["tokens"], return_hidden=True, **model_inputs(batch))  # [B, T, D]
                act_bytes = max(
                    act_bytes, tracker.sweep() - base - _unique_bytes([t_state] if t_state is not None else [])
                )
                tracker.peak = tracker.current
                h_s = hidden[:, :-1][rb, rt]  # [N, D]
                del hidden  # the objective drops the full hidden states; its indexing saves none of them
                # 3. output layer + loss, chunk by chunk; the fused path keeps d loss / d hidden (and d W) for backward
                weight = fused_output_weight(student)
                fused = weight is not None and weight.dtype == h_s.dtype
                slices = chunk_slices(n, vocab, num_output_chunks=s.num_output_chunks, memory_budget_bytes=None)
                rows_max = max(sl.stop - sl.start for sl in slices)
                with torch.no_grad():
                    grad_h = torch.zeros_like(h_s)  # [N, D]
                    grad_w = torch.zeros_like(weight) if fused and weight.requires_grad else None  # [V, D]
                    before = tracker.current
                    # the chunk's fp32 [rows, V] tensors; the teacher's logits are wider by its padded columns
                    width = vocab * k_vocab + (max(0, t_vocab - vocab) if teacher is not None else 0)
                    chunk = torch.empty(rows_max, width, dtype=torch.float32, device=fake_device)
                    loss_bytes = max(loss_bytes, tracker.peak - before + (grad_h.nbytes if fused else 0))
                    del chunk
                phase_peaks["forward + loss"] = max(phase_peaks.get("forward + loss", 0), tracker.peak)
                del t_state
                unfused = "unfused output layer (no single output weight): chunks recomputed in backward"
                if not fused and unfused not in notes:
                    notes.append(unfused)
                tracker.peak = tracker.sweep()
                # 4. backward: through the student; output weight's gradient from the fused path
                h_s.backward(grad_h)
                if not fused:
                    with torch.no_grad():
                        torch.empty(rows_max, vocab * k_vocab, dtype=torch.float32, device=fake_device)
                del grad_h, h_s
                if grad_w is not None:
                    if weight.grad is None:
                        weight.grad = grad_w
                    else:
                        weight.grad.add_(grad_w)
                    del grad_w
                phase_peaks["backward"] = max(phase_peaks.get("backward", 0), tracker.peak)
            # 5. optimizer step: gradients + the step's temporaries
            grads_live = tracker.sweep()
            phase_peaks["optimizer step"] = grads_live + opt_temp
        for p in student.parameters():
            p.grad = None
        body_flops = _body_flops(student, teacher, b, shapes, vocab, packed, fake_device, precision)
        # with activation checkpointing off, what turning it on would keep (and the other way round)
        alt = _activation_bytes(
            student, b, shapes[-1][0], vocab, packed, fake_device, precision, not s.enable_activation_checkpointing
        )

    ac_on = bool(s.enable_activation_checkpointing)
    rows.append(
        MemoryRow(
            "activations (checkpointed)" if ac_on else "activations",
            act_bytes,
            f"kept for backward, B={b} T={shapes[-1][0]}; activation checkpointing "
            f"{'on' if ac_on else 'off'} (configured)",
        )
    )
    rows.append(
        MemoryRow(
            "activations (not checkpointed)" if ac_on else "activations (checkpointed)",
            alt,
            f"if enable_activation_checkpointing={str(not ac_on).lower()}",
        )
    )
    rows.append(
        MemoryRow(
            "KD loss chunk" if kd else "loss chunk",
            loss_bytes,
            f"{rows_max} rows x {vocab} vocab x 4 B x {k_vocab} tensors + stored d loss/d hidden",
        )
    )
    if teacher is not None:
        rows.append(MemoryRow("teacher forward", teacher_bytes, "working memory of its forward + kept hidden states"))
    rows.append(MemoryRow("KV cache (on-policy generation)", 0, "not configured: this recipe generates nothing"))
    base_bytes = w_student + w_teacher + opt_bytes
    phase, top = max(phase_peaks.items(), key=lambda kv: kv[1])
    n_tok = sum(n for _, n in shapes)
    steps_flops = body_flops * grad_accum / len(shapes)
    # output layers (the fused path's GEMMs run under no_grad on fake tensors too, but count them explicitly)
    out_flops = _output_layer_flops(student, n_tok, trains=weight is not None and weight.requires_grad, backward=True)
    if teacher is not None:
        out_flops += _output_layer_flops(teacher, n_tok, trains=False, backward=False)
    return MemoryEstimate(
        rows=rows,
        peak_bytes=base_bytes + top,
        peak_phase=phase,
        batch_size=b,
        seq_len=shapes[-1][0],
        trained_tokens=shapes[-1][1],
        flops_per_step=steps_flops + out_flops * grad_accum / len(shapes),
        device=str(device),
        notes=notes,
    )


def _output_layer_flops(model: nn.Module, rows: int, *, trains: bool, backward: bool) -> float:
    """FLOPs of the output layer on ``rows`` positions: the logits GEMM, plus d hidden (and d W when it trains)."""
    output = getattr(model, "output", None)
    weight = output.weight if output is not None else model.tok_embeddings.weight  # [V, D]
    gemm = 2.0 * rows * weight.shape[0] * weight.shape[1]
    return gemm * (1 + (1 if backward else 0) + (1 if backward and trains else 0))


def _body_flops(
    student: nn.Module,
    teacher: nn.Module | None,
    b: int,
    shapes: Sequence[tuple[int, int]],
    vocab: int,
    packed: bool,
    device: torch.device,
    precision: Any,
) -> float:
    """Matmul and attention FLOPs of the teacher's forward and the student's forward + backward for ``shapes``
    (a pass of its own: the FLOP counter keeps tensors alive, so it must not run under the memory tracker)."""
    counter = FlopCounterMode(display=False)
    with counter:
        for t, _ in shapes:
            batch = _batch(b, t, vocab, packed, device)
            if teacher is not None:
                with torch.no_grad():
                    teacher(batch["tokens"], return_hidden=True, **model_inputs(batch))
            with precision.autocast():
                hidden = student(batch["tokens"], return_hidden=True, **model_inputs(batch))  # [B, T, D]
            hidden.backward(torch.zeros_like(hidden))
    for p in student.parameters():
        p.grad = None
    return float(counter.get_total_flops())


def _activation_bytes(
    student: nn.Module,
    b: int,
    t: int,
    vocab: int,
    packed: bool,
    device: torch.device,
    precision: Any,
    checkpointed: bool,
) -> int:
    """Bytes the student's forward keeps for backward (and its output) with activation checkpointing on or off."""
    was = any(getattr(m, "activation_checkpointing", False) for m in student.modules())
    enable_activation_checkpointing(student, checkpointed)
    try:
        batch = _batch(b, t, vocab, packed, device)
        tracker = LiveTensorTracker()
        tracker.ignore(_model_tensors(student))
        with tracker, precision.autocast():
            hidden = student(batch["tokens"], return_hidden=True, **model_inputs(batch))  # [B, T, D]
            kept = tracker.sweep() - _unique_bytes([batch["tokens"]])
        del hidden
    finally:
        enable_activation_checkpointing(student, was)
    return kept


# ------------------------------------------------------------------------------------------------- calibration
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _live_state_bytes(models: Sequence[nn.Module | None], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors a step starts with: weights, buffers, optimizer state, leftover gradients."""
    tensors: list[Tensor] = []
    for m in models:
        if m is not None:
            tensors += _model_tensors(m)
            tensors += [p.grad for p in m.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, Tensor)]
    return _unique_bytes(tensors)


@contextlib.contextmanager
def _cpu_allocations() -> Iterator[list[int]]:
    """Yields a list that receives, on exit, the peak growth of the CPU allocator's live bytes inside the block
    (from the profiler's memory events: every allocation and free of the CPU allocator, in time order)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415 - only when measuring

    result: list[int] = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    events.sort(key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += int(e.nbytes())
        peak = max(peak, now)
    result.append(peak)


def calibrate(cfg: DictConfig, steps: int = 3) -> Calibration:
    """Run ``steps`` real optimizer steps of the config's recipe pieces on its device and measure them.

    The models, data, teacher, objective and optimizer are built exactly as the recipe builds them (nothing is
    written: no output directory, no checkpoints). Step time: the median wall time of the steps after the first (data
    loading, forward, backward and the optimizer step). Peak memory of a steady-state step (see the module
    docstring): on CUDA ``max_memory_allocated`` over the steps after the first; on CPU one more step runs under the
    profiler and its CPU-allocator peak is added to the weights and optimizer state it starts with.

    Args:
        cfg: the run's config.
        steps: optimizer steps to time (>= 2).

    Returns:
        The :class:`Calibration`, with the estimate at the measured step's micro-batch shapes.
    """
    if steps < 2:
        raise ConfigError(f"--calibrate {steps}: give at least 2 steps (the first one is warm-up)")
    s = _settings(cfg)
    kd = _is_kd(s)
    dev = get_device(s.device)
    precision = get_precision(s.dtype, dev)
    set_seed(s.seed, deterministic=getattr(s, "deterministic", False))
    if dev.type == "cpu":
        configure_cpu_process()  # as setup_runtime does, so the calibrated step time is the run's
    rss_before = _rss_bytes()
    with tempfile.TemporaryDirectory(prefix="kdtune-estimate-") as tmp:
        rt = Runtime(device=dev, dtype=precision.param_dtype, output_dir=Path(tmp), precision=precision)
        student, _ = build_model(
            s.model,
            s.checkpointer,
            rt,
            activation_checkpointing=s.enable_activation_checkpointing,
            compile=s.compile,
            lora_seed=s.seed,
        )
        tokenizer = build_tokenizer(s.tokenizer)
        data = build_data(s, tokenizer)
        teacher_model: nn.Module | None = None
        teacher = None
        if kd:

            def load_teacher() -> nn.Module:
                return build_model(s.teacher_model, s.teacher_checkpointer, rt, key="teacher_model")[0]

            teacher = build_teacher(s, student, tokenizer, data, load_teacher)
            teacher_model = getattr(teacher, "model", None)
        objective = build_objective(s, teacher)
        optimizer = build_optimizer(s.optimizer, trainable_parameters(student))
        scheduler = build_lr_scheduler(s.lr_scheduler, optimizer, data.total_steps)
        acc = StepAccumulator(student, precision=rt.precision)
        it = data.steps()

        def one_step() -> tuple[int, list[tuple[int, int]]]:
            pos, micro = next(it)
            student.train()
            tokens, shapes = 0, []
            for batch in micro:
                n = int((batch["labels"][:, 1:] != objective.ignore_index).sum())
                shapes.append((int(batch["tokens"].shape[1]), n))
                with rt.precision.autocast():
                    out = objective(student, to_device(batch, rt.device))
                acc.backward(out)
                tokens += n
            optimizer_step(acc, student, optimizer, scheduler, s.clip_grad_norm, pos.global_step)
            return tokens, shapes

        if data.total_steps < steps + (dev.type == "cpu"):
            raise ConfigError(
                f"--calibrate {steps}: the run has only {data.total_steps} steps; lower --calibrate or raise max_steps"
            )
        times, toks = [], []
        peak_shapes: list[tuple[int, int]] = []
        peak = 0
        for i in range(steps):
            if i == 1 and dev.type == "cuda":
                torch.cuda.synchronize(dev)
                reset_peak_memory(dev)
            t0 = time.perf_counter()
            n, shapes = one_step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i:
                times.append(time.perf_counter() - t0)
                toks.append(n)
                if max(shapes) > max(peak_shapes, default=(0, 0)):
                    peak_shapes = shapes
        if dev.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(dev))
        else:  # one more steady-state step under the profiler
            base = _live_state_bytes([student, teacher_model], optimizer)
            with _cpu_allocations() as growth:
                _, peak_shapes = one_step()
            peak = base + growth[0]
        rss_growth = max(0, _peak_rss_bytes() - rss_before) if dev.type == "cpu" else None
    step_s = statistics.median(times)
    est = estimate_memory(cfg, shapes=peak_shapes)
    tps = sum(toks) / sum(times)
    return Calibration(steps, step_s, tps, peak, rss_growth, peak_shapes, est)


# ------------------------------------------------------------------------------------------------------ report
def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_flops(n: float) -> str:
    """``n`` FLOP(s) in the largest unit that keeps a leading digit: "812.40 GFLOP", "2.65 PFLOP"."""
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1e9:.2f} GFLOP"


def format_report(est: MemoryEstimate, cal: Calibration | None = None) -> str:
    """The table ``kdtune estimate`` prints."""
    width = max(len(r.name) for r in est.rows) + 2
    lines = [
        f"memory estimate on {est.device} for micro-batches of {est.batch_size} x {est.seq_len} tokens "
        f"({est.trained_tokens} trained):",
        f"  {'component':<{width}}{'memory':>12}  how",
    ]
    for r in est.rows:
        lines.append(f"  {r.name:<{width}}{_fmt_bytes(r.nbytes):>12}  {r.note}")
    lines.append(f"  {'peak (tensors)':<{width}}{_fmt_bytes(est.peak_bytes):>12}  during the {est.peak_phase}")
    lines.append(f"  FLOPs per optimizer step: {_fmt_flops(est.flops_per_step)} (matmuls and attention)")
    lines += [f"  note: {n}" for n in est.notes]
    if cal is not None:
        e = cal.estimate
        err = (e.peak_bytes - cal.peak_bytes) / max(cal.peak_bytes, 1) * 100
        lines.append(f"calibration ({cal.steps} steps on {e.device}):")
        lines.append(
            f"  step time {cal.step_seconds:.3f} s (median after the first), {cal.tokens_per_second:.0f} trained tokens/s"
            + (f", {_fmt_flops(e.flops_per_step / cal.step_seconds)}/s" if e.flops_per_step else "")
        )
        shapes = ", ".join(f"{t}x{n}" for t, n in cal.shapes)
        lines.append(
            f"  measured peak (tensors) {_fmt_bytes(cal.peak_bytes)}; estimate at the measured shapes (T x trained: "
            f"{shapes}) {_fmt_bytes(e.peak_bytes)} ({err:+.1f} %)"
        )
        if cal.rss_growth_bytes is not None:
            lines.append(
                f"  process peak RSS growth {_fmt_bytes(cal.rss_growth_bytes)} (tensors + allocator + libraries)"
            )
    return "\n".join(lines)
