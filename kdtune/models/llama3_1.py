"""Llama 3.1 builders (re-exported from ``kdtune.models.llama``), e.g. ``kdtune.models.llama3_1.llama3_1_8b`` and
``kdtune.models.llama3_1.lora_llama3_1_8b``."""

from kdtune.models._builders import export_builders
from kdtune.models.llama import BUILDERS

export_builders(globals(), BUILDERS, ["llama3_1_8b", "llama3_1_70b"])
