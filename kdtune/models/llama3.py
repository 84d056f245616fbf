"""Llama 3 builders (re-exported from ``kdtune.models.llama``), e.g. ``kdtune.models.llama3.llama3_8b`` and
``kdtune.models.llama3.lora_llama3_8b``."""

from kdtune.models._builders import export_builders
from kdtune.models.llama import BUILDERS

export_builders(globals(), BUILDERS, ["llama3_8b", "llama3_70b"])
