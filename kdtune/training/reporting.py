"""What a run reports: metric loggers (config ``_component_``s), the progress bar, and the :class:`Reporter` that a
recipe's loop feeds after every optimizer step and evaluation, ending in the :class:`RunSummary` its ``train()``
returns.

Every logger has ``log(name, value, step)``, ``log_dict(payload, step)``, ``log_config(config)`` and ``close()``, and
writes only on global rank 0, so recipes can call them unconditionally. The TensorBoard and
Weights & Biases loggers import their libraries lazily and say which extra to install when missing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

from omegaconf import DictConfig
from tqdm.auto import tqdm

from kdtune.config import import_component, instantiate
from kdtune.errors import ConfigError
from kdtune.runlock import new_run_id, unique_log_path
from kdtune.training.data import DataPosition, TrainData
from kdtune.training.runtime import Runtime, is_rank_zero, peak_memory
from kdtune.training.step import StepResult

__all__ = [
    "MetricLogger",
    "StdoutLogger",
    "DiskLogger",
    "TensorBoardLogger",
    "WandBLogger",
    "ProgressBar",
    "Reporter",
    "RunSummary",
    "build_metric_logger",
    "logged_steps",
]


def _scalar(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (RuntimeError, ValueError):
            return value
    return value


def _config_dict(config: Any) -> dict[str, Any]:
    try:
        from omegaconf import OmegaConf  # noqa: PLC0415

        if OmegaConf.is_config(config):
            return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(config)


@runtime_checkable
class MetricLogger(Protocol):
    """What a recipe needs from a metric logger."""

    def log(self, name: str, value: Any, step: int) -> None: ...
    def log_dict(self, payload: Mapping[str, Any], step: int) -> None: ...
    def log_config(self, config: Any) -> None: ...
    def close(self) -> None: ...


class _BaseLogger:
    def log(self, name: str, value: Any, step: int) -> None:
        """Log one scalar."""
        self.log_dict({name: value}, step)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def log_config(self, config: Any) -> None:
        """Record the run's config (no-op unless the backend stores it)."""

    def close(self) -> None:
        """Flush and release resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _fmt(value: Any) -> str:
    value = _scalar(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) and math.isfinite(value):
            return f"{value:.4e}"
        return f"{value:.4f}"
    return str(value)


class StdoutLogger(_BaseLogger):
    """Prints ``Step 12 | loss:1.2345 kd_loss:0.5000 lr:2.0000e-05`` lines to stdout (rank 0 only)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._enabled = is_rank_zero()

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        """Print one line with every metric of ``payload`` at ``step``."""
        if not self._enabled:
            return
        body = " ".join(f"{k}:{_fmt(v)}" for k, v in payload.items())
        print(f"Step {step} | {body}", file=self._stream or sys.stdout, flush=True)


class DiskLogger(_BaseLogger):
    """Appends one JSON object per ``log_dict`` call (``{"step": s, "run_id": id, **metrics}``) to a ``.jsonl`` file
    of its own (rank 0): ``log_<run_id>.jsonl``, never shared with another run.

    Args:
        log_dir: directory, created if needed.
        filename: file name inside ``log_dir``; default: a new ``log_<run_id>.jsonl`` (``-1``, ``-2`` added if taken).
        run_id: the run's id, written into every row (the recipes pass their :attr:`Runtime.run_id`); default: new.
    """

    def __init__(self, log_dir: str | os.PathLike, filename: str | None = None, run_id: str | None = None) -> None:
        self._enabled = is_rank_zero()
        self.run_id = run_id or new_run_id()
        self.path = Path(log_dir) / (filename or f"log_{self.run_id}.jsonl")
        self._file: TextIO | None = None
        if self._enabled:
            if filename is None:
                self.path = unique_log_path(log_dir, self.run_id)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        """Append ``{"step": step, "run_id": ..., **payload}`` as one JSON line (non-finite floats as strings)."""
        if self._file is None:
            return
        row: dict[str, Any] = {"step": int(step), "run_id": self.run_id}
        for k, v in payload.items():
            v = _scalar(v)
            row[k] = str(v) if isinstance(v, float) and not math.isfinite(v) else v
        self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()

    def log_config(self, config: Any) -> None:
        """Write the resolved config next to the log as ``config.json``."""
        if self._enabled:
            (self.path.parent / "config.json").write_text(json.dumps(_config_dict(config), indent=2, default=str))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLogger(_BaseLogger):
    """Writes scalars to TensorBoard event files under ``log_dir`` (rank 0); needs ``pip install 'kdtune[tensorboard]'``.

    Args:
        log_dir: directory for the event files.
        **kwargs: passed to ``torch.utils.tensorboard.SummaryWriter``.
    """

    def __init__(self, log_dir: str | os.PathLike, **kwargs: Any) -> None:
        self._writer = None
        if not is_rank_zero():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
        except ImportError as e:
            raise ConfigError(
                "metric_logger TensorBoardLogger needs the tensorboard package: pip install 'kdtune[tensorboard]' "
                "(or use kdtune.training.DiskLogger)"
            ) from e
        self._writer = SummaryWriter(log_dir=str(log_dir), **kwargs)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        """Add every numeric value of ``payload`` as a scalar at ``step``."""
        if self._writer is None:
            return
        for k, v in payload.items():
            v = _scalar(v)
            if isinstance(v, (int, float)):
                self._writer.add_scalar(k, v, global_step=step)
        self._writer.flush()

    def log_config(self, config: Any) -> None:
        """Record the config as a text summary."""
        if self._writer is not None:
            self._writer.add_text("config", "```\n" + json.dumps(_config_dict(config), indent=2, default=str) + "\n```")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandBLogger(_BaseLogger):
    """Logs to Weights & Biases (rank 0); needs ``pip install 'kdtune[wandb]'``.

    Args:
        project: W&B project.
        entity: W&B entity (team / user).
        group: run group.
        log_dir: local directory for W&B files.
        **kwargs: passed to ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "kdtune",
        entity: str | None = None,
        group: str | None = None,
        log_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._run = None
        if not is_rank_zero():
            return
        try:
            import wandb  # noqa: PLC0415
        except ImportError as e:
            raise ConfigError(
                "metric_logger WandBLogger needs the wandb package: pip install 'kdtune[wandb]' "
                "(or use kdtune.training.DiskLogger)"
            ) from e
        self._wandb = wandb
        self._run = wandb.run or wandb.init(project=project, entity=entity, group=group, dir=log_dir, **kwargs)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        """Log ``payload`` at ``step``."""
        if self._run is not None:
            self._run.log({k: _scalar(v) for k, v in payload.items()}, step=step)

    def log_config(self, config: Any) -> None:
        """Store the config in the run's config."""
        if self._run is not None:
            self._run.config.update(_config_dict(config), allow_val_change=True)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class ProgressBar:
    """tqdm bar over optimizer steps showing loss, kd_loss, lr and tokens/s; tqdm shows step/total and ETA.

    Args:
        total_steps: optimizer steps of the whole run.
        initial_step: steps already done (when resuming).
        desc: text before the bar.
        disable: hide it; default: hidden on ranks other than 0.
    """

    def __init__(
        self, total_steps: int, initial_step: int = 0, desc: str = "train", disable: bool | None = None
    ) -> None:
        if disable is None:
            disable = not is_rank_zero()
        self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, disable=disable, dynamic_ncols=True)
        self._last_time = time.perf_counter()
        self.tokens_per_second = 0.0

    def update(
        self,
        num_tokens: int,
        loss: float | None = None,
        kd_loss: float | None = None,
        lr: float | None = None,
        steps: int = 1,
    ) -> float:
        """Advance by ``steps`` optimizer steps that processed ``num_tokens`` tokens; return tokens/s since last call."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        self._last_time = now
        self.tokens_per_second = num_tokens / elapsed
        post: dict[str, str] = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if kd_loss is not None and not (isinstance(kd_loss, float) and math.isnan(kd_loss)):
            post["kd_loss"] = f"{kd_loss:.4f}"
        if lr is not None:
            post["lr"] = f"{lr:.2e}"
        post["tok/s"] = f"{self.tokens_per_second:.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(steps)
        return self.tokens_per_second

    def reset_timer(self) -> None:
        """Restart the tokens/s clock (e.g. after validation or checkpointing)."""
        self._last_time = time.perf_counter()

    def close(self) -> None:
        """Close the bar."""
        self._bar.close()


def build_metric_logger(logger_cfg: DictConfig | None, runtime: Runtime) -> Any:
    """Build the metric logger ``_component_``; None = ``kdtune.training.DiskLogger`` writing ``logs/``.

    A :class:`DiskLogger` (or subclass) gets the run's id unless the config sets ``run_id``.
    """
    run_id = runtime.run_id or None
    if logger_cfg is None:
        return DiskLogger(log_dir=str(runtime.logs_dir), run_id=run_id)
    target = import_component(str(logger_cfg.get("_component_", "")), "metric_logger")
    if isinstance(target, type) and issubclass(target, DiskLogger) and "run_id" not in logger_cfg:
        return instantiate(logger_cfg, run_id=run_id)
    return instantiate(logger_cfg)


def logged_steps(log_dir: str | os.PathLike, *, exclude: Path | None = None) -> dict[int, dict[str, Any]]:
    """Step -> the last training row (one with a ``loss``) logged for it in the ``*.jsonl`` files of ``log_dir``
    (files in the order they were last written; unreadable lines skipped)."""
    rows: dict[int, dict[str, Any]] = {}
    d = Path(log_dir)
    if not d.is_dir():
        return rows
    for path in sorted(d.glob("*.jsonl"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "loss" in row and isinstance(row.get("step"), int):
                rows[row["step"]] = row
    return rows


@dataclass
class RunSummary:
    """What a recipe run measured, returned by its ``train()`` (tests and notebooks read it).

    Attributes:
        steps: per optimizer step: ``step``, ``epoch``, ``loss``, ``class_loss``, ``kd_loss``, ``lr``, ``grad_norm``,
            ``num_tokens``, ``tokens_per_second`` (+ ``peak_memory_gib``; + ``loss_scale``, ``skipped_steps`` with fp16).
            ``tokens_per_second`` is torchtune's basis: the step's trained (non-masked label) tokens over the wall time
            since the previous step was reported — data loading, forward, backward and the optimizer step included,
            validation excluded.
        evals: per validation pass: ``step`` + the :func:`evaluate` metrics.
        output_dir: the run's output directory.
    """

    steps: list[dict[str, float]]
    evals: list[dict[str, float]]
    output_dir: Path


class Reporter:
    """Progress bar + metric logger of a recipe: logs every ``log_every_n_steps`` and every evaluation.

    Creating it marks the start of the run (every component is built, the resume checked): the run's ``config.yaml``
    is written then (:meth:`Runtime.save_config`). In a resumed run, the rows of steps that an earlier run of the same
    ``output_dir`` had already logged carry ``"resumed": true``. :meth:`close` ends the run and releases its lock.

    Args:
        runtime: device and output layout.
        settings: the recipe settings (``metric_logger``, ``log_every_n_steps``, ``log_peak_memory_stats``,
            ``progress_bar``).
        data: the training data (total steps, resume position).
        enabled: False on non-zero ranks (no bar, no logging).
    """

    def __init__(self, runtime: Runtime, settings: Any, data: TrainData, *, enabled: bool = True) -> None:
        self.runtime, self.enabled = runtime, enabled
        self.log_every = int(settings.log_every_n_steps)
        self.log_memory = bool(settings.log_peak_memory_stats)
        self.total = data.total_steps
        self.logger = build_metric_logger(settings.metric_logger, runtime) if enabled else None
        self.repeated_until = 0  # steps <= this were logged by an earlier run of this output_dir (resume)
        if enabled and data.position.global_step and isinstance(self.logger, DiskLogger):
            earlier = logged_steps(self.logger.path.parent, exclude=self.logger.path)
            self.repeated_until = max((s for s in earlier if s > data.position.global_step), default=0)
        if enabled:
            runtime.save_config()
            capped = " (capped by max_steps)" if data.total_steps < data.epochs * data.steps_per_epoch else ""
            plan = (
                f"training {data.total_steps} optimizer steps{capped}: {data.epochs} epoch(s) x {data.steps_per_epoch} "
                f"steps, {data.batch_size} sequences x {data.grad_accum} accumulation per step"
            )
            if data.position.global_step:
                plan += f"; resuming after step {data.position.global_step}"
            print(f"{plan}; outputs in {runtime.output_dir}", flush=True)
        self.bar = ProgressBar(
            data.total_steps, data.position.global_step, disable=not (enabled and settings.progress_bar)
        )
        self.steps: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.last_eval_step: int | None = None

    def step(self, pos: DataPosition, result: StepResult) -> dict[str, float]:
        """Record one optimizer step; returns its metrics."""
        tokens_per_second = self.bar.update(result.num_tokens, result.loss, result.kd_loss, result.lr)
        m: dict[str, float] = {"step": pos.global_step, "epoch": pos.epoch, "loss": result.loss}
        if not math.isnan(result.kd_loss):
            m["class_loss"], m["kd_loss"] = result.class_loss, result.kd_loss
        m.update(
            lr=result.lr, grad_norm=result.grad_norm, num_tokens=result.num_tokens, tokens_per_second=tokens_per_second
        )
        if result.loss_scale is not None:  # fp16 loss scaling: the scale used and the overflowed steps so far
            m.update(loss_scale=result.loss_scale, skipped_steps=result.skipped_steps)
        if self.log_memory:
            m.update(peak_memory(self.runtime.device))
        self.steps.append(m)
        if self.enabled and (pos.global_step % self.log_every == 0 or pos.global_step == self.total):
            self.logger.log_dict(self._mark({k: v for k, v in m.items() if k != "step"}, pos), step=pos.global_step)
        return m

    def _mark(self, payload: dict[str, Any], pos: DataPosition) -> dict[str, Any]:
        """``payload`` plus ``resumed: true`` when an earlier run already logged this step."""
        return {**payload, "resumed": True} if pos.global_step <= self.repeated_until else payload

    def eval(self, pos: DataPosition, metrics: dict[str, float]) -> None:
        """Record one validation pass."""
        self.evals.append({"step": pos.global_step, **metrics})
        self.last_eval_step = pos.global_step
        if self.enabled:
            self.logger.log_dict(self._mark(dict(metrics), pos), step=pos.global_step)
            tqdm.write(f"step {pos.global_step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self.bar.reset_timer()  # evaluation time is not training throughput

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one-off metrics (e.g. the teacher check before training) at ``step``; nothing when empty."""
        if self.enabled and metrics:
            self.logger.log_dict(metrics, step=step)

    def close(self) -> RunSummary:
        """Close the bar and the logger; return the :class:`RunSummary`."""
        self.bar.close()
        if self.logger is not None:
            self.logger.close()
        self.runtime.close()
        return RunSummary(self.steps, self.evals, self.runtime.output_dir)
