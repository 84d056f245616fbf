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
    ckpt.save_hf(model, "epoch_0")          # merged LoRA, loads in transformers
    ckpt.save_adapter(model, "epoch_0/adapter")   # PEFT adapter (LoRA models)
"""

from __future__ import annotations

import importlib
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
    copy_non_weight_files,
    list_weight_files,
    parse_size,
    read_json,
    read_weight_file,
    resolve_weight_files,
)
from kdtune.models.modules.lora import (
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
def _ensure_families_registered() -> None:
    """Import ``kdtune.models`` (which imports every family package) so the registry is filled."""
    importlib.import_module("kdtune.models")


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
    _ensure_families_registered()
    name = getattr(model, "hf_family", "") or ""
    families = registered_families()
    if name in families:
        return families[name]
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
    _ensure_families_registered()
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
            parts.append(f"missing {len(missing)} tensor(s) the model needs: {_few(missing)}")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected tensor(s): {_few(result.unexpected_keys)}")
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
def _lora_hf_names(model: nn.Module, family: ModelFamily) -> dict[str, str]:
    """kdtune LoRA module path → HF module path; errors when two kdtune modules map to one HF module (e.g. GPT-2's
    fused ``c_attn``), which PEFT cannot represent as separate adapters."""
    names: dict[str, str] = {}
    for name in get_lora_modules(model):
        try:
            names[name] = family.module_name_to_hf(name)
        except Exception as e:
            raise CheckpointError(
                f"save_adapter: the {family.name} family has no HF module for LoRA module {name!r} ({e}); "
                "save the merged model with save_hf instead."
            ) from e
    inverse: dict[str, list[str]] = {}
    for k, v in names.items():
        inverse.setdefault(v, []).append(k)
    clashes = {v: ks for v, ks in inverse.items() if len(ks) > 1}
    if clashes:
        hf, ks = next(iter(clashes.items()))
        raise CheckpointError(
            f"save_adapter: LoRA modules {ks} all live in the single HF module {hf!r}, which a PEFT adapter cannot "
            "express; save the merged model (save_hf) or adapt fewer modules (e.g. only output_proj / the MLP)."
        )
    return names


def _target_modules(model: nn.Module, family: ModelFamily, targets: list[str]) -> list[str]:
    """PEFT ``target_modules``: for each adapted HF module the shortest dotted suffix that matches no linear layer
    without an adapter (so ``q_proj`` for Llama, ``attn.c_proj`` where ``c_proj`` also names an MLP layer)."""
    others: list[str] = []
    lora_names = set(get_lora_modules(model))
    for name, mod in model.named_modules():
        if name in lora_names or not isinstance(mod, nn.Linear | nn.Embedding):
            continue
        if any(name.startswith(f"{ln}.") for ln in lora_names):
            continue
        try:
            others.append(family.module_name_to_hf(name))
        except Exception:
            continue
    chosen: list[str] = []
    for hf in targets:
        parts = hf.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                break
        if suffix not in chosen:
            chosen.append(suffix)
    # a shorter suffix chosen for one target must not hide an un-adapted module; checked above per target
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
    hf_names = _lora_hf_names(model, family)
    ranks = [m.rank for m in lora_mods.values()]
    alphas = [m.alpha for m in lora_mods.values()]
    r, alpha = _most_common(ranks), _most_common(alphas)
    rank_pattern = {hf_names[n]: m.rank for n, m in lora_mods.items() if m.rank != r}
    alpha_pattern = {hf_names[n]: m.alpha for n, m in lora_mods.items() if m.alpha != alpha}
    dropout = _most_common([m.dropout_p for m in lora_mods.values()])
    alpha_out: float | int = int(alpha) if float(alpha).is_integer() else alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or _base_model_name(None, model),
        "r": r,
        "lora_alpha": alpha_out,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, family, list(hf_names.values())),
        "bias": "none",
        "fan_in_fan_out": False,
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
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in lora_mods.items():
        hf = hf_names[name]
        tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = mod.lora_a.weight.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = mod.lora_b.weight.detach().cpu().contiguous()
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


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike[str]) -> list[str]:
    """Load a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``) into the LoRA
    modules of ``model`` (built with the same LoRA settings), e.g. to resume or evaluate. Returns the loaded module
    names.

    Raises:
        CheckpointError: files missing, not a LoRA adapter, rank/alpha different from the model's, or adapter weights
            for modules without LoRA in the model (or the reverse).
    """
    model = _unwrap(model)
    d = Path(adapter_dir).expanduser()
    cfg_path = d / ADAPTER_CONFIG
    if not cfg_path.is_file():
        what = "does not exist" if not d.exists() else f"has no {ADAPTER_CONFIG}"
        raise CheckpointError(f"adapter dir {str(d)!r} {what}; point it at a directory written by save_adapter / PEFT.")
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
    wpath = d / ADAPTER_WEIGHTS
    if not wpath.is_file():
        wpath = d / ADAPTER_WEIGHTS_BIN
    if not wpath.is_file():
        raise CheckpointError(
            f"adapter dir {str(d)!r} has no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}; files there: "
            f"{sorted(p.name for p in d.iterdir())}."
        )
    tensors = read_weight_file(wpath)
    lora_mods = get_lora_modules(model)
    if not lora_mods:
        raise CheckpointError(
            "load_adapter: the model has no LoRA modules; build it with the adapter's LoRA settings (a lora_* builder)."
        )
    family = family_for_model(model)
    hf_names = _lora_hf_names(model, family)
    by_hf = {v: k for k, v in hf_names.items()}
    r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    found: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key)
        if not m or m.group(1) not in by_hf:
            unknown.append(key)
            continue
        found.setdefault(by_hf[m.group(1)], {})[m.group(2)] = t
    if unknown:
        raise CheckpointError(
            f"{wpath.name}: {len(unknown)} tensor(s) match no LoRA module of the model: {_few(unknown, 3)}; build the "
            "model with the adapter's lora_attn_modules / apply_lora_to_mlp / apply_lora_to_output."
        )
    absent = [n for n in lora_mods if n not in found or len(found[n]) != 2]
    if absent:
        raise CheckpointError(
            f"{wpath.name}: no adapter weights for LoRA module(s) {_few(absent, 3)}; the model adapts more modules "
            "than the adapter — build it with the adapter's LoRA settings."
        )
    with torch.no_grad():
        for name, mod in lora_mods.items():
            hf = hf_names[name]
            r = int(_pattern_value(cfg.get("rank_pattern") or {}, hf, r_default))
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, hf, alpha_default))
            a, b = found[name]["lora_A"], found[name]["lora_B"]
            if r != mod.rank or tuple(a.shape) != (mod.rank, mod.in_dim) or tuple(b.shape) != (mod.out_dim, mod.rank):
                raise CheckpointError(
                    f"{wpath.name}: module {hf!r} has rank {r} (lora_A {list(a.shape)}, lora_B {list(b.shape)}) but the "
                    f"model's LoRA rank is {mod.rank}; build the model with lora_rank={r}."
                )
            if abs(alpha - mod.alpha) > 1e-9:
                raise CheckpointError(
                    f"{cfg_path.name}: lora_alpha for {hf!r} is {alpha:g} but the model's is {mod.alpha:g}; build the "
                    f"model with lora_alpha={alpha:g}."
                )
            for lin, t in ((mod.lora_a, a), (mod.lora_b, b)):
                if lin.weight.is_meta:
                    lin.weight = nn.Parameter(t.to(dtype=lin.weight.dtype), requires_grad=True)
                else:
                    lin.weight.copy_(t.to(device=lin.weight.device, dtype=lin.weight.dtype))
    return list(lora_mods)


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
