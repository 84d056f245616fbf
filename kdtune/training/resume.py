"""Resume checkpoints: everything needed to continue a run exactly, one directory per saved step.

Layout (``<output_dir>/resume/step_00000120/``):

* ``model.pt`` — the model's state dict, or only its trainable tensors (LoRA adapter) with ``trainable_only=True``
* ``optimizer.pt``, ``lr_scheduler.pt`` — their state dicts (when given)
* ``rng.pt`` — python, numpy, torch CPU and CUDA generator states
* ``config.yaml`` — the run's config
* ``state.json`` — step, epoch, the data position (any JSON dict the recipe gives), written last

A directory is written under ``step_XXXXXXXX.tmp-<pid>`` and renamed when complete, so a crash never leaves a
half-written checkpoint where :meth:`ResumeState.find_latest` looks. After each save only the newest ``keep_last``
checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtune.errors import CheckpointError

__all__ = ["ResumeState", "LoadedState", "capture_rng_state", "restore_rng_state"]

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
    model_state_dict: dict[str, torch.Tensor] | None = None
    optimizer_state_dict: dict[str, Any] | None = None
    lr_scheduler_state_dict: dict[str, Any] | None = None


def _trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _config_to_yaml(config: Any) -> str:
    from omegaconf import OmegaConf  # noqa: PLC0415

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
            from omegaconf import OmegaConf  # noqa: PLC0415

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
