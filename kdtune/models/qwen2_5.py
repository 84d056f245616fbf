"""Qwen2.5 builders (re-exported from ``kdtune.models.qwen2``), e.g. ``kdtune.models.qwen2_5.qwen2_5_0_5b`` and
``kdtune.models.qwen2_5.lora_qwen2_5_0_5b``."""

from kdtune.models._builders import export_builders
from kdtune.models.qwen2 import BUILDERS

export_builders(globals(), BUILDERS, ["qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_3b", "qwen2_5_7b", "qwen2_5_14b"])
