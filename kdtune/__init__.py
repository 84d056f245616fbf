"""kdtune: native-PyTorch knowledge distillation and fine-tuning for large language models."""

__version__ = "0.1.0"
