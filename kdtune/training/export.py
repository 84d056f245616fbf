"""``kdtune export``: turn any resume checkpoint of a run into the hand-off format of its ``final/``.

A resume checkpoint (``<run_dir>/checkpoints/step_N``, single-device ``torch.save`` or distributed
``torch.distributed.checkpoint`` shards) holds the model (only the adapters of a LoRA model) and the run's
``config.yaml``. The export rebuilds the model from that config (its ``model`` component, base weights from its
``checkpointer``), loads the saved tensors and writes ``<output_dir>/final`` (HF, LoRA merged, chat template, model
card) and, for a LoRA model, ``<output_dir>/final_adapter`` (PEFT) with :func:`kdtune.training.checkpoints.save_final`
— the very code a run's final save uses, so the files equal a ``final/`` written at that step bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdtune.config import read_settings
from kdtune.errors import CheckpointError, ConfigError
from kdtune.training.checkpoints import ResumeState, run_card, save_final
from kdtune.training.data import DataPosition
from kdtune.training.runtime import Runtime, get_dtype
from kdtune.training.settings import (
    KDDistributedSettings,
    KDSettings,
    LoRAFinetuneDistributedSettings,
    LoRAFinetuneSettings,
)
from kdtune.training.setup import build_model, build_tokenizer

__all__ = ["ExportResult", "export_checkpoint", "find_checkpoint", "list_steps"]

log = logging.getLogger("kdtune")

_STEP_NAME = re.compile(r"^(?:step_)?(\d+)$")


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote.

    Attributes:
        checkpoint: the checkpoint directory read.
        step: its optimizer step.
        written: the directories written (``final/`` and, for LoRA, ``final_adapter/``).
    """

    checkpoint: Path
    step: int
    written: list[Path]


def list_steps(checkpoints_dir: Path) -> list[Path]:
    """The complete ``step_N`` checkpoints (with ``state.json``, either format) in ``checkpoints_dir``, oldest first."""
    return ResumeState.list_checkpoints(checkpoints_dir)


def _available(checkpoints_dir: Path) -> str:
    steps = list_steps(checkpoints_dir)
    return ", ".join(p.name for p in steps) if steps else "none"


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Resolve the checkpoint a user named: a ``step_N`` directory, or ``<checkpoints>/<N>`` by step number.

    Raises:
        CheckpointError: the step does not exist (naming those that do), a run directory without checkpoints (or with
            several, naming them), or a path that is no checkpoint.
    """
    p = Path(path).expanduser()
    if p.is_dir() and (p / "state.json").is_file():
        return p
    if p.name == "checkpoints" or (p.parent.name == "checkpoints" and not p.parent.is_dir()):
        p = p if p.name == "checkpoints" else p.parent
        if not list_steps(p):
            raise CheckpointError(
                f"run {p.parent} has no checkpoints (nothing complete in {p}): set save_every_n_steps when training, "
                "or use its final/ directly"
            )
        raise CheckpointError(f"name one checkpoint of {p}, e.g. kdtune export {list_steps(p)[-1]} "
                              f"(available: {_available(p)})")  # fmt: skip
    if p.is_dir() and ((p / "checkpoints").is_dir() or (p / "config.yaml").is_file()):
        steps = list_steps(p / "checkpoints")
        if not steps:
            raise CheckpointError(
                f"{p} is a run directory without checkpoints (no {p / 'checkpoints'}/step_N): set save_every_n_steps "
                "when training, or use its final/ directly"
            )
        raise CheckpointError(
            f"{p} is a run directory: name one of its checkpoints, e.g. kdtune export {steps[-1]} "
            f"(available: {_available(p / 'checkpoints')})"
        )
    parent = p.parent
    m = _STEP_NAME.match(p.name)
    if m and parent.is_dir():
        matches = [s for s in list_steps(parent) if int(_STEP_NAME.match(s.name).group(1)) == int(m.group(1))]
        if matches:
            return matches[0]
        raise CheckpointError(f"no checkpoint of step {int(m.group(1))} in {parent} (available: {_available(parent)})")
    if p.is_dir() and p.name.startswith("step_"):
        raise CheckpointError(f"{p} is not a complete checkpoint (no state.json): pick another step of {parent}")
    raise CheckpointError(
        f"{p} is not a checkpoint: pass <run_dir>/checkpoints/step_N (a directory with state.json and config.yaml)"
    )


def _settings(cfg: DictConfig, distributed: bool) -> Any:
    """The run's settings read with the class of the recipe kind that wrote the checkpoint (unknown keys ignored)."""
    kd = cfg.get("kd_loss") is not None
    cls = {
        (True, False): KDSettings,
        (True, True): KDDistributedSettings,
        (False, False): LoRAFinetuneSettings,
        (False, True): LoRAFinetuneDistributedSettings,
    }[(kd, distributed)]
    known = {f.name for f in dataclasses.fields(cls)} | {"recipe"}
    extra = [k for k in cfg.keys() if k not in known]
    if extra:  # a custom recipe's own keys: not needed to rebuild the model
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k in known])
    return read_settings(cls, cfg)


def _logged(run_dir: Path, step: int) -> SimpleNamespace:
    """The training and validation rows the run logged at ``step`` (for the model card's metrics)."""
    evals, steps = [], []
    for f in sorted((run_dir / "logs").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step") != step:
                continue
            vals = {k: v for k, v in row.items() if isinstance(v, int | float)}
            (evals if "val_loss" in row else steps if "loss" in row else []).append(vals)
    return SimpleNamespace(evals=evals[-1:], steps=steps[-1:])


def _load_dcp(model: nn.Module, ckpt: Path, trainable_only: bool) -> None:
    """Load the model tensors of a ``torch.distributed.checkpoint`` directory into an unsharded model, in place."""
    import torch.distributed.checkpoint as dcp

    saved = {
        k.removeprefix("model.")
        for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        if k.startswith("model.")
    }
    if trainable_only:
        wanted = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    else:
        wanted = {k: v for k, v in model.state_dict().items()}
    missing = sorted(set(wanted) - saved)
    # a tied output projection may be stored once under the embedding's name
    missing = [k for k in missing if not any(wanted[k].data_ptr() == wanted[s].data_ptr() for s in saved & set(wanted))]
    unexpected = sorted(saved - set(wanted))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt} does not fit the model of its config.yaml (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "export with the model and LoRA settings it was trained with"
        )
    state = {k: v for k, v in wanted.items() if k in saved}
    with warnings.catch_warnings():  # one process reading every shard is the intent here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({"model": state}, checkpoint_id=str(ckpt), no_dist=True)


def export_checkpoint(checkpoint: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> ExportResult:
    """Write a resume checkpoint as ``output_dir/final`` (HF) and, for LoRA, ``output_dir/final_adapter`` (PEFT).

    Args:
        checkpoint: ``<run_dir>/checkpoints/step_N`` (or ``<run_dir>/checkpoints/N``).
        output_dir: where ``final/`` (and ``final_adapter/``) go.

    Returns:
        The :class:`ExportResult`.

    Raises:
        CheckpointError: see :func:`find_checkpoint`; a checkpoint without its config.yaml or whose tensors do not fit.
    """
    ckpt = find_checkpoint(checkpoint)
    meta = json.loads((ckpt / "state.json").read_text())
    if not (ckpt / "config.yaml").is_file():
        raise CheckpointError(f"{ckpt} has no config.yaml: only checkpoints written by a kdtune recipe can be exported")
    distributed = meta.get("format") == "dcp"
    trainable_only = bool(meta.get("trainable_only")) if distributed else meta.get("model_state") == "trainable"
    step = int(meta["step"])
    cfg = OmegaConf.load(ckpt / "config.yaml")
    try:
        s = _settings(cfg, distributed)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt}/config.yaml: {e}") from e
    out = Path(output_dir).expanduser()
    rt = Runtime(device=torch.device("cpu"), dtype=get_dtype(s.dtype), output_dir=out)
    out.mkdir(parents=True, exist_ok=True)
    model, checkpointer = build_model(s.model, s.checkpointer, rt)  # LoRA: base weights from the checkpointer
    if distributed:
        _load_dcp(model, ckpt, trainable_only)
    else:
        state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True, mmap=True)
        ResumeState._load_model(model, state, trainable_only, ckpt)
        del state
    extra = meta.get("extra", {}) if not distributed else {}
    if distributed and (ckpt / "extra_state.pt").is_file():
        extra = torch.load(ckpt / "extra_state.pt", weights_only=False)
    card = run_card(s, _logged(ckpt.parent.parent, step), DataPosition(global_step=step), command=extra.get("command"))
    written = save_final(rt, checkpointer, model, tokenizer=build_tokenizer(s.tokenizer), card=card)
    return ExportResult(ckpt, step, written)
