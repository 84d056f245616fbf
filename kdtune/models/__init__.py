"""Models: shared modules, one package per family, and HF checkpoint loading.

Importing this package registers every family (llama, qwen2, qwen3, gpt2, phi3, gemma).
"""

from kdtune.models import gemma, gpt2, llama, phi3, qwen2, qwen3  # noqa: F401  (each registers its family)
from kdtune.models.checkpointer import HFCheckpointer, load_state_dict_shardwise
from kdtune.models.hf import hf_model, load_hf_model, read_hf_config
from kdtune.models.modules import TransformerDecoder, enable_activation_checkpointing
from kdtune.models.modules.lora import LoRALinear, apply_lora

__all__ = [
    "HFCheckpointer",
    "LoRALinear",
    "TransformerDecoder",
    "apply_lora",
    "enable_activation_checkpointing",
    "hf_model",
    "load_hf_model",
    "load_state_dict_shardwise",
    "read_hf_config",
]
