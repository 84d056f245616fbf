"""The embedded default task: a distillation that visibly works, offline, on a laptop CPU (`kdtune quickstart`)."""

from kdtune.quickstart.pipeline import main

__all__ = ["main"]
