"""Llama 2 (and TinyLlama, same architecture) builders (re-exported from ``kdtune.models.llama``), e.g. ``kdtune.models.llama2.llama2_7b`` and
``kdtune.models.llama2.lora_llama2_7b``."""

from kdtune.models._builders import export_builders
from kdtune.models.llama import BUILDERS

export_builders(globals(), BUILDERS, ["llama2_7b", "llama2_13b", "llama2_70b", "tinyllama_1_1b"])
