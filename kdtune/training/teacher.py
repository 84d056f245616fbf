"""Teacher setup for distillation: freeze, fingerprint, and check the vocabulary against the student's."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from kdtune.errors import ConfigError

__all__ = ["setup_teacher", "param_fingerprint", "assert_frozen", "check_vocab_compatibility"]

log = logging.getLogger(__name__)

# Without tokenizers, a size difference up to this fraction is taken as padding (Qwen2.5: 152064 vs 151936 = 0.08%,
# GPT-2 padded to 50304 vs 50257 = 0.09%); anything larger means different tokenizers.
_PADDING_TOLERANCE = 0.01
_PROBE_TEXTS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand newlines\nnumbers 1234567890 and symbols #$%&*()[]{}<>",
    "Ünïcödé — naïve café, 日本語のテキスト, 中文, emoji 🙂",
    "def f(x):\n    return x ** 2  # code",
)


def setup_teacher(model: nn.Module) -> nn.Module:
    """Freeze a teacher in place: ``eval()`` mode, ``requires_grad=False`` on every parameter, grads cleared.

    Never give the teacher's parameters to an optimizer; :func:`assert_frozen` checks all of this.

    Returns:
        The same module, for chaining.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return model


@torch.no_grad()
def param_fingerprint(model: nn.Module, include_buffers: bool = True) -> dict[str, str]:
    """SHA-256 of the exact bytes (and dtype/shape) of every parameter (and buffer): name → hex digest."""
    out: dict[str, str] = {}
    tensors: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    if include_buffers:
        tensors += [(n, b) for n, b in model.named_buffers() if b is not None]
    for name, t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t  # DTensor shard
        data = local.detach().contiguous().cpu()
        h = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        out[name] = h.hexdigest()
    return out


def assert_frozen(
    model: nn.Module,
    fingerprint: dict[str, str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Raise ``RuntimeError`` unless the teacher is frozen.

    Checks: eval mode (every submodule), no parameter requires or holds a gradient, none of its parameters is in
    ``optimizer``, and (if given) the weights still match ``fingerprint`` bit for bit.
    """
    problems: list[str] = []
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    if training:
        problems.append(f"modules in train mode: {training[:3]}")
    grads = [n for n, p in model.named_parameters() if p.requires_grad or p.grad is not None]
    if grads:
        problems.append(f"parameters requiring or holding gradients: {grads[:3]}")
    if optimizer is not None:
        ids = {id(p) for p in model.parameters()}
        if any(id(p) in ids for g in optimizer.param_groups for p in g["params"]):
            problems.append("teacher parameters are in the optimizer")
    if fingerprint is not None:
        now = param_fingerprint(model)
        changed = sorted(k for k in set(now) | set(fingerprint) if now.get(k) != fingerprint.get(k))
        if changed:
            problems.append(f"weights changed: {changed[:3]}")
    if problems:
        raise RuntimeError("teacher is not frozen: " + "; ".join(problems))


def _tok_attr(tok: Any, name: str) -> Any:
    return getattr(tok, name, None)


def _tokenizer_size(tok: Any) -> int | None:
    size = _tok_attr(tok, "vocab_size")
    return int(size) if size is not None else None


def _tokenizers_agree(student_tok: Any, teacher_tok: Any) -> str | None:
    """None if the tokenizers behave identically on the probes; otherwise a short description of the first difference."""
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id"):
        a, b = _tok_attr(student_tok, attr), _tok_attr(teacher_tok, attr)
        if a != b:
            return f"{attr} differs (student {a}, teacher {b})"
    for text in _PROBE_TEXTS:
        a = student_tok.encode(text, add_bos=False, add_eos=False)
        b = teacher_tok.encode(text, add_bos=False, add_eos=False)
        if list(a) != list(b):
            return f"they encode {text[:30]!r}... differently"
    return None


def check_vocab_compatibility(
    student_vocab: int,
    teacher_vocab: int,
    student_tokenizer: Any | None = None,
    teacher_tokenizer: Any | None = None,
) -> int:
    """Check that teacher and student logits index the same tokens; return the vocab size the KD loss compares.

    * Equal sizes: fine (tokenizers, if given, must agree).
    * Different sizes where the larger model is only padded (Qwen2.5-14B 152064 vs 0.5B/3B 151936): the KD term uses
      the first ``min`` logits of both, i.e. a padded-larger teacher is sliced to the student's vocab. With tokenizers
      this requires identical tokenizers whose ids all fit in the smaller vocab; without, the sizes must differ by at
      most 1%.
    * Otherwise (e.g. Llama-2 32000 vs Llama-3 128256, or different tokenizers) ``ConfigError``.

    Args:
        student_vocab: rows of the student's output projection.
        teacher_vocab: rows of the teacher's output projection.
        student_tokenizer: optional ``kdtune.data`` tokenizer of the student.
        teacher_tokenizer: optional tokenizer of the teacher.

    Returns:
        ``min(student_vocab, teacher_vocab)``.
    """
    common = min(student_vocab, teacher_vocab)
    fix = "distil between models that share a tokenizer (same family), e.g. Qwen2.5-14B -> Qwen2.5-3B"
    if student_tokenizer is not None and teacher_tokenizer is not None:
        diff = _tokenizers_agree(student_tokenizer, teacher_tokenizer)
        if diff is not None:
            raise ConfigError(f"teacher and student tokenizers are incompatible: {diff}; {fix}")
    tok = student_tokenizer if student_tokenizer is not None else teacher_tokenizer
    tok_size = _tokenizer_size(tok) if tok is not None else None
    if tok_size is not None and tok_size > common:
        who = "teacher" if teacher_vocab < student_vocab else "student"
        raise ConfigError(
            f"the tokenizer has {tok_size} tokens but the {who} model's vocab is only {common}: "
            f"the checkpoints do not match the tokenizer; {fix}"
        )
    if student_vocab == teacher_vocab:
        return common
    larger, smaller = max(student_vocab, teacher_vocab), common
    if tok_size is None and (larger - smaller) > _PADDING_TOLERANCE * smaller:
        raise ConfigError(
            f"teacher vocab {teacher_vocab} and student vocab {student_vocab} differ by more than padding: "
            f"their tokenizers are different; {fix}"
        )
    padded = "teacher" if teacher_vocab > student_vocab else "student"
    log.info("%s vocab is padded (%d vs %d): the KD loss compares the first %d logits", padded, larger, smaller, common)
    return common
