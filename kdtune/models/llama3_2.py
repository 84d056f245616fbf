"""Llama 3.2 builders (re-exported from ``kdtune.models.llama``), e.g. ``kdtune.models.llama3_2.llama3_2_1b`` and
``kdtune.models.llama3_2.lora_llama3_2_1b``."""

from kdtune.models._builders import export_builders
from kdtune.models.llama import BUILDERS

export_builders(globals(), BUILDERS, ["llama3_2_1b", "llama3_2_3b"])
