"""Models: shared modules, one package per family, and HF checkpoint loading.

Importing this package registers every family (llama, qwen2, qwen3, gpt2).
"""

from kdtune.models import llama  # noqa: F401  (registers the family)
from kdtune.models.hf import hf_model, load_hf_model, read_hf_config
from kdtune.models.modules import TransformerDecoder, enable_activation_checkpointing

__all__ = ["TransformerDecoder", "enable_activation_checkpointing", "hf_model", "load_hf_model", "read_hf_config"]
