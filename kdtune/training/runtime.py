"""Where and how a recipe computes: the :class:`Runtime` (device, dtype, output layout), the :class:`Precision` (weights
dtype, autocast, fp16 loss scaling), device, seeding, gradient clipping, memory and NaN/inf guards, and which process
this is (rank queries that work with or without a process group)."""

from __future__ import annotations

import math
import os
import random
import re
import resource
import sys
import weakref
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor

from kdtune.config import save_config
from kdtune.errors import ConfigError, KDTuneError
from kdtune.fsio import prepare_output_dir
from kdtune.perf import configure_cpu_process, configure_threads
from kdtune.runlock import RunLock, acquire_run_lock, cleanup_stale_tmp, new_run_id
from kdtune.training.preflight import check_checkpoint_dirs

__all__ = [
    "NonFiniteLossError",
    "Precision",
    "Runtime",
    "complete_checkpoints",
    "nonfinite_advice",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_rank_zero",
    "setup_runtime",
    "check_finite",
    "clip_grad_norm",
    "device_problem",
    "dtype_problem",
    "weights_dtype_problem",
    "get_device",
    "get_dtype",
    "get_precision",
    "peak_memory",
    "reset_peak_memory",
    "set_seed",
]

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_FP16 = {"fp16", "float16", "half"}


def dtype_problem(dtype: object) -> str | None:
    """The problem with a training recipe's ``dtype`` setting (fp32, bf16, or fp16 = mixed precision), or None."""
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES and name not in _FP16:
        return "use dtype=fp32, dtype=bf16 or dtype=fp16 (mixed precision)"
    return None


def weights_dtype_problem(dtype: object) -> str | None:
    """The problem with a weights-only ``dtype`` setting (inference recipes: fp32 or bf16), or None."""
    name = str(dtype).lower().removeprefix("torch.")
    if name in _FP16:
        return (
            "fp16 is mixed precision (fp32 weights, fp16 autocast, loss scaling) of the training recipes only; use "
            "dtype=bf16 (or dtype=fp32)"
        )
    if name not in _DTYPES:
        return "use dtype=fp32 or dtype=bf16"
    return None


def device_problem(device: object) -> str | None:
    """auto, cpu, cuda, cuda:N (or another torch device name)."""
    name = str(device).strip().lower()
    if name == "auto":
        return None
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return "not a valid device: use auto, cpu, cuda or cuda:<index>"
    return None


def get_dtype(dtype: str | torch.dtype | None = "fp32", device: torch.device | str | None = None) -> torch.dtype:
    """Map a config ``dtype`` (``fp32``/``float32``, ``bf16``/``bfloat16``; None → fp32) to a weights ``torch.dtype``.

    fp16 is not a weights dtype in kdtune: the training recipes read ``dtype=fp16`` as mixed precision (fp32 weights,
    fp16 autocast, loss scaling; see :func:`get_precision`), so here it is refused. bf16 on a CUDA device without bf16
    support is refused too.

    Raises:
        ConfigError: unknown or unsupported dtype.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    else:
        name = str(dtype).lower().removeprefix("torch.")
    problem = weights_dtype_problem(name)
    if problem is not None:
        what = "not supported here" if name in _FP16 else "not recognised"
        raise ConfigError(f"dtype={dtype!r} is {what}: {problem}")
    out = _DTYPES[name]
    dev = torch.device(device) if device is not None else None
    if out is torch.bfloat16 and dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"dtype={dtype}: this GPU does not support bf16; use dtype=fp16 (mixed precision)")
    return out


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    return str(dtype).lower().removeprefix("torch.")


@dataclass
class Precision:
    """How a recipe computes in its ``dtype`` — the one place precision is decided, used by the step and the recipes.

    * ``fp32``: fp32 weights and compute;
    * ``bf16``: bf16 weights and compute (bf16 has fp32's range: no scaling);
    * ``fp16``: mixed precision — fp32 master weights (and optimizer state), the forward under
      ``torch.autocast(dtype=float16)`` (matmuls in fp16; the objective upcasts logits, so softmaxes and losses stay
      fp32), and dynamic loss scaling with a ``torch.amp.GradScaler``: each micro-batch's loss is multiplied by the
      scale before backward, the gradients are unscaled before clipping, and a step whose gradients overflowed is
      skipped (no update, the scale halves) instead of stopping the run.

    Attributes:
        name: ``fp32``, ``bf16`` or ``fp16``.
        param_dtype: the dtype models are built and trained in (fp32 for ``fp16``).
        device_type: ``cpu`` or ``cuda`` (autocast's and the scaler's device).
        autocast_dtype: the autocast compute dtype (fp16), or None for no autocast.
        scaler: the loss scaler (``fp16`` only), or None.
        min_scale: a gradient overflow at a loss scale at or below this is not an fp16 overflow any more (the gradients
            are non-finite unscaled): the step's NaN/inf guard stops the run.
        skipped_steps: optimizer steps skipped because their scaled gradients overflowed (counted by
            :func:`kdtune.training.optimizer_step`, saved with the scaler in resume checkpoints).
    """

    name: str
    param_dtype: torch.dtype
    device_type: str = "cpu"
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)
    min_scale: float = 1.0
    skipped_steps: int = 0

    @classmethod
    def from_config(cls, dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> Precision:
        """The precision of a config ``dtype`` (``fp32``, ``bf16`` or ``fp16``) on ``device``.

        Raises:
            ConfigError: unknown dtype, or bf16 on a GPU without bf16 support.
        """
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dtype is not None and _dtype_name(dtype) in _FP16:
            return cls(
                "fp16",
                torch.float32,
                dev.type,
                autocast_dtype=torch.float16,
                scaler=torch.amp.GradScaler(dev.type),
            )
        param = get_dtype(dtype, dev)
        return cls("bf16" if param is torch.bfloat16 else "fp32", param, dev.type)

    def autocast(self) -> AbstractContextManager:
        """The context the forward (and the objective) runs in: fp16 autocast, or nothing."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def scale(self, loss: Tensor) -> Tensor:
        """``loss`` × the current loss scale (``loss`` itself without a scaler), to call ``backward`` on."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state (scale, growth tracker, factors) and ``skipped_steps``, for resume checkpoints;
        empty without a scaler. Plain floats and ints (JSON-safe)."""
        if self.scaler is None:
            return {}
        return {"grad_scaler": dict(self.scaler.state_dict()), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (a no-op without a scaler or without a saved state: the scaler starts fresh)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(dict(state["grad_scaler"]))
            self.skipped_steps = int(state.get("skipped_steps", 0))


def get_precision(dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> Precision:
    """The :class:`Precision` of a config ``dtype`` on ``device`` (see :meth:`Precision.from_config`)."""
    return Precision.from_config(dtype, device)


def get_device(device: str | torch.device | None = None) -> torch.device:
    """Resolve a config ``device``: None/``"auto"`` → ``cuda`` if available else ``cpu``.

    A bare ``"cuda"`` becomes ``cuda:<LOCAL_RANK>`` (0 without torchrun) and is made the current CUDA device.

    Raises:
        ConfigError: an unknown device string, or CUDA requested where none is available.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = "auto" if device is None else str(device).strip().lower()
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        problem = device_problem(name)
        if problem is not None:
            raise ConfigError(f"device={device!r}: {problem}")
        dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but CUDA is not available here: set device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={dev} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(dev)
    return dev


def set_seed(seed: int | None = None, deterministic: bool = False, rank: int = 0) -> int:
    """Seed python, numpy (if installed) and torch (CPU and CUDA) with ``seed + rank``; return ``seed``.

    Args:
        seed: the run's seed; None draws one from the OS (and returns it so it can be logged / saved).
        deterministic: also ask torch for deterministic algorithms (``warn_only`` for ops without one), disable
            cuDNN autotuning and set ``CUBLAS_WORKSPACE_CONFIG``; slower, bit-reproducible on the same hardware.
        rank: added to the seed so data-parallel ranks draw different dropout masks.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid: use a non-negative integer or null")
    local = seed + rank
    random.seed(local)
    np = sys.modules.get("numpy")
    if np is None:
        try:
            import numpy as np  # noqa: PLC0415
        except ImportError:  # pragma: no cover - numpy is optional
            np = None
    if np is not None:
        np.random.seed(local % 2**32)
    torch.manual_seed(local)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return seed


def clip_grad_norm(
    parameters: Iterable[Tensor] | torch.nn.Module, max_norm: float | None, norm_type: float = 2.0
) -> Tensor:
    """Clip the global gradient norm to ``max_norm`` (None or <= 0: measure only); return the norm before clipping.

    The returned norm is a scalar tensor (may be inf/nan when gradients are; the caller's guard reports it).
    """
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm is None or max_norm <= 0:
        grads = [p.grad for p in params]
        return torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    return torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, norm_type=norm_type)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory(device: torch.device | str | None = None) -> dict[str, float]:
    """Memory figures in GiB for logging.

    On CUDA: ``peak_memory_alloc`` / ``peak_memory_reserved`` (allocator peaks since the last reset) and
    ``memory_alloc`` (now). On CPU: ``peak_memory_rss`` (the process's peak resident set size, Linux/macOS) and
    ``memory_rss`` (now, Linux).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gib = float(2**30)
    if dev.type == "cuda":
        return {
            "peak_memory_alloc": torch.cuda.max_memory_allocated(dev) / gib,
            "peak_memory_reserved": torch.cuda.max_memory_reserved(dev) / gib,
            "memory_alloc": torch.cuda.memory_allocated(dev) / gib,
        }
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = maxrss if sys.platform == "darwin" else maxrss * 1024
    out = {"peak_memory_rss": peak / gib}
    now = _rss_bytes()
    if now is not None:
        out["memory_rss"] = now / gib
    return out


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Reset the CUDA allocator's peak counters (the CPU RSS peak cannot be reset)."""
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(dev)


class NonFiniteLossError(KDTuneError):
    """The training loss (or gradient norm) became NaN or infinite."""


def check_finite(value: Tensor | float, step: int, name: str = "loss", last_checkpoint: str | None = None) -> None:
    """Raise :class:`NonFiniteLossError` naming ``step`` if ``value`` is NaN or ±inf.

    Args:
        value: a scalar tensor or float (the step's loss, or the gradient norm).
        step: the global optimizer step, for the message.
        name: what ``value`` is (``"loss"``, ``"grad_norm"``).
        last_checkpoint: path of the last good resume checkpoint, mentioned in the message when given.
    """
    v = float(value.detach().float().item()) if isinstance(value, Tensor) else float(value)
    if math.isfinite(v):
        return
    raise NonFiniteLossError(f"{name} is {v} at step {step}; {nonfinite_advice(last_checkpoint)}")


def nonfinite_advice(last_checkpoint: str | None) -> str:
    """What to do after a NaN/inf stop: where the last usable checkpoint is and which settings to change on resume."""
    fixes = "a lower learning rate (optimizer.lr=...), gradient clipping (clip_grad_norm=1.0) or dtype=fp32"
    if last_checkpoint:
        return (
            f"the last usable checkpoint is {last_checkpoint} (finite weights and optimizer state): resume from it "
            f"with resume_from_checkpoint=true and {fixes}"
        )
    return f"no usable resume checkpoint was written yet: start again with {fixes}"


#: a resume checkpoint directory (``step_00000012`` single-device, ``step_12`` sharded)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The complete resume checkpoints (``step_N`` directories holding ``state.json``) under ``root``, oldest first.

    Temporary (``step_N.tmp-<pid>``) and partial directories are skipped; both the single-device and the sharded
    layout count.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / "state.json").is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


@dataclass
class Runtime:
    """Where and how a recipe computes: the device, the parameter/compute dtype and the output layout; and, for a run
    set up by :func:`setup_runtime`, its id, its lock on ``output_dir`` and its config.

    Attributes:
        device: the torch device models and batches live on.
        dtype: parameter dtype (fp32 or bf16; fp32 for fp16 mixed precision).
        output_dir: the run's output directory (created).
        precision: autocast and loss scaling (:class:`Precision`); default: plain ``dtype`` compute.
        run_id: the run's id (every log row carries it); "" when not set up by :func:`setup_runtime`.
        config: the run's config, written as ``output_dir/config.yaml`` by :meth:`save_config`.
        writes_config: whether this process writes ``config.yaml`` (rank 0).
        lock: the run lock held on ``output_dir`` (rank 0), released by :meth:`close`.
    """

    device: torch.device
    dtype: torch.dtype
    output_dir: Path
    precision: Precision | None = None
    run_id: str = ""
    config: DictConfig | None = field(default=None, repr=False)
    writes_config: bool = False
    lock: RunLock | None = field(default=None, repr=False)

    def save_config(self) -> Path | None:
        """Write the run's config as ``output_dir/config.yaml`` (atomically; rank 0; once).

        Called when the run starts (:class:`kdtune.training.Reporter` does it, after every component was built and the
        resume checked), so a run that fails at setup never replaces the previous run's ``config.yaml``.
        """
        if self.config is None or not self.writes_config:
            return None
        path = save_config(self.config, self.output_dir / "config.yaml")
        self.writes_config = False  # once
        return path

    def close(self) -> None:
        """Release the run lock (the end of the run; idempotent)."""
        if self.lock is not None:
            self.lock.release()
            _HELD_LOCKS.pop(self.lock.output_dir, None)
            self.lock = None

    def __post_init__(self) -> None:
        if self.precision is None:
            self.precision = Precision.from_config(self.dtype, self.device)

    @property
    def checkpoints_dir(self) -> Path:
        """``output_dir/checkpoints``: one ``step_N`` resume directory per save."""
        return self.output_dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        """``output_dir/final``: the HF-format model written at the end."""
        return self.output_dir / "final"

    @property
    def final_adapter_dir(self) -> Path:
        """``output_dir/final_adapter``: the PEFT adapter written at the end of a LoRA run."""
        return self.output_dir / "final_adapter"

    @property
    def logs_dir(self) -> Path:
        """``output_dir/logs``: metric logs (JSON lines)."""
        return self.output_dir / "logs"


#: run locks this process holds, by output directory (see :func:`_lock_output_dir`); weak, so the lock of a run that
#: ended with an exception is released as soon as nothing refers to its Runtime any more
_HELD_LOCKS: weakref.WeakValueDictionary[Path, RunLock] = weakref.WeakValueDictionary()


def _lock_output_dir(out: Path, run_id: str) -> RunLock:
    """Take the run lock of ``out``. A lock this process still holds there belongs to an earlier run of this process
    that ended with an exception (a run releases its lock when it ends), and is taken over."""
    stale = _HELD_LOCKS.pop(out, None)
    if stale is not None:
        stale.release()
    lock = acquire_run_lock(out, run_id=run_id)
    _HELD_LOCKS[out] = lock
    return lock


def _check_fresh_run(out: Path) -> None:
    """A fresh run must not mix its checkpoints with an earlier run's (nor be resumed from them later)."""
    found = complete_checkpoints(out / "checkpoints")
    if found:
        raise ConfigError(
            f"output_dir {out} already holds resume checkpoints of an earlier run (newest: {found[-1].name}); "
            "continue that run with resume_from_checkpoint=true, or choose another output_dir "
            f"(or delete {out / 'checkpoints'})"
        )


def _start_run(output_dir: str, cfg: DictConfig | None) -> tuple[Path, str, RunLock]:
    """Rank 0's part of :func:`setup_runtime`: check the inputs, lock ``output_dir``, remove stale temporaries."""
    if cfg is not None:
        check_checkpoint_dirs(cfg)  # every missing model checkpoint named at once, before any is loaded
    out = prepare_output_dir(output_dir)
    run_id = new_run_id()
    lock = _lock_output_dir(out, run_id)
    try:
        cleanup_stale_tmp(out)
        if cfg is not None and cfg.get("resume_from_checkpoint") is False:
            _check_fresh_run(out)
    except BaseException:
        lock.release()
        _HELD_LOCKS.pop(out, None)
        raise
    return out, run_id, lock


def setup_runtime(
    device: str,
    dtype: str,
    output_dir: str,
    seed: int,
    deterministic: bool = False,
    *,
    cfg: DictConfig | None = None,
    save_config_file: bool = True,
    mixed_precision: bool = False,
    num_threads: int | None = None,
) -> Runtime:
    """Seed everything, resolve device and dtype, and claim the output directory for this run.

    Rank 0 checks that every model checkpoint the config reads exists (all missing ones named at once, with the
    command that produces each), checks ``output_dir`` (not empty, not a file, writable), takes the run lock (a second
    live run in the same ``output_dir`` is refused naming its pid; the kernel drops the lock of a killed run), removes
    the ``*.tmp-*`` leftovers of a killed save, refuses a fresh run (``resume_from_checkpoint=false``) in a directory
    that holds an earlier run's checkpoints, and creates the run id, which it broadcasts to the other ranks. The
    config is kept and written as ``config.yaml`` only when the run starts (:meth:`Runtime.save_config`), so a run that
    fails at setup leaves the previous run's ``config.yaml`` alone. :meth:`Runtime.close` releases the lock.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``fp32`` or ``bf16``; with ``mixed_precision`` also ``fp16`` (fp32 weights, fp16 autocast, loss scaling).
        output_dir: the run's output directory.
        seed: the global seed.
        deterministic: whether to force deterministic algorithms.
        cfg: the run's config (read for ``resume_from_checkpoint`` and the checkpointers' ``checkpoint_dir``; saved as
            ``output_dir/config.yaml`` when the run starts).
        save_config_file: whether this process writes ``config.yaml`` (False on non-zero ranks).
        num_threads: CPU threads of torch (:func:`kdtune.perf.configure_threads`): None = ``OMP_NUM_THREADS`` if set,
            else the physical cores; a warning when the machine is oversubscribed. Only on a CPU device, where
            subnormal floats are also flushed to zero (:func:`kdtune.perf.flush_denormals`) and freed memory is
            kept for reuse (:func:`kdtune.perf.keep_freed_memory`).
        mixed_precision: accept ``dtype=fp16`` as mixed precision — for the training recipes, which run the forward in
            ``runtime.precision.autocast()`` and step through :func:`kdtune.training.optimizer_step`; other recipes
            refuse it.

    Returns:
        The :class:`Runtime`.

    Raises:
        ConfigError: one of the refusals above (on every rank of a distributed run).
    """
    set_seed(seed, deterministic=deterministic)
    dev = get_device(device)
    if dev.type == "cpu":
        configure_threads(num_threads)
        configure_cpu_process()
    precision = get_precision(dtype, dev) if mixed_precision else Precision.from_config(get_dtype(dtype, dev), dev)
    out = Path(str(output_dir)).expanduser().absolute()
    lock: RunLock | None = None
    run_id, error = "", None
    if get_rank() == 0:
        try:
            out, run_id, lock = _start_run(output_dir, cfg)
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            error = e
    if is_distributed() and get_world_size() > 1:  # every rank learns the run id, or rank 0's refusal
        box: list[object] = [(run_id, None if error is None else (type(error), str(error)))]
        dist.broadcast_object_list(box, src=0)
        run_id, failed = box[0]  # type: ignore[misc]
        if failed is not None and error is None:
            kind, text = failed
            error = kind(text) if issubclass(kind, KDTuneError) else RuntimeError(f"on rank 0: {text}")
    if error is not None:
        raise error
    return Runtime(
        device=dev,
        dtype=precision.param_dtype,
        output_dir=out,
        precision=precision,
        run_id=run_id,
        config=cfg,
        writes_config=save_config_file,
        lock=lock,
    )


def is_distributed() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank: the process group's when one exists, else ``RANK`` (torchrun sets it before the group), else 0."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """Number of processes in the process group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """True on global rank 0 and in a non-distributed run (the process that logs and writes single-writer files)."""
    return get_rank() == 0
