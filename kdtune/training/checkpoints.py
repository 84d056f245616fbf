"""Checkpoints of a run: resume checkpoints (everything needed to continue exactly, one directory per saved step),
the recipe-level :class:`ResumeCheckpoints` that saves/restores model, optimizer, schedule, RNG and data position, and
the final outputs (``final/`` HF model with the run's chat template and model card, ``final_adapter/`` PEFT adapter).

Layout (``<output_dir>/resume/step_00000120/``):

* ``model.pt`` — the model's state dict, or only its trainable tensors (LoRA adapter) with ``trainable_only=True``
* ``optimizer.pt``, ``lr_scheduler.pt`` — their state dicts (when given)
* ``rng.pt`` — python, numpy, torch CPU and CUDA generator states
* ``components.pt`` — the state dicts of the run's other stateful components (e.g. the objective's sampling RNG)
* ``config.yaml`` — the run's config
* ``state.json`` — step, epoch, the data position (any JSON dict the recipe gives), written last

A directory is written under ``step_XXXXXXXX.tmp-<pid>`` and renamed when complete, so a crash never leaves a
half-written checkpoint where :meth:`ResumeState.find_latest` looks. After each save only the newest ``keep_last``
checkpoints are kept.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import random
import re
import shutil
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kdtune.config import ConfigChange, config_diff, import_component
from kdtune.config._diff import MISSING_VALUE
from kdtune.errors import CheckpointError, ConfigError
from kdtune.fsio import output_error
from kdtune.handoff import RunCard, base_model_id, command_line, write_handoff
from kdtune.training.data import DataPosition, TrainData
from kdtune.training.runtime import NonFiniteLossError, Runtime, complete_checkpoints, nonfinite_advice
from kdtune.training.settings import KDDistributedSettings
from kdtune.training.setup import is_lora_model

log = logging.getLogger("kdtune")

__all__ = [
    "DATA_ORDER_KEYS",
    "RESUME_RULES",
    "WEIGHT_SANITY_BOUND",
    "LoadedState",
    "ResumeChange",
    "ResumeCheckpoints",
    "ResumeState",
    "PlannedHyperparameters",
    "apply_resume_changes",
    "capture_rng_state",
    "plan_resume",
    "restore_components",
    "restore_rng_state",
    "resume_changes",
    "run_card",
    "save_final",
    "set_aside_diverged",
    "snapshot_hyperparameters",
    "unusable_state",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")
_FORMAT_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (if imported), torch CPU and CUDA RNG states, in a ``torch.load(weights_only=True)``-safe form."""
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {"python": (version, torch.tensor(py_state, dtype=torch.int64), gauss)}
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`capture_rng_state` (CUDA only if the device count matches)."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in py_state.tolist()), gauss))
    if "numpy" in state:
        import numpy as np  # noqa: PLC0415

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class LoadedState:
    """What :meth:`ResumeState.load` read.

    Attributes:
        path: the checkpoint directory.
        step: global optimizer step at save time.
        epoch: epoch at save time.
        data_state: the recipe's data position dict.
        extra: any other JSON the recipe saved.
        config: the saved config as a plain dict (or None).
        component_states: the saved states of the run's stateful components (name -> state dict).
        model_state_dict: the saved model tensors (also loaded into ``model`` if one was given).
        optimizer_state_dict: the saved optimizer state (also loaded into ``optimizer`` if given), or None.
        lr_scheduler_state_dict: the saved scheduler state, or None.
    """

    path: Path
    step: int
    epoch: int
    data_state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    component_states: dict[str, Any] = field(default_factory=dict)
    model_state_dict: dict[str, torch.Tensor] | None = None
    optimizer_state_dict: dict[str, Any] | None = None
    lr_scheduler_state_dict: dict[str, Any] | None = None


def _trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _config_to_yaml(config: Any) -> str:
    if not OmegaConf.is_config(config):
        config = OmegaConf.create(config)
    return OmegaConf.to_yaml(config, resolve=False)


class ResumeState:
    """Saves and finds resume checkpoints under ``<output_dir>/<subdir>``.

    Args:
        output_dir: the run's output directory.
        keep_last: number of newest checkpoints kept after each save (>= 1).
        subdir: folder under ``output_dir`` holding the step directories.
    """

    def __init__(self, output_dir: str | os.PathLike, keep_last: int = 2, subdir: str = "resume") -> None:
        if keep_last < 1:
            raise CheckpointError(f"keep_last={keep_last} is invalid: keep at least 1 resume checkpoint")
        self.root = Path(output_dir) / subdir
        self.keep_last = keep_last

    # ----------------------------------------------------------------- save
    def save(
        self,
        step: int,
        *,
        epoch: int = 0,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any | None = None,
        data_state: dict[str, Any] | None = None,
        config: Any | None = None,
        trainable_only: bool = False,
        model_state_dict: dict[str, torch.Tensor] | None = None,
        optimizer_state_dict: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        component_states: dict[str, Any] | None = None,
    ) -> Path:
        """Write the checkpoint of global step ``step`` atomically, then prune to ``keep_last``; return its path.

        Args:
            step: global optimizer step (names the directory).
            epoch: current epoch.
            model: the trained model (or pass ``model_state_dict``, e.g. a gathered FSDP state dict).
            optimizer: its state is saved (or pass ``optimizer_state_dict``).
            lr_scheduler: anything with ``state_dict()``.
            data_state: JSON-serialisable data position (epoch, batches consumed, sampler seed...).
            config: the run's config (DictConfig or dict), saved as YAML.
            trainable_only: save only parameters with ``requires_grad`` (a LoRA adapter) instead of the full model.
            model_state_dict: precomputed model tensors (overrides ``model``).
            optimizer_state_dict: precomputed optimizer state (overrides ``optimizer``).
            extra: any other JSON-serialisable values.
            component_states: state dicts of other stateful components (name -> state), saved with ``torch.save``.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            if model_state_dict is None and model is not None:
                model_state_dict = _trainable_state_dict(model) if trainable_only else model.state_dict()
            files = []
            if model_state_dict is not None:
                torch.save({k: v.detach().cpu() for k, v in model_state_dict.items()}, tmp / "model.pt")
                files.append("model.pt")
            if optimizer_state_dict is None and optimizer is not None:
                optimizer_state_dict = optimizer.state_dict()
            if optimizer_state_dict is not None:
                torch.save(optimizer_state_dict, tmp / "optimizer.pt")
                files.append("optimizer.pt")
            if lr_scheduler is not None:
                torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
                files.append("lr_scheduler.pt")
            torch.save(capture_rng_state(), tmp / "rng.pt")
            files.append("rng.pt")
            if component_states:
                torch.save(component_states, tmp / "components.pt")
                files.append("components.pt")
            if config is not None:
                (tmp / "config.yaml").write_text(_config_to_yaml(config))
                files.append("config.yaml")
            meta = {
                "format_version": _FORMAT_VERSION,
                "step": int(step),
                "epoch": int(epoch),
                "model_state": "trainable" if trainable_only else "full",
                "data_state": data_state or {},
                "extra": extra or {},
                "files": files,
            }
            (tmp / "state.json").write_text(json.dumps(meta, indent=2))  # written last: marks completeness
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            translated = output_error(e, final)
            if translated is not None:
                raise translated from e
            raise
        self._prune()
        return final

    def _prune(self) -> None:
        done = self.list_checkpoints(self.root)
        for path in done[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # ----------------------------------------------------------------- find
    @staticmethod
    def list_checkpoints(root: str | os.PathLike) -> list[Path]:
        """Complete checkpoint directories under ``root``, oldest first (temporary / partial ones skipped)."""
        return complete_checkpoints(root)

    def find_latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        done = self.list_checkpoints(self.root)
        return done[-1] if done else None

    # ----------------------------------------------------------------- load
    def load(
        self,
        path: str | os.PathLike | None = None,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any | None = None,
        restore_rng: bool = True,
        map_location: str | torch.device = "cpu",
    ) -> LoadedState:
        """Read a checkpoint (default: the latest) and restore what was given, plus RNG states.

        Load the optimizer *after* building it on the model's parameters, and the scheduler after the optimizer.

        Raises:
            CheckpointError: no checkpoint, or the saved tensors do not fit ``model``.
        """
        if path is None:
            path = self.find_latest()
            if path is None:
                raise CheckpointError(
                    f"resume_from_checkpoint is set but {self.root} holds no complete checkpoint: "
                    "set resume_from_checkpoint=False or point output_dir at the run to resume"
                )
        path = Path(path)
        meta_file = path / "state.json"
        if not meta_file.is_file():
            raise CheckpointError(f"{path} is not a complete resume checkpoint (no state.json): pick another step")
        meta = json.loads(meta_file.read_text())
        loaded = LoadedState(
            path=path,
            step=int(meta["step"]),
            epoch=int(meta["epoch"]),
            data_state=meta.get("data_state", {}),
            extra=meta.get("extra", {}),
        )
        if (path / "config.yaml").is_file():
            loaded.config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False)
        if (path / "model.pt").is_file():
            loaded.model_state_dict = torch.load(path / "model.pt", map_location=map_location, weights_only=True)
            if model is not None:
                self._load_model(model, loaded.model_state_dict, meta.get("model_state") == "trainable", path)
        if (path / "optimizer.pt").is_file():
            loaded.optimizer_state_dict = torch.load(
                path / "optimizer.pt", map_location=map_location, weights_only=True
            )
            if optimizer is not None:
                try:
                    optimizer.load_state_dict(loaded.optimizer_state_dict)
                except (ValueError, KeyError) as e:
                    raise CheckpointError(
                        f"{path}/optimizer.pt does not match this optimizer ({e}); resume with the same optimizer "
                        "and trainable parameters, or start a new run"
                    ) from e
        if (path / "lr_scheduler.pt").is_file():
            loaded.lr_scheduler_state_dict = torch.load(path / "lr_scheduler.pt", weights_only=True)
            if lr_scheduler is not None:
                lr_scheduler.load_state_dict(loaded.lr_scheduler_state_dict)
        if restore_rng and (path / "rng.pt").is_file():
            restore_rng_state(torch.load(path / "rng.pt", weights_only=True))
        if (path / "components.pt").is_file():
            loaded.component_states = torch.load(path / "components.pt", weights_only=True)
        return loaded

    @staticmethod
    def _load_model(model: nn.Module, state: dict[str, torch.Tensor], trainable_only: bool, path: Path) -> None:
        fix = "resume with the same model and LoRA settings"
        expected = set(_trainable_state_dict(model)) if trainable_only else set(model.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise CheckpointError(
                f"{path}/model.pt does not fit the model (missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]}): {fix}"
            )
        try:
            model.load_state_dict(state, strict=not trainable_only)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise CheckpointError(f"{path}/model.pt does not fit the model ({first}): {fix}") from e


class ResumeCheckpoints:
    """The run's resume checkpoints in ``output_dir/checkpoints/step_N`` (atomic, the newest ``keep_last`` kept).

    Each holds the model (only the adapters of a LoRA model: the base comes from the checkpointer again), the
    optimizer, the LR schedule, the RNG states, the data position, the config and, with fp16, the loss scaler's state
    (in ``state.json``'s ``extra.precision``) — enough to continue exactly. Only usable states are written (finite,
    sane weights and optimizer state), and after a NaN/inf stop the checkpoints that would repeat it are set aside
    (:meth:`diverged`), so resume always picks one the stop's advice works from.

    Args:
        runtime: output layout and precision (its loss scaler is saved and restored).
        settings: recipe settings (``keep_last_n_checkpoints``).
        model: the trained model.
        optimizer: its optimizer.
        scheduler: its LR schedule or None.
        data: the training data (its ``position`` is saved and restored).
        cfg: the run's config (saved with each checkpoint).
        components: other stateful parts of the run (name -> object with ``state_dict()``/``load_state_dict()``,
            e.g. ``{"objective": objective}`` for its sampling RNG), saved and restored with each checkpoint.
    """

    def __init__(
        self,
        runtime: Runtime,
        settings: Any,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        data: TrainData,
        cfg: DictConfig | None = None,
        components: dict[str, Any] | None = None,
    ) -> None:
        self.state = ResumeState(runtime.output_dir, keep_last=settings.keep_last_n_checkpoints, subdir="checkpoints")
        self.model, self.optimizer, self.scheduler, self.data, self.cfg = model, optimizer, scheduler, data, cfg
        self.precision = runtime.precision  # fp16: its loss scaler's state travels with the checkpoint
        self.components = dict(components or {})
        self.trainable_only = is_lora_model(model)
        self.last: str | None = None

    def save(self, pos: DataPosition) -> Path:
        """Write the checkpoint of the step that ended at ``pos``.

        Raises:
            NonFiniteLossError: the weights or optimizer state are not usable (:func:`unusable_state`): nothing is
                written, so the older checkpoints (and :attr:`last`, a usable one) stay.
        """
        problem = unusable_state(self.model, self.optimizer)
        if problem is not None:
            raise NonFiniteLossError(f"after step {pos.global_step} {problem}; {nonfinite_advice(self.last)}")
        nxt = pos if not self.data.is_epoch_end(pos) else DataPosition(pos.epoch + 1, 0, pos.global_step)
        path = self.state.save(
            pos.global_step,
            epoch=nxt.epoch,
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            data_state=nxt.state_dict(),
            config=self.cfg,
            trainable_only=self.trainable_only,
            extra={
                "command": command_line(),  # for the model card of an export of this checkpoint
                **({"precision": self.precision.state_dict()} if self.precision.scaler is not None else {}),
            },
            component_states={name: c.state_dict() for name, c in self.components.items()},
        )
        self.last = str(path)
        log.info("saved resume checkpoint %s", path)
        return path

    def diverged(self, step: int) -> str | None:
        """The loss or gradient norm of ``step`` is NaN/inf: set aside the checkpoints holding the weights that produced
        it (:func:`set_aside_diverged`) and return the one to resume from (None when none is left)."""
        self.last = set_aside_diverged(self.state.root, step)
        return self.last

    def resume(self) -> DataPosition:
        """Restore the newest checkpoint into the model, optimizer, schedule, RNG and data position.

        The new config is compared with the checkpoint's first (:func:`plan_resume`): a key that may not change is
        refused before anything is loaded; the others are applied after loading, one printed line each
        (:func:`apply_resume_changes`).

        Raises:
            ConfigError: a refused change (see :data:`RESUME_RULES`).
            CheckpointError: no complete checkpoint, or it does not fit the model / optimizer, or it is not usable.
        """
        latest = self.state.find_latest()
        changes: list[ResumeChange] = []
        if latest is not None:
            saved = OmegaConf.load(latest / "config.yaml") if (latest / "config.yaml").is_file() else None
            step = int(json.loads((latest / "state.json").read_text())["step"])
            changes = plan_resume(saved, self.cfg, latest, step, self.data.total_steps)
        planned = snapshot_hyperparameters(self.optimizer, self.scheduler)
        loaded = self.state.load(model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler)
        problem = unusable_state(self.model, self.optimizer)
        if problem is not None:
            raise CheckpointError(
                f"{loaded.path} is not usable: {problem}; delete it to resume from the checkpoint before it"
            )
        apply_resume_changes(changes, planned, self.optimizer, self.scheduler, loaded.step)
        self.precision.load_state_dict(loaded.extra.get("precision"))  # fp16 loss scale; no-op otherwise
        self.data.position = DataPosition.from_state_dict(loaded.data_state)
        restore_components(self.components, loaded.component_states)
        self.last = str(loaded.path)
        log.info("resumed from %s (step %d)", loaded.path, loaded.step)
        return self.data.position


def restore_components(components: dict[str, Any], states: dict[str, Any]) -> None:
    """Load each saved state into its component (a component without a saved state keeps its own)."""
    for name, component in components.items():
        if name in states:
            component.load_state_dict(states[name])


#: settings that define the data order: a resumed run must keep them, or its saved data position means other examples
DATA_ORDER_KEYS = (
    "seed",
    "shuffle",
    "group_by_length",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps_per_epoch",
)

_REFUSE_DATA = "it defines the data order, so the saved data position would point at other examples"
_REFUSE_EXAMPLES = "it changes which examples the run trains on, so the saved data position would point at others"
_REFUSE_MODEL = "the checkpoint's weights and optimizer state belong to the model it was trained with"
_REFUSE_OBJECTIVE = "it changes the objective (the teacher or how KD is mixed) in the middle of a run"
_APPLY = "takes effect from the next step"

#: what a resumed run does with a changed key (first matching prefix wins): ("apply" | "refuse", why / what happens).
#: Applied: the optimizer's hyperparameters (new lr: param groups and schedule), the run length, the schedule, the
#: cadence of logging / evaluation / checkpoints, precision and speed knobs. Refused: everything that defines the data
#: order or the examples, the model, tokenizer and checkpoints it was trained from, and the KD objective (teacher,
#: divergence, kd_ratio, temperature); a key kdtune does not know is refused too (it cannot tell what it would do).
RESUME_RULES: tuple[tuple[str, str, str], ...] = (
    *((k, "refuse", _REFUSE_DATA) for k in DATA_ORDER_KEYS),
    ("dataset", "refuse", _REFUSE_EXAMPLES),
    ("val_dataset", "refuse", _REFUSE_EXAMPLES),
    ("val_split_ratio", "refuse", _REFUSE_EXAMPLES),
    ("tokenizer", "refuse", "it changes the tokens of every example"),
    ("model", "refuse", _REFUSE_MODEL),
    ("checkpointer", "refuse", _REFUSE_MODEL),
    ("optimizer._component_", "refuse", "the saved optimizer state belongs to the optimizer it was trained with"),
    ("optimizer", "apply", "set in the optimizer's parameter groups from the next step"),
    ("lr_scheduler", "apply", "the LR schedule is re-planned from the next step"),
    ("max_steps", "apply", "the run's length changes; the LR schedule is re-planned for it"),
    ("epochs", "apply", "the run's length changes; the LR schedule is re-planned for it"),
    *(
        (k, "refuse", _REFUSE_OBJECTIVE)
        for k in (
            "teacher_model",
            "teacher_checkpointer",
            "teacher_tokenizer",
            "teacher_logits",
            "kd_loss",
            "kd_ratio",
            "temperature",
            "scale_by_temperature_squared",
            "on_policy",
        )
    ),  # fmt: skip
    *(
        (k, "apply", _APPLY)
        for k in (
            "clip_grad_norm",
            "dtype",
            "device",
            "num_workers",
            "num_threads",
            "teacher_check",
            "compile",
            "enable_activation_checkpointing",
            "deterministic",
            "num_output_chunks",
            "log_every_n_steps",
            "eval_every_n_steps",
            "save_every_n_steps",
            "keep_last_n_checkpoints",
            "max_eval_batches",
            "log_peak_memory_stats",
            "progress_bar",
            "metric_logger",
            "save_adapter_weights_only",
            "fsdp_cpu_offload",
            "fsdp_reshard_after_forward",
        )
    ),  # fmt: skip
    ("recipe", "refuse", "the checkpoint was written by another recipe"),
)

_IGNORED = ("resume_from_checkpoint", "output_dir")


@dataclass(frozen=True)
class ResumeChange:
    """One config key that differs between a checkpoint and the resumed run, and what the resume does with it.

    Attributes:
        change: the key, its value in the checkpoint's config (``old``) and in the new one (``new``).
        apply: True when the new value is used, False when the resume is refused because of it.
        note: what happens (applied) or why it cannot change (refused).
    """

    change: ConfigChange
    apply: bool
    note: str

    def line(self) -> str:
        """``optimizer.lr: 0.003 -> 0.0003 (set in the optimizer's parameter groups from the next step)``."""
        return f"{self.change.key}: {_show(self.change.old)} -> {_show(self.change.new)} ({self.note})"


def _show(value: Any) -> str:
    return value if value == MISSING_VALUE else repr(value)


def _rule(key: str) -> tuple[bool, str]:
    for prefix, decision, note in RESUME_RULES:
        if key == prefix or key.startswith((prefix + ".", prefix + "[")):
            return decision == "apply", note
    return False, "kdtune cannot tell what changing it in the middle of a run would do"


def _plain_config(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    out = OmegaConf.to_container(cfg, resolve=True)
    return out if isinstance(out, dict) else {}


def _moved(old: Any, new: Any, old_out: Any, new_out: Any) -> bool:
    """Whether ``old`` -> ``new`` is only the move of the run directory ``old_out`` -> ``new_out`` (a copied run)."""
    if not (isinstance(old, str) and isinstance(new, str) and isinstance(old_out, str) and isinstance(new_out, str)):
        return False
    return bool(old_out) and old.replace(old_out, new_out) == new


#: the defaults the training recipes' settings declare (every training recipe's keys are KDDistributedSettings')
_DECLARED_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(KDDistributedSettings) if f.default is not dataclasses.MISSING
}


def _is_declared_default(key: str, value: Any) -> bool:
    """Whether ``value`` is the default the training recipes' settings declare for the top-level ``key``: a config
    that omits the key and one that spells out its default describe the same run."""
    return key in _DECLARED_DEFAULTS and _DECLARED_DEFAULTS[key] == value


def resume_changes(saved: Any, cfg: Any) -> list[ResumeChange]:
    """Every key in which ``cfg`` (the resumed run) differs from ``saved`` (the checkpoint's config), with its decision.

    ``resume_from_checkpoint`` and ``output_dir`` (and paths that only follow a moved ``output_dir``) are not changes,
    nor is a setting absent on one side and set to its declared default on the other.

    Args:
        saved: the checkpoint's config.
        cfg: the new run's config.

    Returns:
        One :class:`ResumeChange` per differing leaf key (see :data:`RESUME_RULES`).
    """
    old, new = _plain_config(saved), _plain_config(cfg)
    old_out, new_out = old.get("output_dir"), new.get("output_dir")
    out = []
    for change in config_diff(old, new, ignore=_IGNORED):
        if _moved(change.old, change.new, old_out, new_out):
            continue
        if MISSING_VALUE in (change.old, change.new):
            present = change.new if change.old == MISSING_VALUE else change.old
            if _is_declared_default(change.key, present):
                continue
        apply, note = _rule(change.key)
        out.append(ResumeChange(change, apply, note))
    return out


def plan_resume(saved: Any, cfg: Any, where: Path, step: int, total_steps: int) -> list[ResumeChange]:
    """Check a resume before anything is loaded: refuse (one line) when a key may not change or nothing is left to do.

    Args:
        saved: the checkpoint's config (None: nothing to compare).
        cfg: the new run's config (None: nothing to compare).
        where: the checkpoint directory, for messages.
        step: the checkpoint's step.
        total_steps: the new run's total optimizer steps.

    Returns:
        The applied changes (print them with :meth:`ResumeChange.line`).

    Raises:
        ConfigError: the first refused key (what it was, what it is, why, how to proceed), or a run length that ends
            before the checkpoint.
    """
    changes = resume_changes(saved, cfg) if saved is not None and cfg is not None else []
    refused = [c for c in changes if not c.apply]
    if refused:
        c = refused[0].change
        more = f" (also changed and refused: {', '.join(r.change.key for r in refused[1:])})" if refused[1:] else ""
        before = "null" if c.old is None else c.old
        fix = f"resume with {c.key}={before}" if c.old != MISSING_VALUE else f"resume without {c.key}"
        raise ConfigError(
            f"resume_from_checkpoint: {c.key} is {_show(c.new)} but the checkpoint {where} was trained with "
            f"{_show(c.old)}; {refused[0].note}: {fix} (or start a new run in another output_dir){more}"
        )
    if total_steps < step:
        keys = [c.change.key for c in changes if c.change.key in ("max_steps", "epochs")] or ["max_steps"]
        raise ConfigError(
            f"resume_from_checkpoint: the checkpoint {where} is at step {step} but {' and '.join(keys)} now end the run "
            f"after step {total_steps}; raise {keys[0]} above {step} to continue it"
        )
    return changes


@dataclass
class PlannedHyperparameters:
    """The freshly built optimizer's hyperparameters and schedule, taken before the checkpoint's state replaces them."""

    groups: list[dict[str, Any]]
    base_lrs: list[float] | None
    lambdas: list[dict[str, Any] | None] | None


def snapshot_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any) -> PlannedHyperparameters:
    """The freshly built optimizer's and schedule's settings; take it before loading a checkpoint over them."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    base = list(scheduler.base_lrs) if scheduler is not None and hasattr(scheduler, "base_lrs") else None
    lambdas = None
    if scheduler is not None and hasattr(scheduler, "lr_lambdas"):
        lambdas = [None if isinstance(fn, types.FunctionType) else dict(fn.__dict__) for fn in scheduler.lr_lambdas]
    return PlannedHyperparameters(groups, base, lambdas)


def _set_lr(group: dict[str, Any], lr: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def apply_resume_changes(
    changes: list[ResumeChange],
    planned: PlannedHyperparameters,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    *,
    verbose: bool = True,
) -> None:
    """After the checkpoint was loaded: put the applied changes into the optimizer and the schedule, and say so.

    A new ``optimizer.lr`` rescales the parameter groups' LR and the schedule's ``base_lrs`` (so the schedule continues
    from the new peak); other ``optimizer.*`` hyperparameters are set in the parameter groups; a new ``max_steps`` /
    ``epochs`` / ``lr_scheduler.*`` re-plans the schedule (the freshly built one's settings replace the saved ones).
    The rest (cadence, precision, ...) is read by the recipe from its new settings. One line per change is printed.

    Raises:
        ConfigError: an ``optimizer.*`` key that is not a hyperparameter of the optimizer's parameter groups.
    """
    keys = [c.change.key for c in changes if c.apply]
    opt_keys = {k.split(".", 1)[1].split(".")[0].split("[")[0] for k in keys if k.startswith("optimizer.")}
    for name in sorted(opt_keys - {"lr"}):
        if any(name not in g for g in planned.groups):
            raise ConfigError(
                f"resume_from_checkpoint: optimizer.{name} changed but it is not a hyperparameter of the optimizer's "
                f"parameter groups, so kdtune cannot change it on resume: resume with the checkpoint's value"
            )
        for group, new in zip(optimizer.param_groups, planned.groups):
            group[name] = new[name]
    replan = any(k in ("max_steps", "epochs") or k.startswith("lr_scheduler") for k in keys)
    if scheduler is not None and replan and planned.lambdas is not None:
        for fn, state in zip(scheduler.lr_lambdas, planned.lambdas):
            if state is not None:
                fn.__dict__.update(state)
    if "lr" in opt_keys or replan:
        if scheduler is not None and planned.base_lrs is not None:
            if "lr" in opt_keys:
                scheduler.base_lrs = list(planned.base_lrs)
                for group, base in zip(optimizer.param_groups, planned.base_lrs):
                    group["initial_lr"] = base
            lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(optimizer.param_groups, lrs):
                _set_lr(group, lr)
            scheduler._last_lr = lrs
        elif "lr" in opt_keys:
            for group, new in zip(optimizer.param_groups, planned.groups):
                _set_lr(group, float(new["lr"]))
    if verbose:
        for c in changes:
            if c.apply:
                print(f"resume: {c.line()}", flush=True)
        if "lr" in opt_keys or replan:
            lr = float(optimizer.param_groups[0]["lr"])
            print(f"resume: the learning rate of step {step + 1} is {lr:.6g}", flush=True)


#: largest magnitude a usable checkpoint's weights may have (far above any trained network's; what a diverged run
#: reaches just before it overflows)
WEIGHT_SANITY_BOUND = 1e8


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def unusable_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str | None:
    """Why the trainable weights (or the optimizer state) are not worth a checkpoint, or None when they are.

    Not usable: a NaN/inf in a trainable weight or an optimizer state tensor, or a weight beyond
    :data:`WEIGHT_SANITY_BOUND` in magnitude. For sharded (DTensor) parameters this rank's shard is checked.
    """
    for name, p in model.named_parameters():
        if not p.requires_grad or not p.is_floating_point():
            continue
        t = _local(p.detach())
        if t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            return f"weight {name} is not finite"
        peak = float(t.abs().max())
        if peak > WEIGHT_SANITY_BOUND:
            return f"weight {name} reaches {peak:.3g} (beyond {WEIGHT_SANITY_BOUND:.0e}: the run diverged)"
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, v in state.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
                    if not bool(torch.isfinite(_local(v)).all()):
                        return f"optimizer state {key} is not finite"
    return None


def set_aside_diverged(root: str | os.PathLike, step: int, *, move: bool = True) -> str | None:
    """After a NaN/inf at optimizer step ``step``: the checkpoints of steps >= ``step - 1`` hold the weights that
    produced it (resuming from them repeats it, whatever the learning rate), so they are renamed ``step_N.diverged``
    (resume skips them; they stay for inspection). Returns the newest remaining checkpoint, or None.

    Args:
        root: the checkpoints directory.
        step: the step whose loss or gradient norm was not finite.
        move: rename (False: only find the usable one, e.g. on ranks other than 0).
    """
    usable = None
    for path in complete_checkpoints(root):
        if int(_STEP_DIR.match(path.name).group(1)) < step - 1:
            usable = path
        elif move:
            target = path.with_name(f"{path.name}.diverged")
            if target.exists():
                shutil.rmtree(target)
            os.replace(path, target)
    return None if usable is None else str(usable)


def save_final(
    runtime: Runtime,
    checkpointer: Any,
    model: nn.Module,
    *,
    adapter_only: bool = False,
    tokenizer: Any | None = None,
    card: RunCard | None = None,
) -> list[Path]:
    """Write the final outputs: ``final/`` (HF dir, LoRA merged) and, for a LoRA model, ``final_adapter/`` (PEFT).

    ``final/`` also gets the hand-off files (:func:`kdtune.handoff.write_handoff`): the chat template ``tokenizer``
    trained with (``tokenizer_config.json`` + ``chat_template.jinja``) and the model card of ``card`` as README.md
    (replacing the one copied from the base model; licence files are kept).

    Args:
        runtime: output layout.
        checkpointer: the model's ``HFCheckpointer`` (copies config/tokenizer files from its checkpoint_dir).
        model: the trained model.
        adapter_only: LoRA only: write only the adapter.
        tokenizer: the run's tokenizer (its chat template is recorded); None = none.
        card: what the model card says (see :func:`run_card`); None = keep the base model's README.

    Returns:
        The directories written.
    """
    written = []
    lora = is_lora_model(model)
    if adapter_only and not lora:
        raise ConfigError("save_adapter_weights_only=true needs a LoRA model (a lora_* builder); set it to false")
    if lora:
        checkpointer.save_adapter(model, runtime.final_adapter_dir)
        written.append(runtime.final_adapter_dir)
    if not adapter_only:
        checkpointer.save_hf(model, runtime.final_dir)
        write_handoff(runtime.final_dir, tokenizer, card)
        written.append(runtime.final_dir)
    for d in written:
        log.info("saved %s", d)
    return written


def _node_value(node: Any, key: str) -> Any:
    """``node[key]`` of a config node (DictConfig or dict), else None."""
    if node is None or not isinstance(node, Mapping | DictConfig):
        return None
    return node.get(key)


def _checkpoint_name(checkpointer_cfg: Any) -> str | None:
    """The Hub id a checkpointer's ``checkpoint_dir`` was downloaded from, else the directory itself."""
    directory = _node_value(checkpointer_cfg, "checkpoint_dir")
    if directory is None:
        return None
    return base_model_id(directory) or str(directory)


def _dataset_names(dataset_cfg: Any) -> tuple[str, ...]:
    """What a ``dataset`` node trains on: its ``data_files``, else its ``source`` (or the builder's default source)."""
    nodes = list(dataset_cfg) if isinstance(dataset_cfg, list | ListConfig) else [dataset_cfg]
    names: list[str] = []
    for node in nodes:
        files = _node_value(node, "data_files")
        source = _node_value(node, "source")
        if files is not None:
            names += [str(f) for f in files] if isinstance(files, list | ListConfig) else [str(files)]
        elif source is not None:
            names.append(str(source))
        elif _node_value(node, "_component_"):
            component = str(node["_component_"])
            try:
                default = inspect.signature(import_component(component)).parameters.get("source")
            except (ConfigError, TypeError, ValueError):
                default = None
            has_default = default is not None and default.default is not inspect.Parameter.empty
            names.append(str(default.default) if has_default else component)
    return tuple(dict.fromkeys(names))


_THIS_PROCESS = object()


def run_card(settings: Any, report: Any, position: DataPosition, *, command: Any = _THIS_PROCESS) -> RunCard:
    """The model card facts of a finished run, from its settings and what it measured.

    Args:
        settings: the recipe's settings (fine-tuning or KD).
        report: the run's :class:`~kdtune.training.reporting.Reporter` (its ``evals`` and ``steps``).
        position: where training ended (``global_step`` = optimizer steps taken).
        command: the command that trained it; default: this process's (:func:`kdtune.handoff.command_line`), None =
            unknown.

    Returns:
        The :class:`~kdtune.handoff.RunCard` (teacher: the teacher checkpoint, or the cache dir of a cached teacher).
    """
    kd_loss = getattr(settings, "kd_loss", None)
    teacher = None
    if getattr(settings, "teacher_logits", None) is not None:
        teacher = str(_node_value(settings.teacher_logits, "path") or settings.teacher_logits.get("_component_"))
    elif getattr(settings, "teacher_checkpointer", None) is not None:
        teacher = _checkpoint_name(settings.teacher_checkpointer)
    metrics: dict[str, float] = {}
    if report.evals:
        metrics.update({k: float(v) for k, v in report.evals[-1].items() if k not in ("step", "val_tokens")})
    if report.steps:
        metrics["train_loss"] = float(report.steps[-1]["loss"])
    kd = kd_loss is not None
    return RunCard(
        base_model=_checkpoint_name(settings.checkpointer),
        teacher=teacher,
        datasets=_dataset_names(settings.dataset),
        loss=str(_node_value(kd_loss, "_component_")).rpartition(".")[2] if kd else "cross_entropy",
        kd_ratio=float(settings.kd_ratio) if kd else None,
        temperature=float(settings.temperature) if kd else None,
        steps=int(position.global_step),
        metrics=metrics,
        command=command_line() if command is _THIS_PROCESS else command,
    )
