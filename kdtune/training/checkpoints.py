"""Checkpoints of a run: resume checkpoints (everything needed to continue exactly, one directory per saved step),
the recipe-level :class:`ResumeCheckpoints` that saves/restores model, optimizer, schedule, RNG and data position, and
the final outputs (``final/`` HF model, ``final_adapter/`` PEFT adapter).

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

import json
import logging
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdtune.errors import CheckpointError, ConfigError
from kdtune.training.data import DataPosition, TrainData
from kdtune.training.runtime import Runtime
from kdtune.training.setup import is_lora_model

log = logging.getLogger("kdtune")

__all__ = [
    "DATA_ORDER_KEYS",
    "LoadedState",
    "ResumeCheckpoints",
    "ResumeState",
    "capture_rng_state",
    "check_same_data_order",
    "restore_components",
    "restore_rng_state",
    "save_final",
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
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
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
        root = Path(root)
        if not root.is_dir():
            return []
        found = []
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir() and (child / "state.json").is_file():
                found.append((int(m.group(1)), child))
        return [p for _, p in sorted(found)]

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
    optimizer, the LR schedule, the RNG states, the data position and the config — enough to continue exactly.

    Args:
        runtime: output layout.
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
        self.components = dict(components or {})
        self.trainable_only = is_lora_model(model)
        self.last: str | None = None

    def save(self, pos: DataPosition) -> Path:
        """Write the checkpoint of the step that ended at ``pos``."""
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
            component_states={name: c.state_dict() for name, c in self.components.items()},
        )
        self.last = str(path)
        log.info("saved resume checkpoint %s", path)
        return path

    def resume(self) -> DataPosition:
        """Restore the newest checkpoint into the model, optimizer, schedule, RNG and data position."""
        latest = self.state.find_latest()
        if latest is not None and self.cfg is not None and (latest / "config.yaml").is_file():
            check_same_data_order(self.cfg, OmegaConf.load(latest / "config.yaml"), latest)
        loaded = self.state.load(model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler)
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
DATA_ORDER_KEYS = ("seed", "shuffle", "batch_size", "gradient_accumulation_steps", "max_steps_per_epoch")


def check_same_data_order(cfg: DictConfig, saved: DictConfig, where: Path) -> None:
    """Raise ConfigError when a resumed run changes a setting that defines the data order (see ``DATA_ORDER_KEYS``)."""
    for key in DATA_ORDER_KEYS:
        now, before = cfg.get(key), saved.get(key)
        if now != before:
            raise ConfigError(
                f"resume_from_checkpoint: {key} is {now!r} but the checkpoint {where} was trained with {before!r}; "
                f"resume with {key}={before} (or start a new run in another output_dir)"
            )


def save_final(runtime: Runtime, checkpointer: Any, model: nn.Module, *, adapter_only: bool = False) -> list[Path]:
    """Write the final outputs: ``final/`` (HF dir, LoRA merged) and, for a LoRA model, ``final_adapter/`` (PEFT).

    Args:
        runtime: output layout.
        checkpointer: the model's ``HFCheckpointer`` (copies config/tokenizer files from its checkpoint_dir).
        model: the trained model.
        adapter_only: LoRA only: write only the adapter.

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
        written.append(runtime.final_dir)
    for d in written:
        log.info("saved %s", d)
    return written
