"""LoRA and QLoRA linear layers, and the helpers that put them into a decoder.

``LoRALinear`` keeps the base projection frozen (``weight`` and optional ``bias``, with the same state-dict keys as the
``nn.Linear`` it replaces, so HF conversion is unchanged) and adds a trainable low-rank update:

    y = x @ W^T + b + scale * lora_b(lora_a(dropout(x))),   scale = alpha / rank

With ``quantize_base=True`` (QLoRA) the frozen ``weight`` is stored as a torchao NF4 tensor and the base product runs
through ``linear_nf4``; a plain floating-point tensor loaded into it (``load_state_dict``, with or without
``assign=True``) is quantised on the way in, so a model built on the meta device can be loaded shard by shard.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.errors import ConfigError

__all__ = [
    "LORA_ATTN_MODULES",
    "LoRALinear",
    "apply_lora",
    "disable_adapters",
    "get_adapter_params",
    "get_lora_modules",
    "get_merged_lora_state_dict",
    "initialize_lora_params",
    "is_nf4",
    "lora_trainable_state_dict",
    "merge_lora_weights",
    "set_trainable_params",
]

LORA_ATTN_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "output_proj")
_MLP_MODULES: tuple[str, ...] = ("w1", "w2", "w3")

_NF4_BLOCK_SIZE = 64
_NF4_SCALER_BLOCK_SIZE = 256


def _nf4_api() -> tuple[Any, Any, Any]:
    """Return torchao's ``(NF4Tensor, to_nf4, linear_nf4)`` wherever this torchao version keeps them."""
    try:  # torchao <= 0.12
        from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4  # type: ignore[import-not-found]
    except ImportError:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, linear_nf4, to_nf4
        except ImportError as e:  # pragma: no cover - depends on the installed torchao
            raise ConfigError(
                "quantize_base=True (QLoRA) needs torchao's NF4 tensor, which this torchao install does not provide; "
                "`pip install -U torchao` or set quantize_base=False."
            ) from e
    return NF4Tensor, to_nf4, linear_nf4


def is_nf4(t: Any) -> bool:
    """True if ``t`` is a torchao NF4 tensor (a QLoRA base weight)."""
    if t is None or not isinstance(t, torch.Tensor) or type(t) in (torch.Tensor, nn.Parameter):
        return False
    if "torchao" not in sys.modules:
        # no NF4 tensor can exist before torchao is imported; other subclasses (fake tensors of `kdtune estimate`,
        # FSDP's DTensors) must not pay torchao's import (~2 s, and its warnings where its kernels do not load)
        return False
    NF4Tensor, _, _ = _nf4_api()
    return isinstance(t, NF4Tensor)


def _to_nf4(w: torch.Tensor) -> torch.Tensor:
    """Quantise a 2-D float tensor to NF4 (blocks of 64 values; the block scales are double-quantised in groups of
    up to 256, fewer when the matrix is small, so tiny test models quantise too)."""
    _, to_nf4, _ = _nf4_api()
    numel = w.numel()
    if numel % _NF4_BLOCK_SIZE != 0:
        raise ConfigError(
            f"quantize_base=True: a weight of shape {list(w.shape)} has {numel} values, not a multiple of the NF4 block "
            f"size {_NF4_BLOCK_SIZE}; QLoRA needs layer dimensions divisible by 64, or set quantize_base=False."
        )
    n_blocks = numel // _NF4_BLOCK_SIZE
    scaler_block = math.gcd(n_blocks, _NF4_SCALER_BLOCK_SIZE)
    return to_nf4(w.detach().contiguous(), _NF4_BLOCK_SIZE, scaler_block)


def _dequantize(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A plain tensor holding ``w``'s values (NF4 is dequantised), optionally cast to ``dtype``."""
    if is_nf4(w):
        out = w.get_original_weight()
        return out if dtype is None else out.to(dtype)
    out = w.detach()
    return out if dtype is None else out.to(dtype)


class LoRALinear(nn.Module):
    """A frozen linear projection plus a trainable low-rank update (LoRA), optionally with an NF4 base (QLoRA).

    Args:
        in_dim: input features.
        out_dim: output features.
        rank: LoRA rank ``r``.
        alpha: LoRA ``alpha``; the update is scaled by ``alpha / rank``.
        dropout: dropout on the input of the LoRA branch (training mode only).
        use_bias: whether the frozen base projection has a bias.
        quantize_base: store the frozen base weight in NF4 (torchao) and compute with ``linear_nf4``.
        device: where to create the parameters (``"meta"`` is fine: load with ``assign=True`` later).
        dtype: parameter dtype.

    Shapes: ``weight [out_dim, in_dim]``, ``lora_a.weight [rank, in_dim]``, ``lora_b.weight [out_dim, rank]``;
    ``forward(x [..., in_dim]) -> [..., out_dim]``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_bias: bool = False,
        quantize_base: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ConfigError(
                f"lora_rank must be a positive integer, got {rank}; set e.g. model.lora_rank=8 (the model "
                "component's argument in a recipe config)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(
                f"lora_dropout must be in [0, 1), got {dropout}; set e.g. model.lora_dropout=0.05 (the model "
                "component's argument in a recipe config)"
            )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout_p = float(dropout)
        self.use_bias = use_bias
        self._quantize_base = quantize_base
        self.disabled = False  # True: behave as the base projection only (see `disable_adapters`)
        factory = {"device": device, "dtype": dtype}
        weight = torch.empty(out_dim, in_dim, **factory)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's init (overwritten when weights are loaded)
        if quantize_base and weight.device.type != "meta":
            weight = _to_nf4(weight)
        self.weight = nn.Parameter(weight, requires_grad=False)
        if use_bias:
            bias = torch.empty(out_dim, **factory)
            bound = 1.0 / math.sqrt(in_dim) if in_dim > 0 else 0.0
            nn.init.uniform_(bias, -bound, bound)
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, self.rank, bias=False, **factory)
        self.lora_b = nn.Linear(self.rank, out_dim, bias=False, **factory)
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied to the LoRA branch."""
        return self.alpha / self.rank

    @property
    def quantize_base(self) -> bool:
        """Whether the frozen base weight is (or will be, once loaded) stored in NF4."""
        return self._quantize_base

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: ``lora_a`` Kaiming-uniform (a=sqrt(5)), ``lora_b`` zeros, so the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def extra_repr(self) -> str:
        q = ", quantize_base=True" if self._quantize_base else ""
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, alpha={self.alpha}, "
            f"dropout={self.dropout_p}, use_bias={self.use_bias}{q}"
        )

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if is_nf4(self.weight):
            _, _, linear_nf4 = _nf4_api()
            out = linear_nf4(x, self.weight)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_dim] -> [..., out_dim]``: base projection plus the scaled LoRA update."""
        out = self._base(x)
        if self.disabled:
            return out
        lora = self.lora_b(self.lora_a(self.dropout(x)))
        return out + lora * self.scaling

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W + scale * B @ A`` as a new plain tensor ``[out_dim, in_dim]`` (NF4 dequantised; computed in fp32 and cast
        to ``dtype``, default the LoRA parameters' dtype). The module is not modified."""
        out_dtype = dtype or self.lora_a.weight.dtype
        with torch.no_grad():
            w = _dequantize(self.weight, torch.float32)
            a = self.lora_a.weight.detach().to(torch.float32)  # [r, in]
            b = self.lora_b.weight.detach().to(torch.float32)  # [out, r]
            return (w + self.scaling * (b @ a)).to(out_dtype)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if not self._quantize_base or key not in state_dict:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        # QLoRA: quantise the incoming full-precision weight ourselves, then let nn.Module load the rest.
        incoming = state_dict[key]
        if tuple(incoming.shape) != (self.out_dim, self.in_dim):
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {incoming.shape} from checkpoint, "
                f"the shape in current model is {torch.Size((self.out_dim, self.in_dim))}."
            )
        else:
            current = self.weight
            device = incoming.device if current.device.type == "meta" else current.device
            target_dtype = current.dtype
            with torch.no_grad():
                plain = _dequantize(incoming) if is_nf4(incoming) else incoming
                nf4 = _to_nf4(plain.to(device=device, dtype=target_dtype))
            self.weight = nn.Parameter(nf4, requires_grad=False)
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key in missing_keys:
            missing_keys.remove(key)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _lora_targets(
    model: nn.Module, lora_attn_modules: list[str], apply_lora_to_mlp: bool, apply_lora_to_output: bool
) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that get LoRA."""
    targets: list[str] = []
    attn = set(lora_attn_modules)
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, LoRALinear):
            continue
        parts = name.split(".")
        leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
        if parent in ("attn", "cross_attn") and leaf in attn:  # cross_attn: encoder-decoder models
            targets.append(name)
        elif apply_lora_to_mlp and parent == "mlp" and leaf in _MLP_MODULES:
            targets.append(name)
        elif apply_lora_to_output and name == "output":
            targets.append(name)
    return targets


def apply_lora(
    model: nn.Module,
    lora_attn_modules: list[str] | tuple[str, ...] | None,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
) -> nn.Module:
    """Replace the chosen ``nn.Linear`` projections of a decoder by ``LoRALinear`` in place and freeze everything else.

    The existing base tensors are reused (no copy; on the meta device they stay meta). With ``quantize_base`` the
    replaced weights are converted to NF4 (QLoRA); projections that do not get LoRA stay in full precision.

    Args:
        model: a kdtune decoder (module names as in docs/design.md).
        lora_attn_modules: any of ``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``.
        apply_lora_to_mlp: also adapt ``mlp.w1``/``w2``/``w3`` (GPT-2: ``w1``/``w2``).
        apply_lora_to_output: also adapt the output projection (not possible with tied embeddings).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha (scale = alpha / rank).
        lora_dropout: dropout on the LoRA branch input.
        quantize_base: store the adapted base weights in NF4.

    Returns:
        ``model`` itself, with only the LoRA parameters trainable.
    """
    attn_modules = list(lora_attn_modules or [])
    bad = [m for m in attn_modules if m not in LORA_ATTN_MODULES]
    if bad:
        raise ConfigError(
            f"lora_attn_modules: unknown module name(s) {bad}; choose from {list(LORA_ATTN_MODULES)} "
            f"(kdtune uses torchtune names, e.g. output_proj rather than o_proj)."
        )
    if apply_lora_to_output and not isinstance(getattr(model, "output", None), nn.Linear):
        tied = bool(getattr(model, "hf_config", {}).get("tie_word_embeddings", False)) or not hasattr(model, "output")
        why = "ties its output projection to tok_embeddings" if tied else "has no nn.Linear `output` projection"
        raise ConfigError(f"apply_lora_to_output=True, but this model {why}; set apply_lora_to_output=False.")
    if not attn_modules and not apply_lora_to_mlp and not apply_lora_to_output:
        raise ConfigError(
            "LoRA selects no module: lora_attn_modules is empty and apply_lora_to_mlp/apply_lora_to_output are False; "
            "set e.g. lora_attn_modules=[q_proj, v_proj]."
        )
    if get_lora_modules(model):
        raise ConfigError(
            f"{type(model).__name__} already has LoRA modules; apply_lora once (a lora_* builder already applies it)."
        )
    targets = _lora_targets(model, attn_modules, apply_lora_to_mlp, apply_lora_to_output)
    if not targets:
        raise ConfigError(
            f"LoRA found no matching nn.Linear in {type(model).__name__} for lora_attn_modules={attn_modules}, "
            f"apply_lora_to_mlp={apply_lora_to_mlp}; is this a kdtune decoder?"
        )
    for name in targets:
        old: nn.Linear = model.get_submodule(name)  # type: ignore[assignment]
        w = old.weight
        new = LoRALinear(
            old.in_features,
            old.out_features,
            rank=lora_rank,
            alpha=lora_alpha,
            dropout=lora_dropout,
            use_bias=old.bias is not None,
            quantize_base=False,
            device="meta",
            dtype=w.dtype,
        )
        # Reuse the base tensors; create the LoRA matrices where the base lives.
        new.weight = nn.Parameter(w.detach(), requires_grad=False)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
        new.lora_a = nn.Linear(old.in_features, lora_rank, bias=False, device=w.device, dtype=w.dtype)
        new.lora_b = nn.Linear(lora_rank, old.out_features, bias=False, device=w.device, dtype=w.dtype)
        new.reset_lora_parameters()
        if quantize_base:
            new._quantize_base = True
            if w.device.type != "meta":
                new.weight = nn.Parameter(_to_nf4(w.detach()), requires_grad=False)
        _replace(model, name, new)
    set_trainable_params(model, get_adapter_params(model))
    model.lora_config = {  # type: ignore[assignment]
        "lora_attn_modules": attn_modules,
        "apply_lora_to_mlp": apply_lora_to_mlp,
        "apply_lora_to_output": apply_lora_to_output,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "quantize_base": quantize_base,
    }
    return model


def get_lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """All ``LoRALinear`` modules of ``model`` by their module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters (``<module>.lora_a.weight``, ``<module>.lora_b.weight``) by their state-dict key."""
    params: dict[str, nn.Parameter] = {}
    for name, mod in get_lora_modules(model).items():
        prefix = f"{name}." if name else ""
        params[f"{prefix}lora_a.weight"] = mod.lora_a.weight
        params[f"{prefix}lora_b.weight"] = mod.lora_b.weight
    return params


def set_trainable_params(model: nn.Module, adapter_params: dict[str, nn.Parameter] | None = None) -> None:
    """Make exactly ``adapter_params`` (default: the model's LoRA parameters) trainable; freeze all others."""
    params = get_adapter_params(model) if adapter_params is None else adapter_params
    keep = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def lora_trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (detached), keyed like ``model.state_dict()``; what a LoRA run needs to save."""
    return {k: p.detach() for k, p in get_adapter_params(model).items()}


def get_merged_lora_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the equivalent plain model: each ``LoRALinear`` contributes ``weight = W + scale * B @ A``
    (NF4 dequantised) and its bias; no ``lora_*`` keys. ``model`` is not modified.

    Args:
        model: a model with (or without) LoRA modules.
        dtype: cast every floating tensor to this dtype (default: keep each tensor's dtype; NF4 → its original dtype).
    """
    lora_mods = get_lora_modules(model)
    skip = set(get_adapter_params(model))
    merged_keys = {(f"{n}.weight" if n else "weight"): m for n, m in lora_mods.items()}
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        if key in merged_keys:
            out[key] = merged_keys[key].merged_weight(dtype)
            continue
        t = _dequantize(t)
        out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def merge_lora_weights(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight **in place**: each ``LoRALinear`` becomes a plain ``nn.Linear`` with
    ``W + scale * B @ A`` (NF4 dequantised). Use ``get_merged_lora_state_dict`` to merge without touching the model."""
    for name, mod in list(get_lora_modules(model).items()):
        merged = mod.merged_weight()
        lin = nn.Linear(mod.in_dim, mod.out_dim, bias=mod.bias is not None, device="meta", dtype=merged.dtype)
        lin.weight = nn.Parameter(merged, requires_grad=False)
        if mod.bias is not None:
            lin.bias = nn.Parameter(mod.bias.detach().to(merged.dtype), requires_grad=False)
        if name:
            _replace(model, name, lin)
        else:  # pragma: no cover - a bare LoRALinear cannot replace itself
            raise ConfigError("merge_lora_weights needs a model containing LoRALinear modules, not a LoRALinear.")
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def initialize_lora_params(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Materialise LoRA matrices still on the meta device (after building on meta and loading only the base weights
    with ``assign=True``) on ``device`` (default: the device of the module's base weight), with PEFT's init."""
    for mod in get_lora_modules(model).values():
        if mod.lora_a.weight.is_meta or mod.lora_b.weight.is_meta:
            dev = device if device is not None else mod.weight.device
            if torch.device(dev).type == "meta":
                continue
            mod.lora_a.to_empty(device=dev)
            mod.lora_b.to_empty(device=dev)
            mod.reset_lora_parameters()
            mod.lora_a.weight.requires_grad_(True)
            mod.lora_b.weight.requires_grad_(True)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: run ``model`` as its base model (LoRA branches skipped), e.g. for a reference forward pass."""
    mods = list(get_lora_modules(model).values())
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b
