"""Divergences between categorical distributions, as plain functions on log-probabilities.

Every function here takes ``student_logp`` and ``teacher_logp`` of shape ``[..., K]``: log-probabilities over the
same support of K categories (the whole vocabulary for a live teacher; the cached top-k plus a tail bucket for a
cached one) — already divided by the temperature and normalised, so the divergences never see the temperature. They
return the divergence at every position, shape ``[...]``, without the T² factor (the objective applies it once).

* forward KL  ``KL(p_t‖p_s) = Σ p_t (log p_t − log p_s)`` — the true KL, so ``KL(p, p) = 0``.
* reverse KL  ``KL(p_s‖p_t)``.
* symmetric KL (Jeffreys) ``KL(p_t‖p_s) + KL(p_s‖p_t)``.
* generalised JSD(β), ``M = β p_t + (1 − β) p_s``: ``[β KL(p_t‖M) + (1 − β) KL(p_s‖M)] / (β (1 − β))`` for
  0 < β < 1 and its limits at the ends (β = 0 forward KL, β = 1 reverse KL); ``normalize=False`` leaves the division
  out in the interior (TRL's ``generalized_jsd_loss`` convention; at β = 0.5 the classic JSD).
* skew forward KL(α) ``KL(p_t ‖ α p_t + (1 − α) p_s)``; skew reverse KL(α) ``KL(p_s ‖ α p_s + (1 − α) p_t)``
  (DistiLLM, Ko et al. 2024); α = 0 is plain forward / reverse KL.
* total variation ``½ Σ |p_t − p_s|``.

:func:`log_probs` is the one place logits become tempered log-probabilities (fp32 upcast, ``logits / T``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdtune.errors import ConfigError

__all__ = [
    "check_fraction",
    "check_temperature",
    "forward_kl",
    "generalized_jsd",
    "kl",
    "log_probs",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "symmetric_kl",
    "total_variation",
    "upcast",
]


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` as float32 unless it already is float32 or float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, raising ``ConfigError`` unless it is a positive finite number."""
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (ok and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(
            f"temperature={temperature!r} is invalid: it must be a positive number (e.g. temperature=2.0)"
        )
    return float(temperature)


def check_fraction(name: str, value: float, *, allow_one: bool = True) -> float:
    """Return ``value`` as a float, raising ``ConfigError`` unless it lies in [0, 1] ([0, 1) without ``allow_one``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    upper_ok = ok and (value <= 1.0 if allow_one else value < 1.0)
    if not (ok and value >= 0.0 and upper_ok):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ConfigError(f"{name}={value!r} is invalid: it must lie in {bound}")
    return float(value)


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T)`` over the last dim, in fp32 (fp64 stays fp64); the division is skipped at T = 1."""
    logits = upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) over the last dim from log-probabilities; entries with p = 0 contribute 0 (also when q = 0)."""
    p = log_p.exp()
    # `where` before the product keeps both value and gradient finite where p = 0 and log q = -inf.
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return (p * diff).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w p + (1 − w) q) for 0 < w < 1, computed stably in log space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(p_t‖p_s) at every position ``[...]``."""
    return kl(teacher_logp, student_logp)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(p_s‖p_t) at every position ``[...]``."""
    return kl(student_logp, teacher_logp)


def symmetric_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Jeffreys divergence KL(p_t‖p_s) + KL(p_s‖p_t) at every position ``[...]``."""
    return kl(teacher_logp, student_logp) + kl(student_logp, teacher_logp)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5, normalize: bool = True) -> Tensor:
    """Generalised Jensen-Shannon divergence JSD(β) at every position ``[...]`` (see the module docstring)."""
    if beta == 0.0:
        return kl(teacher_logp, student_logp)
    if beta == 1.0:
        return kl(student_logp, teacher_logp)
    log_m = _log_mixture(teacher_logp, student_logp, beta)
    jsd = beta * kl(teacher_logp, log_m) + (1.0 - beta) * kl(student_logp, log_m)
    return jsd / (beta * (1.0 - beta)) if normalize else jsd


def skew_forward_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew forward KL ``KL(p_t ‖ α p_t + (1 − α) p_s)`` at every position ``[...]``."""
    return kl(teacher_logp, student_logp if alpha == 0.0 else _log_mixture(teacher_logp, student_logp, alpha))


def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL ``KL(p_s ‖ α p_s + (1 − α) p_t)`` at every position ``[...]``."""
    return kl(student_logp, teacher_logp if alpha == 0.0 else _log_mixture(student_logp, teacher_logp, alpha))


def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Total variation distance ``½ Σ |p_t − p_s|`` at every position ``[...]``."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)
