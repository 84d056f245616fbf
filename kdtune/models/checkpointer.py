"""Read and write Hugging Face checkpoint directories and PEFT LoRA adapters.

The checkpointer knows files, not architectures: it reads ``config.json``, asks the registry for the model family
(``family_for_hf_config``) and lets the family convert names and layouts. Loading goes one weight file at a time
(never two full copies of the model in memory); saving writes one shard at a time into a temporary directory that
replaces the output directory only when complete.

Typical use::

    ckpt = HFCheckpointer("/tmp/Llama-3.2-1B-Instruct", output_dir="/tmp/run")
    model = kdtune.models.hf_model("/tmp/Llama-3.2-1B-Instruct")    # or a named builder
    ckpt.load_into(model)
    ...
    ckpt.save_hf(model, "epoch_0")                # merged LoRA, loads in transformers
    ckpt.save_adapter(model, "epoch_0_adapter")   # PEFT adapter (LoRA models)

Each save replaces its whole target directory, so keep adapters and full models in sibling directories.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtune.errors import CheckpointError
from kdtune.models._family import ModelFamily, family_for_hf_config, registered_families
from kdtune.models._safetensors_io import (
    ShardWriter,
    atomic_directory,
    check_weight_tensor,
    copy_non_weight_files,
    list_weight_files,
    parse_size,
    read_json,
    read_weight_file,
    resolve_weight_files,
)
from kdtune.models.modules.lora import (
    LoRALinear,
    _dequantize,
    get_adapter_params,
    get_lora_modules,
    initialize_lora_params,
)

__all__ = [
    "HFCheckpointer",
    "LoadResult",
    "family_for_model",
    "load_adapter",
    "load_state_dict_shardwise",
    "read_hf_config",
    "save_adapter",
    "save_hf",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
SOURCE_FILE = "kdtune_source.json"
_PEFT_PREFIX = "base_model.model."
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


# ------------------------------------------------------------------------------------------------------ helpers
def read_hf_config(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of an HF model directory as a dict.

    Raises:
        CheckpointError: the directory or its ``config.json`` is missing or unreadable.
    """
    d = Path(checkpoint_dir).expanduser()
    if not d.is_dir():
        what = "is a file, not a directory" if d.exists() else "does not exist"
        raise CheckpointError(
            f"checkpoint_dir {str(d)!r} {what}; download the model first (e.g. `kdtune download <repo>`) "
            "or fix checkpoint_dir."
        )
    path = d / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint_dir {str(d)!r} has no config.json (files there: {sorted(p.name for p in d.iterdir())[:15]}); "
            "point checkpoint_dir at a Hugging Face model directory."
        )
    return read_json(path)


def family_for_model(model: nn.Module) -> ModelFamily:
    """The ``ModelFamily`` of a kdtune model (from its ``hf_family`` name, else its ``hf_config``)."""
    name = getattr(model, "hf_family", "") or ""
    families = registered_families()
    if name in families:
        return families[name].for_config(getattr(model, "hf_config", None) or {})
    cfg = getattr(model, "hf_config", None)
    if cfg:
        return family_for_hf_config(cfg, source=f"{type(model).__name__}.hf_config")
    raise CheckpointError(
        f"{type(model).__name__} has no hf_family/hf_config; build it with a kdtune builder or kdtune.models.hf_model."
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The kdtune model inside common wrappers (torch.compile's OptimizedModule)."""
    return getattr(model, "_orig_mod", model)


def _hf_name_of_key(family: ModelFamily, key: str) -> str:
    """Best-effort HF name of a kdtune state-dict key, for error messages."""
    module, _, leaf = key.rpartition(".")
    try:
        return f"{family.module_name_to_hf(module)}.{leaf}"
    except Exception:
        return key


def _few(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ------------------------------------------------------------------------------------------------------ loading
@dataclass
class LoadResult:
    """What ``load_state_dict_shardwise`` loaded: the files read, and the keys missing from / unexpected in them."""

    files: list[str] = field(default_factory=list)
    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def load_state_dict_shardwise(
    model: nn.Module,
    checkpoint_dir: str | os.PathLike[str],
    checkpoint_files: list[str] | dict[str, Any] | None = None,
    *,
    strict: bool = True,
    assign: bool = False,
    device: torch.device | str | None = None,
) -> LoadResult:
    """Load an HF checkpoint directory into a kdtune model, one weight file at a time.

    Each file is read, converted by the model's family (``state_dict_from_hf``), checked (shapes), cast to the dtype
    of the parameter it fills and copied in (or, with ``assign=True``, assigned: the way to fill a model built on the
    meta device). LoRA matrices are not part of a base checkpoint; with ``assign=True`` those still on meta are then
    created on the base weights' device (PEFT init). QLoRA base weights are quantised to NF4 as they load.

    Args:
        model: a kdtune model (carries ``hf_family``/``hf_config``).
        checkpoint_dir: the HF model directory (``config.json`` + weights).
        checkpoint_files: weight files to read (default: auto-detected, see ``resolve_weight_files``).
        strict: raise on missing or unexpected keys (LoRA matrices never count as missing).
        assign: assign the loaded tensors instead of copying into existing parameters (meta-device models).
        device: with ``assign=True``, where the tensors go (default: CPU, or the parameter's device if not meta).

    Returns:
        A ``LoadResult``.

    Raises:
        CheckpointError: directory/config/files missing, architecture unsupported or different from the model's,
            a tensor shape differs from the model's, or (strict) keys are missing/unexpected.
    """
    model = _unwrap(model)
    ckpt_dir = Path(checkpoint_dir).expanduser()
    hf_config = read_hf_config(ckpt_dir)
    family = family_for_hf_config(hf_config, source=str(ckpt_dir / "config.json"))
    model_family = getattr(model, "hf_family", "") or ""
    if model_family and model_family != family.name:
        raise CheckpointError(
            f"{ckpt_dir / 'config.json'} describes a {family.name!r} model but the model was built as "
            f"{model_family!r}; build it from this directory (kdtune.models.hf_model) or pick the matching builder."
        )
    files = resolve_weight_files(ckpt_dir, checkpoint_files)

    expected: dict[str, torch.Tensor] = model.state_dict(keep_vars=True)
    adapter_keys = set(get_adapter_params(model))
    result = LoadResult(files=[p.name for p in files])
    loaded: set[str] = set()
    for path in files:
        hf_part = read_weight_file(path)
        part = family.state_dict_from_hf(hf_part, hf_config)
        del hf_part
        ready: dict[str, torch.Tensor] = {}
        for key, tensor in part.items():
            target = expected.get(key)
            if target is None or key in adapter_keys:
                result.unexpected_keys.append(key)
                continue
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{path.name}: tensor {_hf_name_of_key(family, key)!r} (kdtune {key!r}) has shape "
                    f"{list(tensor.shape)} but the model built from config.json expects {list(target.shape)}; "
                    "the weights do not match config.json (wrong checkpoint_files or config?)."
                )
            if key in loaded:
                raise CheckpointError(f"{path.name}: tensor {key!r} appears in more than one weight file.")
            check_weight_tensor(path, _hf_name_of_key(family, key), tensor, expect_float=target.is_floating_point())
            dtype = target.dtype
            dev = target.device
            if dev.type == "meta":
                dev = torch.device(device) if device is not None else torch.device("cpu")
            elif assign and device is not None:
                dev = torch.device(device)
            ready[key] = tensor.to(device=dev, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            loaded.add(key)
        del part
        if ready:
            incompatible = model.load_state_dict(ready, strict=False, assign=assign)
            if incompatible.unexpected_keys:  # pragma: no cover - filtered above
                result.unexpected_keys.extend(incompatible.unexpected_keys)
        del ready
    result.loaded_keys = sorted(loaded)
    missing = [k for k in expected if k not in loaded and k not in adapter_keys]
    result.missing_keys = missing
    if strict and (missing or result.unexpected_keys):
        parts = []
        if missing:
            named = [f"{_hf_name_of_key(family, k)} ({k})" for k in missing[:5]]
            parts.append(f"missing {len(missing)} tensor(s) the model needs: {_few(named + missing[5:])}")
        if result.unexpected_keys:
            unexp = result.unexpected_keys
            named = [f"{_hf_name_of_key(family, k)} ({k})" for k in unexp[:5]]
            parts.append(f"{len(unexp)} unexpected tensor(s): {_few(named + unexp[5:])}")
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} ({_few(result.files, 3)}) does not match the model: {'; '.join(parts)}. "
            f"Weight files present: {list_weight_files(ckpt_dir)}; check checkpoint_files and config.json."
        )
    if missing or result.unexpected_keys:
        logger.warning(
            "non-strict load from %s: %d missing (%s), %d unexpected (%s)",
            ckpt_dir,
            len(missing),
            _few(missing),
            len(result.unexpected_keys),
            _few(result.unexpected_keys),
        )
    if assign:
        initialize_lora_params(model, device)
    return result


# ------------------------------------------------------------------------------------------------------ saving
def _state_groups(keys: Iterable[str]) -> list[list[str]]:
    """State-dict keys grouped as [non-layer keys] + one group per decoder layer, so conversion and LoRA merging
    can run one layer at a time."""
    top: list[str] = []
    layers: dict[int, list[str]] = {}
    for k in keys:
        m = _LAYER_KEY.match(k)
        if m:
            layers.setdefault(int(m.group(1)), []).append(k)
        else:
            top.append(k)
    return [top] + [layers[i] for i in sorted(layers)]


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storage_key(t: torch.Tensor) -> tuple[int, int, int] | None:
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
    except Exception:  # pragma: no cover - tensor subclasses without storage
        return None


def save_hf(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    source_dir: str | os.PathLike[str] | None = None,
    max_shard_size: str | int = "5GB",
    safe_serialization: bool = True,
    merged_lora: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face model directory that ``transformers.AutoModelForCausalLM.from_pretrained``
    loads unchanged.

    Writes shards (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, or ``model.safetensors``
    when one shard suffices), ``config.json`` (``model.hf_config`` with ``torch_dtype``), and copies tokenizer files,
    ``generation_config.json`` and other non-weight files from ``source_dir``. LoRA updates are merged into the saved
    weights (``merged_lora=True``; else the base weights are saved) and NF4 weights dequantised, without changing the
    live model. Tied embeddings are saved once, as HF does. The directory appears atomically.

    Args:
        model: a kdtune model.
        out_dir: the directory to create or replace.
        source_dir: the HF directory the model came from (non-weight files are copied from it), or None.
        max_shard_size: e.g. ``"5GB"`` (10^9 bytes per GB, like HF), ``"200MB"``, or bytes.
        safe_serialization: safetensors (True) or ``pytorch_model*.bin`` (False).
        merged_lora: fold LoRA updates into the weights (True) or save the base weights only.
        dtype: save floating tensors in this dtype (default: the model's parameter dtype).

    Returns:
        The final directory path.
    """
    model = _unwrap(model)
    family = family_for_model(model)
    hf_config = dict(getattr(model, "hf_config", None) or {})
    if not hf_config:
        raise CheckpointError(f"{type(model).__name__} has no hf_config; cannot write config.json.")
    shard_bytes = parse_size(max_shard_size)
    out = Path(out_dir).expanduser().absolute()
    if source_dir is not None and out == Path(source_dir).expanduser().absolute():
        raise CheckpointError(
            f"output directory {str(out)!r} is the checkpoint directory being read; choose a different output_dir."
        )
    lora_mods = get_lora_modules(model)
    lora_weight_keys = {(f"{n}.weight" if n else "weight"): m for n, m in lora_mods.items()}
    adapter_keys = set(get_adapter_params(model))
    state = {k: v for k, v in model.state_dict().items() if k not in adapter_keys}
    if dtype is None:
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else torch.float32
    tie = bool(hf_config.get("tie_word_embeddings", False))

    with atomic_directory(out) as tmp:
        writer = ShardWriter(tmp, shard_bytes, safe_serialization)
        seen_storage: dict[tuple[int, int, int], str] = {}
        for group in _state_groups(state):
            part: dict[str, torch.Tensor] = {}
            for k in group:
                if merged_lora and k in lora_weight_keys:
                    t = lora_weight_keys[k].merged_weight(torch.float32)
                else:
                    t = _dequantize(state[k])
                part[k] = t.to(dtype) if t.is_floating_point() else t
            hf_part = family.state_dict_to_hf(part, hf_config)
            for name, t in hf_part.items():
                skey = _storage_key(t)
                if skey is not None and skey in seen_storage:
                    if tie and "lm_head" in name:
                        continue  # the tied output projection is the embedding; HF does not store it twice
                    t = t.clone()
                elif skey is not None:
                    seen_storage[skey] = name
                writer.add(name, t)
            del part, hf_part
        writer.finish()
        cfg_out = dict(hf_config)
        cfg_out["torch_dtype"] = _torch_dtype_name(dtype)
        if "dtype" in cfg_out:
            cfg_out["dtype"] = _torch_dtype_name(dtype)
        cfg_out.pop("_name_or_path", None)
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(cfg_out, f, indent=2)
            f.write("\n")
        if source_dir is not None:
            copy_non_weight_files(Path(source_dir).expanduser(), tmp, skip=("config.json", SOURCE_FILE))
    return out


# ------------------------------------------------------------------------------------------------------ adapters
@dataclass
class _AdapterTarget:
    """One HF module that carries a PEFT LoRA pair.

    ``members`` are all kdtune linear modules stored inside that HF module (one, or several when HF fuses them, like
    GPT-2's ``c_attn`` = q/k/v); ``lora`` are those of them with LoRA, in model order.
    """

    hf: str
    members: list[str]
    lora: list[str]

    @property
    def fused(self) -> bool:
        return len(self.members) > 1


def _adapter_targets(model: nn.Module, family: ModelFamily) -> list[_AdapterTarget]:
    """Group the model's LoRA modules by the HF module they live in."""
    lora_mods = get_lora_modules(model)
    lora_names = set(lora_mods)
    by_hf: dict[str, _AdapterTarget] = {}
    for name in lora_mods:
        try:
            hf = family.module_name_to_hf(name)
        except Exception as e:
            raise CheckpointError(
                f"save_adapter: the {family.name} family has no HF module for LoRA module {name!r} ({e}); "
                "save the merged model with save_hf instead."
            ) from e
        by_hf.setdefault(hf, _AdapterTarget(hf, [], [])).lora.append(name)
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear | LoRALinear) or any(name.startswith(f"{ln}.") for ln in lora_names):
            continue
        try:
            hf = family.module_name_to_hf(name)
        except Exception:
            continue
        if hf in by_hf:
            by_hf[hf].members.append(name)
    return list(by_hf.values())


def _out_features(mod: nn.Module) -> int:
    return mod.out_dim if isinstance(mod, LoRALinear) else mod.out_features


def _stored_transposed(
    family: ModelFamily, hf_config: dict[str, Any], target: _AdapterTarget, mods: dict[str, nn.Module]
) -> bool:
    """Whether HF stores this module's weight as ``[in, out]`` (GPT-2 Conv1D) rather than nn.Linear's ``[out, in]``,
    found by converting a probe ``[out, 1]`` weight per member with the family's own conversion."""
    probe = family.state_dict_to_hf(
        {f"{m}.weight": torch.zeros(_out_features(mods[m]), 1) for m in target.members}, hf_config
    )
    key = f"{target.hf}.weight"
    if key not in probe:
        raise CheckpointError(f"save_adapter: the {family.name} conversion produced no {key!r}; cannot map LoRA.")
    out_total = sum(_out_features(mods[m]) for m in target.members)
    return tuple(probe[key].shape) == (1, out_total) and out_total != 1


def _fused_layout(family: ModelFamily, hf_config: dict[str, Any], target: _AdapterTarget, mods: dict[str, nn.Module]):
    """``(to_hf, from_hf)``: map per-member ``[out_m, R]`` matrices to the fused HF module's ``[sum out_m, R]`` (rows in
    HF order) and back, using the family's own weight conversion (so the fusion order is the family's)."""
    key = f"{target.hf}.weight"
    transposed = _stored_transposed(family, hf_config, target, mods)

    def to_hf(parts: dict[str, torch.Tensor]) -> torch.Tensor:
        fused = family.state_dict_to_hf({f"{m}.weight": t for m, t in parts.items()}, hf_config)[key]
        return fused.t().contiguous() if transposed else fused.contiguous()

    def from_hf(fused: torch.Tensor) -> dict[str, torch.Tensor]:
        stored = fused.t().contiguous() if transposed else fused
        back = family.state_dict_from_hf({key: stored}, hf_config)
        return {m: back[f"{m}.weight"] for m in target.members}

    return to_hf, from_hf


def _target_modules(model: nn.Module, family: ModelFamily, targets: list[_AdapterTarget]) -> list[str]:
    """PEFT ``target_modules``: for each adapted HF module the shortest dotted suffix that matches no linear layer
    without an adapter (so ``q_proj`` for Llama, ``attn.c_proj`` where ``c_proj`` also names an MLP layer)."""
    adapted = {t.hf for t in targets}
    lora_names = set(get_lora_modules(model))
    others: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear | nn.Embedding) or any(name.startswith(f"{ln}.") for ln in lora_names):
            continue
        try:
            hf = family.module_name_to_hf(name)
        except Exception:
            continue
        if hf not in adapted:
            others.add(hf)
    chosen: list[str] = []
    for hf in sorted(adapted):
        parts = hf.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                break
        if suffix not in chosen:
            chosen.append(suffix)
    return sorted(chosen)


def _base_model_name(checkpoint_dir: str | os.PathLike[str] | None, model: nn.Module) -> str | None:
    if checkpoint_dir is not None:
        d = Path(checkpoint_dir).expanduser()
        src = d / SOURCE_FILE
        if src.is_file():
            try:
                info = read_json(src)
            except CheckpointError:
                info = {}
            for key in ("repo_id", "model_id", "source"):
                if isinstance(info.get(key), str) and info[key]:
                    return info[key]
        return str(d.absolute())
    name = (getattr(model, "hf_config", None) or {}).get("_name_or_path")
    return str(name) if name else None


def _most_common(values: list[Any]) -> Any:
    return max(set(values), key=values.count)


def _adapter_tensors(
    model: nn.Module, family: ModelFamily
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """PEFT tensors ``{base_model.model.<hf>.lora_A/B.weight}`` and ``{hf module: (r, alpha)}``.

    Several kdtune LoRA modules inside one fused HF module (GPT-2 ``c_attn`` = q/k/v) are written exactly as one PEFT
    pair: ``lora_A`` stacks their A matrices (rank R = sum of ranks) and ``lora_B`` is block-diagonal in the fused
    output layout, with ``alpha = scale * R`` so PEFT's ``alpha / R`` equals the modules' common scale.
    """
    mods = dict(model.named_modules())
    hf_config = getattr(model, "hf_config", None) or {}
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for target in _adapter_targets(model, family):
        a_key, b_key = f"{_PEFT_PREFIX}{target.hf}.lora_A.weight", f"{_PEFT_PREFIX}{target.hf}.lora_B.weight"
        loras: list[LoRALinear] = [mods[n] for n in target.lora]  # type: ignore[misc]
        if not target.fused:
            m = loras[0]
            tensors[a_key] = m.lora_a.weight.detach().cpu().contiguous()
            tensors[b_key] = m.lora_b.weight.detach().cpu().contiguous()
            ranks[target.hf] = (m.rank, m.alpha)
            continue
        scales = {m.scaling for m in loras}
        if len(scales) > 1:
            raise CheckpointError(
                f"save_adapter: LoRA modules {target.lora} share the HF module {target.hf!r} but have different "
                "alpha/rank scales; use one lora_alpha/lora_rank for them or save the merged model (save_hf)."
            )
        total_r = sum(m.rank for m in loras)
        to_hf, _ = _fused_layout(family, hf_config, target, mods)
        dtype = loras[0].lora_b.weight.dtype
        parts = {n: torch.zeros(_out_features(mods[n]), total_r, dtype=dtype) for n in target.members}
        offset = 0
        for n, m in zip(target.lora, loras):
            parts[n][:, offset : offset + m.rank] = m.lora_b.weight.detach().cpu()
            offset += m.rank
        tensors[a_key] = torch.cat([m.lora_a.weight.detach().cpu() for m in loras], dim=0).contiguous()
        tensors[b_key] = to_hf(parts)
        ranks[target.hf] = (total_r, scales.pop() * total_r)
    return tensors, ranks


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    safe_serialization: bool = True,
) -> Path:
    """Write the LoRA adapter of ``model`` in PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``
    (keys ``base_model.model.<HF module>.lora_A.weight`` / ``lora_B.weight``), so
    ``peft.PeftModel.from_pretrained(hf_base_model, out_dir)`` reproduces the model. Atomic.

    LoRA modules that HF stores fused (GPT-2's q/k/v in ``c_attn``) become one exact PEFT pair (stacked A,
    block-diagonal B); modules whose rank/alpha differ from the most common one go to ``rank_pattern``/``alpha_pattern``.

    Args:
        model: a kdtune model with LoRA modules.
        out_dir: the adapter directory to create or replace.
        base_model_name_or_path: recorded in the config (default: the model's ``_name_or_path`` if any).
        safe_serialization: safetensors (True) or ``adapter_model.bin``.

    Returns:
        The final directory path.
    """
    model = _unwrap(model)
    lora_mods = get_lora_modules(model)
    if not lora_mods:
        raise CheckpointError(
            "save_adapter: the model has no LoRA modules; build it with a lora_* builder, or save it with save_hf."
        )
    family = family_for_model(model)
    tensors, ranks = _adapter_tensors(model, family)
    mods = dict(model.named_modules())
    hf_config = getattr(model, "hf_config", None) or {}
    targets = _adapter_targets(model, family)
    # PEFT's flag for Conv1D-style [in, out] base weights (GPT-2); it only affects how PEFT merges, not A/B layouts
    fan_in_fan_out = all(_stored_transposed(family, hf_config, t, mods) for t in targets)
    r = _most_common([v[0] for v in ranks.values()])
    alpha = _most_common([v[1] for v in ranks.values()])
    rank_pattern = {hf: rv for hf, (rv, _) in ranks.items() if rv != r}
    alpha_pattern = {hf: av for hf, (_, av) in ranks.items() if av != alpha}
    dropout = _most_common([m.dropout_p for m in lora_mods.values()])
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if getattr(model, "is_encoder_decoder", False) else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or _base_model_name(None, model),
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, family, targets),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }
    with atomic_directory(out_dir) as tmp:
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        else:
            torch.save(tensors, str(tmp / ADAPTER_WEIGHTS_BIN))
        with open(tmp / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    return Path(out_dir).expanduser().absolute()


def _pattern_value(pattern: dict[str, Any], hf_module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module whose path ends with it (as a regex)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf_module):
            return value
    return default


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], Path, dict[str, torch.Tensor]]:
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        what = "does not exist" if not adapter_dir.exists() else f"has no {ADAPTER_CONFIG}"
        raise CheckpointError(
            f"adapter dir {str(adapter_dir)!r} {what}; point it at a directory written by save_adapter / PEFT."
        )
    cfg = read_json(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters load."
        )
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise CheckpointError(f"{cfg_path}: {flag}=true is not supported by kdtune's LoRALinear; use plain LoRA.")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_path}: bias={cfg.get('bias')!r} is not supported; only bias='none' adapters load.")
    wpath = adapter_dir / ADAPTER_WEIGHTS
    if not wpath.is_file():
        wpath = adapter_dir / ADAPTER_WEIGHTS_BIN
    if not wpath.is_file():
        raise CheckpointError(
            f"adapter dir {str(adapter_dir)!r} has no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}; files there: "
            f"{sorted(p.name for p in adapter_dir.iterdir())}."
        )
    return cfg, wpath, read_weight_file(wpath)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike[str]) -> list[str]:
    """Load a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``) into the LoRA
    modules of ``model`` (built with the same LoRA settings), e.g. to resume or evaluate. Returns the loaded module
    names.

    Raises:
        CheckpointError: files missing, not a LoRA adapter, rank/alpha different from the model's, adapter weights for
            modules without LoRA in the model (or the reverse), or a fused-module adapter (PEFT LoRA on GPT-2's
            ``c_attn``) that is not block-diagonal, i.e. cannot be split into kdtune's separate q/k/v adapters.
    """
    model = _unwrap(model)
    d = Path(adapter_dir).expanduser()
    cfg, wpath, tensors = _read_adapter(d)
    lora_mods = get_lora_modules(model)
    if not lora_mods:
        raise CheckpointError(
            "load_adapter: the model has no LoRA modules; build it with the adapter's LoRA settings (a lora_* builder)."
        )
    family = family_for_model(model)
    targets = {t.hf: t for t in _adapter_targets(model, family)}
    mods = dict(model.named_modules())
    hf_config = getattr(model, "hf_config", None) or {}
    r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    found: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        check_weight_tensor(wpath, key, t)
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key)
        if not m or m.group(1) not in targets:
            unknown.append(key)
            continue
        found.setdefault(m.group(1), {})[m.group(2)] = t
    if unknown:
        raise CheckpointError(
            f"{wpath.name}: {len(unknown)} tensor(s) match no LoRA module of the model: {_few(unknown, 3)}; build the "
            "model with the adapter's lora_attn_modules / apply_lora_to_mlp / apply_lora_to_output."
        )
    absent = [n for hf, t in targets.items() if hf not in found or len(found[hf]) != 2 for n in t.lora]
    if absent:
        raise CheckpointError(
            f"{wpath.name}: no adapter weights for LoRA module(s) {_few(absent, 3)}; the model adapts more modules "
            "than the adapter — build it with the adapter's LoRA settings."
        )
    new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # kdtune module -> (A [r, in], B [out, r])
    for hf, target in targets.items():
        a, b = found[hf]["lora_A"], found[hf]["lora_B"]
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, hf, r_default))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, hf, alpha_default))
        loras: list[LoRALinear] = [mods[n] for n in target.lora]  # type: ignore[misc]
        want_r = sum(m.rank for m in loras)
        scale = loras[0].scaling
        if r != want_r or a.shape[0] != want_r or b.shape[1] != want_r:
            raise CheckpointError(
                f"{wpath.name}: module {hf!r} has rank {r} (lora_A {list(a.shape)}, lora_B {list(b.shape)}) but the "
                f"model's LoRA rank there is {want_r}; build the model with lora_rank={r // len(loras) or r}."
            )
        if abs(alpha / r - scale) > 1e-9 * max(1.0, scale):
            want_alpha = scale * loras[0].rank
            raise CheckpointError(
                f"{ADAPTER_CONFIG}: lora_alpha for {hf!r} is {alpha * loras[0].rank / r:g} but the model's is "
                f"{want_alpha:g}; build the model with lora_alpha={alpha * loras[0].rank / r:g}."
            )
        if not target.fused:
            new[target.lora[0]] = (a, b)
            continue
        _, from_hf = _fused_layout(family, hf_config, target, mods)
        parts = from_hf(b)
        offset = 0
        for n, m in zip(target.lora, loras):
            block = parts[n][:, offset : offset + m.rank]
            rest = torch.cat([parts[n][:, :offset], parts[n][:, offset + m.rank :]], dim=1)
            if rest.numel() and rest.abs().max() > 0:
                raise CheckpointError(
                    f"{wpath.name}: the LoRA on fused module {hf!r} mixes the outputs of {target.members}; kdtune "
                    "keeps separate adapters per projection and cannot load it — merge it into the base model instead."
                )
            new[n] = (a[offset : offset + m.rank], block)
            offset += m.rank
        for n in target.members:
            if n not in target.lora and parts[n].abs().max() > 0:
                raise CheckpointError(
                    f"{wpath.name}: the LoRA on fused module {hf!r} also changes {n!r}, which has no LoRA in the model; "
                    "build the model with that projection in lora_attn_modules."
                )
    with torch.no_grad():
        for name, (a, b) in new.items():
            mod = lora_mods[name]
            if tuple(a.shape) != (mod.rank, mod.in_dim) or tuple(b.shape) != (mod.out_dim, mod.rank):
                raise CheckpointError(
                    f"{wpath.name}: LoRA for {name!r} has shapes A {list(a.shape)}, B {list(b.shape)}; the model expects "
                    f"A {[mod.rank, mod.in_dim]}, B {[mod.out_dim, mod.rank]} (wrong base model or lora_rank?)."
                )
            for lin, t in ((mod.lora_a, a), (mod.lora_b, b)):
                if lin.weight.is_meta:
                    lin.weight = nn.Parameter(t.to(dtype=lin.weight.dtype).contiguous(), requires_grad=True)
                else:
                    lin.weight.copy_(t.to(device=lin.weight.device, dtype=lin.weight.dtype))
    return list(new)


# ------------------------------------------------------------------------------------------------------ class API
class HFCheckpointer:
    """Load an HF checkpoint directory into kdtune models and save them back (HF format, PEFT adapters).

    Args:
        checkpoint_dir: the HF model directory to read (``config.json`` + weights), or None (nothing to load, e.g. a
            model trained from scratch; ``save_hf`` then writes only what the model carries).
        output_dir: where relative ``out_dir`` arguments of ``save_hf``/``save_adapter`` go.
        checkpoint_files: weight files to read (default: auto-detected from the index / file names). torchtune's
            ``{filename_format, max_filename}`` mapping is accepted.
        max_shard_size: shard size for ``save_hf`` (``"5GB"``, ``"200MB"``, bytes).
        safe_serialization: save safetensors (True) or ``.bin`` (False).
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] | None,
        output_dir: str | os.PathLike[str],
        checkpoint_files: list[str] | dict[str, Any] | None = None,
        max_shard_size: str | int = "5GB",
        safe_serialization: bool = True,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir).expanduser() if checkpoint_dir else None
        self.output_dir = Path(output_dir).expanduser()
        self.checkpoint_files = checkpoint_files
        self.max_shard_size = max_shard_size
        parse_size(max_shard_size)  # fail early on a bad size
        self.safe_serialization = safe_serialization
        if self.checkpoint_dir is not None:
            read_hf_config(self.checkpoint_dir)  # directory and config.json exist
            resolve_weight_files(self.checkpoint_dir, checkpoint_files)  # listed files exist

    @property
    def hf_config(self) -> dict[str, Any]:
        """The ``config.json`` of ``checkpoint_dir`` (empty dict if there is none)."""
        return read_hf_config(self.checkpoint_dir) if self.checkpoint_dir is not None else {}

    def _out(self, out_dir: str | os.PathLike[str] | None) -> Path:
        if out_dir is None:
            return self.output_dir
        p = Path(out_dir).expanduser()
        return p if p.is_absolute() else self.output_dir / p

    def load_into(
        self, model: nn.Module, strict: bool = True, *, assign: bool = False, device: torch.device | str | None = None
    ) -> LoadResult | None:
        """Load ``checkpoint_dir`` into ``model`` shard by shard (see ``load_state_dict_shardwise``); no-op without a
        checkpoint_dir."""
        if self.checkpoint_dir is None:
            return None
        return load_state_dict_shardwise(
            model, self.checkpoint_dir, self.checkpoint_files, strict=strict, assign=assign, device=device
        )

    def save_hf(
        self,
        model: nn.Module,
        out_dir: str | os.PathLike[str] | None = None,
        *,
        merged_lora: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Path:
        """Save ``model`` as an HF directory at ``out_dir`` (relative to ``output_dir``; default ``output_dir``),
        copying tokenizer and other non-weight files from ``checkpoint_dir``. See ``kdtune.models.checkpointer.save_hf``."""
        return save_hf(
            model,
            self._out(out_dir),
            source_dir=self.checkpoint_dir,
            max_shard_size=self.max_shard_size,
            safe_serialization=self.safe_serialization,
            merged_lora=merged_lora,
            dtype=dtype,
        )

    def save_adapter(self, model: nn.Module, out_dir: str | os.PathLike[str] | None = None) -> Path:
        """Save the LoRA adapter of ``model`` in PEFT format at ``out_dir`` (relative to ``output_dir``); the base model
        is named from ``kdtune_source.json`` in ``checkpoint_dir`` if present, else the directory path."""
        return save_adapter(
            model,
            self._out(out_dir),
            base_model_name_or_path=_base_model_name(self.checkpoint_dir, model),
            safe_serialization=self.safe_serialization,
        )

    def load_adapter(self, model: nn.Module, adapter_dir: str | os.PathLike[str]) -> list[str]:
        """Load a PEFT adapter into ``model``'s LoRA modules (relative paths are under ``output_dir``)."""
        return load_adapter(model, self._out(adapter_dir))
