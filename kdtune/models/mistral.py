"""Mistral builders (re-exported from ``kdtune.models.llama``), e.g. ``kdtune.models.mistral.mistral_7b`` and
``kdtune.models.mistral.lora_mistral_7b``."""

from kdtune.models._builders import export_builders
from kdtune.models.llama import BUILDERS

export_builders(globals(), BUILDERS, ["mistral_7b"])
