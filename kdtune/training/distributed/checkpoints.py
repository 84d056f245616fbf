"""Sharded resume checkpoints (``torch.distributed.checkpoint``) and the final HF save of a sharded model.

The layout mirrors the single-device one (``output_dir/checkpoints/step_N``, written atomically, newest
``keep_last_n_checkpoints`` kept) and holds model (or adapters), optimizer, LR schedule, every rank's RNG, the data
position and the config.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from kdtune.config import instantiate, save_config
from kdtune.errors import CheckpointError, ConfigError
from kdtune.handoff import RunCard, command_line
from kdtune.training.checkpoints import (
    _STEP_DIR,
    ResumeChange,
    apply_resume_changes,
    capture_rng_state,
    plan_resume,
    restore_components,
    restore_rng_state,
    save_final,
    set_aside_diverged,
    snapshot_hyperparameters,
    unusable_state,
)
from kdtune.training.data import DataPosition
from kdtune.training.distributed.env import (
    all_reduce_sum,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    is_distributed,
    is_rank_zero,
)
from kdtune.training.distributed.sharding import gather_full_state_dict
from kdtune.training.runtime import NonFiniteLossError, nonfinite_advice
from kdtune.training.setup import is_lora_model

__all__ = [
    "DistributedResumeCheckpoints",
    "latest_sharded_checkpoint",
    "load_sharded_checkpoint",
    "save_final_distributed",
    "save_sharded_checkpoint",
]


def latest_sharded_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The complete ``step_N`` directory with the largest N under ``checkpoints_dir`` (temporary dirs are ignored)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    steps = [(n, p) for n, p in steps if (p / "state.json").exists()]
    return max(steps)[1] if steps else None


def save_sharded_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra_state: Mapping[str, Any],
    *,
    keep_last: int = 1,
    trainable_only: bool = False,
    config: Any = None,
    component_states: Mapping[str, Any] | None = None,
) -> Path:
    """Write a resume checkpoint ``checkpoints_dir/step_<step>`` with ``torch.distributed.checkpoint``.

    Every rank writes its own shards of the model and optimizer state (no gather) plus its RNG state; rank 0 writes
    ``extra_state.pt`` (data position, LR schedule...), ``config.yaml`` and, last, ``state.json``. Everything goes to
    ``step_<step>.tmp`` first; after a barrier rank 0 renames it (atomic), then removes all but the newest
    ``keep_last`` complete checkpoints. ``checkpoints_dir`` must be on storage every rank sees (multi-node: shared FS).

    Args:
        checkpoints_dir: the directory of resume checkpoints.
        step: optimizer steps done.
        model: the sharded model.
        optimizer: its optimizer.
        extra_state: the rest of the run state (LR schedule state dict, data position, config...), saved by rank 0
            with ``torch.save`` (so every rank must pass the same values).
        keep_last: complete checkpoints to keep (>= 1).
        trainable_only: store only trainable parameters (LoRA: the frozen base comes from the HF checkpoint).
        config: the run's config, saved as ``config.yaml``.
        component_states: this rank's states of other stateful components (e.g. the objective's sampling RNG),
            saved per rank as ``components_rank<r>.pt``.

    Returns:
        The final checkpoint directory.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    root = Path(checkpoints_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp-{broadcast_object(os.getpid())}"  # rank 0's pid: removed at the next start if left
    if is_rank_zero():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp), no_dist=not is_distributed())
    torch.save(capture_rng_state(), tmp / f"rng_rank{get_rank()}.pt")
    if component_states:
        torch.save(dict(component_states), tmp / f"components_rank{get_rank()}.pt")
    barrier()
    if is_rank_zero():
        torch.save(dict(extra_state), tmp / "extra_state.pt")
        if config is not None:
            save_config(config, tmp / "config.yaml")
        meta = {"step": step, "world_size": get_world_size(), "trainable_only": trainable_only, "format": "dcp"}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))  # written last: marks the checkpoint complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        complete = sorted(
            (int(m.group(1)), p)
            for p in root.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / "state.json").exists()
        )
        for _, old in complete[: max(0, len(complete) - max(1, keep_last))]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_sharded_checkpoint(
    checkpoint_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from :func:`save_sharded_checkpoint`'s directory.

    The world size must be the one the checkpoint was written with (the data position is per rank).

    Args:
        checkpoint_dir: a ``step_N`` directory.
        model: the sharded model, built and sharded as when it was saved.
        optimizer: its optimizer (state is created if still empty).

    Returns:
        The ``extra_state`` dict saved with it (plus ``step``, and ``components``: this rank's component states).

    Raises:
        CheckpointError: incomplete checkpoint, or a different world size.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    ckpt = Path(checkpoint_dir)
    if not (ckpt / "state.json").exists():
        raise CheckpointError(f"{ckpt}: not a complete resume checkpoint (no state.json); delete it and resume again.")
    state = json.loads((ckpt / "state.json").read_text())
    if int(state.get("world_size", 1)) != get_world_size():
        raise CheckpointError(
            f"{ckpt}: written by {state.get('world_size')} processes but this run has {get_world_size()}; resume "
            f"with --nproc_per_node {state.get('world_size')} (total processes must match)."
        )
    options = StateDictOptions(ignore_frozen_params=bool(state.get("trainable_only", False)))
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    to_load = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(to_load, checkpoint_id=str(ckpt), no_dist=not is_distributed())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=to_load["model"],
        optim_state_dict=to_load["optimizer"],
        options=options,
    )
    rng_path = ckpt / f"rng_rank{get_rank()}.pt"
    if rng_path.exists():
        restore_rng_state(torch.load(rng_path, weights_only=True))
    extra = torch.load(ckpt / "extra_state.pt", weights_only=False) if (ckpt / "extra_state.pt").exists() else {}
    components_path = ckpt / f"components_rank{get_rank()}.pt"
    components = torch.load(components_path, weights_only=True) if components_path.exists() else {}
    return {**extra, **state, "components": components}


class DistributedResumeCheckpoints:
    """The distributed recipes' resume checkpoints: :class:`kdtune.training.checkpoints.ResumeCheckpoints`'s interface
    (``save(pos)``, ``resume()``, ``last``) on sharded ``torch.distributed.checkpoint`` directories.

    ``output_dir/checkpoints/step_N/`` holds the DCP shards of the model (only the adapters of a LoRA model) and the
    optimizer, one RNG file per rank, ``extra_state.pt`` (LR schedule, data position, fp16 loss scaler), ``config.yaml`` and
    ``state.json`` (written last). The newest ``keep_last_n_checkpoints`` are kept.

    Args:
        runtime: output layout (``runtime.checkpoints_dir``).
        settings: recipe settings (``keep_last_n_checkpoints``).
        model: the sharded model.
        optimizer: its optimizer.
        scheduler: its LR schedule or None.
        data: the :class:`kdtune.training.data.TrainData` (its ``position`` is saved and restored).
        cfg: the run's config, saved with each checkpoint.
        components: other stateful parts of the run (name -> object with ``state_dict()``/``load_state_dict()``),
            saved and restored per rank.
    """

    def __init__(
        self,
        runtime: Any,
        settings: Any,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        data: Any,
        cfg: Any = None,
        components: dict[str, Any] | None = None,
    ) -> None:
        self.runtime, self.keep_last = runtime, int(settings.keep_last_n_checkpoints)
        self.model, self.optimizer, self.scheduler, self.data, self.cfg = model, optimizer, scheduler, data, cfg
        self.trainable_only = is_lora_model(model)
        self.components = dict(components or {})
        self.last: str | None = None

    def _unusable(self) -> str | None:
        """:func:`kdtune.training.checkpoints.unusable_state` over every rank's shards (the same answer on all)."""
        problem = unusable_state(self.model, self.optimizer)
        if is_distributed() and float(all_reduce_sum(0.0 if problem is None else 1.0)) > 0 and problem is None:
            problem = "the weights or optimizer state of another rank are not finite (or diverged)"
        return problem

    def save(self, pos: Any) -> Path:
        """Write the checkpoint of the optimizer step that ended at ``pos`` (every rank must call it).

        Raises:
            NonFiniteLossError: the weights or optimizer state are not usable on some rank: nothing is written.
        """
        problem = self._unusable()
        if problem is not None:
            raise NonFiniteLossError(f"after step {pos.global_step} {problem}; {nonfinite_advice(self.last)}")
        nxt = pos if not self.data.is_epoch_end(pos) else DataPosition(pos.epoch + 1, 0, pos.global_step)
        extra = {
            "data_state": nxt.state_dict(),
            "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "precision": self.runtime.precision.state_dict(),  # fp16 loss scale (the same on every rank); {} otherwise
            "command": command_line(),  # for the model card of an export of this checkpoint
        }
        path = save_sharded_checkpoint(
            self.runtime.checkpoints_dir,
            pos.global_step,
            self.model,
            self.optimizer,
            extra,
            keep_last=self.keep_last,
            trainable_only=self.trainable_only,
            config=self.cfg,
            component_states={name: c.state_dict() for name, c in self.components.items()},
        )
        self.last = str(path)
        return path

    def diverged(self, step: int) -> str | None:
        """:meth:`kdtune.training.ResumeCheckpoints.diverged` (rank 0 renames; every rank returns the same path)."""
        self.last = set_aside_diverged(self.runtime.checkpoints_dir, step, move=is_rank_zero())
        return self.last

    def resume(self) -> Any:
        """Restore the newest checkpoint into the model, optimizer, schedule, RNG and data position.

        Raises:
            CheckpointError: there is no complete checkpoint under ``output_dir/checkpoints``.
        """
        path = latest_sharded_checkpoint(self.runtime.checkpoints_dir)
        if path is None:
            raise CheckpointError(
                f"resume_from_checkpoint=true but {self.runtime.checkpoints_dir} holds no complete step_N checkpoint; "
                "set resume_from_checkpoint=false or point output_dir at the run to continue."
            )
        saved = OmegaConf.load(path / "config.yaml") if (path / "config.yaml").is_file() else None
        step = int(json.loads((path / "state.json").read_text())["step"])
        changes: list[ResumeChange] = plan_resume(saved, self.cfg, path, step, self.data.total_steps)
        planned = snapshot_hyperparameters(self.optimizer, self.scheduler)
        state = load_sharded_checkpoint(path, self.model, self.optimizer)
        if self.scheduler is not None and state.get("lr_scheduler") is not None:
            self.scheduler.load_state_dict(state["lr_scheduler"])
        self.runtime.precision.load_state_dict(state.get("precision"))
        problem = self._unusable()
        if problem is not None:
            raise CheckpointError(f"{path} is not usable: {problem}; delete it to resume from the checkpoint before it")
        apply_resume_changes(changes, planned, self.optimizer, self.scheduler, step, verbose=is_rank_zero())
        self.data.position = DataPosition.from_state_dict(state["data_state"])
        restore_components(self.components, state["components"])
        self.last = str(path)
        return self.data.position


def save_final_distributed(
    runtime: Any,
    checkpointer: Any,
    model: nn.Module,
    model_cfg: Any,
    *,
    adapter_only: bool = False,
    tokenizer: Any | None = None,
    card: RunCard | None = None,
) -> list[Path]:
    """Gather the trained model on rank 0 and write ``final/`` (HF) and, for LoRA, ``final_adapter/`` (PEFT).

    Every rank must call it. The full state dict is gathered one tensor at a time into rank 0's CPU memory (only the
    adapters when ``adapter_only``), loaded with ``assign=True`` into a fresh copy of the model built on ``meta`` (no
    second copy of the weights), and written by :func:`kdtune.training.checkpoints.save_final`, i.e. by the same
    ``HFCheckpointer.save_hf`` / ``save_adapter`` as the single-device recipes.

    Args:
        runtime: output layout.
        checkpointer: the model's ``HFCheckpointer``.
        model: the sharded trained model.
        model_cfg: the model ``_component_`` node (to rebuild the unsharded module on rank 0).
        adapter_only: LoRA only: write only the adapter.
        tokenizer: the run's tokenizer (its chat template goes into ``final/``).
        card: the model card facts (:func:`kdtune.training.checkpoints.run_card`).

    Returns:
        The directories written (on rank 0; ``[]`` elsewhere).
    """
    lora = is_lora_model(model)
    if adapter_only and not lora:
        raise ConfigError("save_adapter_weights_only=true needs a LoRA model (a lora_* builder); set it to false")
    full = gather_full_state_dict(model, trainable_only=adapter_only)
    written: list[Path] = []
    if is_rank_zero():
        dtype = next(iter(full.values())).dtype
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"):
                plain = instantiate(model_cfg)
        finally:
            torch.set_default_dtype(prev)
        plain.load_state_dict(full, strict=not adapter_only, assign=True)
        written = save_final(runtime, checkpointer, plain, adapter_only=adapter_only, tokenizer=tokenizer, card=card)
        del plain
    del full
    barrier()
    return written
