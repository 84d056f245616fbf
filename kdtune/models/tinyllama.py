"""TinyLlama builders (re-exported from ``kdtune.models.llama``), e.g. ``kdtune.models.tinyllama.tinyllama_1_1b`` and
``kdtune.models.tinyllama.lora_tinyllama_1_1b``."""

from kdtune.models._builders import export_builders
from kdtune.models.llama import BUILDERS

export_builders(globals(), BUILDERS, ["tinyllama_1_1b"])
