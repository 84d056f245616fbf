"""Helpers for tests, examples and the quickstart (no ``transformers`` needed)."""

from kdtune.testing.models import make_tiny_hf_checkpoint, tiny_hf_config

__all__ = ["make_tiny_hf_checkpoint", "tiny_hf_config"]
