"""Knowledge-distillation and cross-entropy losses as plain functions on tensors.

Conventions shared by every function here:

* ``student_logits`` and ``teacher_logits`` are ``[..., V]`` (typically ``[B, T, V]`` or ``[N, V]``) with the same
  vocabulary size; ``labels`` (optional) has the leading shape ``[...]`` and is already aligned with the logits (the
  caller shifts). Positions whose label equals ``ignore_index`` contribute nothing; ``labels=None`` means every
  position counts.
* Logits are upcast to float32 (float64 stays float64) before any softmax.
* ``temperature`` T divides both models' logits: ``p = softmax(logits / T)``. With
  ``scale_by_temperature_squared=True`` (the default, Hinton et al. 2015) the result is multiplied by T², which keeps
  the gradient magnitude w.r.t. the logits roughly independent of T. With T = 1 the factor is 1.
* The ``*_per_token`` functions return the divergence at every position, shape ``[...]``, *without* the T² factor.
  The reducing functions return the **sum** over valid positions (a scalar), T² included, so a training loop can
  divide by the number of valid tokens of the whole optimizer step.

Divergences (``p_t`` teacher distribution, ``p_s`` student distribution, sums over the vocabulary):

* forward KL  ``KL(p_t‖p_s) = Σ p_t (log p_t − log p_s)`` — the true KL, so ``KL(p, p) = 0``.
* reverse KL  ``KL(p_s‖p_t) = Σ p_s (log p_s − log p_t)``.
* symmetric KL (Jeffreys) ``KL(p_t‖p_s) + KL(p_s‖p_t)``.
* generalised JSD(β), ``M = β p_t + (1 − β) p_s``:
  ``JSD_β = [β KL(p_t‖M) + (1 − β) KL(p_s‖M)] / (β (1 − β))`` for 0 < β < 1, and its limits at the ends:
  ``JSD_0 = KL(p_t‖p_s)`` (forward), ``JSD_1 = KL(p_s‖p_t)`` (reverse). With ``normalize=False`` the division by
  ``β (1 − β)`` is left out in the interior (the convention of TRL's ``generalized_jsd_loss``; at β = 0.5 that is the
  classic JSD); the end points stay forward / reverse KL.
* skew forward KL(α) ``KL(p_t ‖ α p_t + (1 − α) p_s)``; skew reverse KL(α) ``KL(p_s ‖ α p_s + (1 − α) p_t)``
  (DistiLLM, Ko et al. 2024). α = 0 gives plain forward / reverse KL.
* total variation ``½ Σ |p_t − p_s|``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.errors import ConfigError

__all__ = [
    "cross_entropy_sum",
    "forward_kl",
    "forward_kl_per_token",
    "generalized_jsd",
    "generalized_jsd_per_token",
    "reverse_kl",
    "reverse_kl_per_token",
    "skew_forward_kl",
    "skew_forward_kl_per_token",
    "skew_reverse_kl",
    "skew_reverse_kl_per_token",
    "symmetric_kl",
    "symmetric_kl_per_token",
    "total_variation",
    "total_variation_per_token",
    "reduce_token_losses",
    "check_temperature",
]


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` as float32 unless it already is float32 or float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_temperature(temperature: float) -> None:
    """Raise ``ConfigError`` unless ``temperature`` is a positive finite number."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(
            f"temperature={temperature!r} is invalid: it must be a positive number (e.g. temperature=2.0)"
        )


def _check_fraction(name: str, value: float, *, allow_one: bool = True) -> None:
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (isinstance(value, (int, float)) and value >= 0.0 and upper_ok):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ConfigError(f"{name}={value!r} is invalid: it must lie in {bound}")


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    logits = upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) over the last dim from log-probabilities; entries with p = 0 contribute 0 (also when q = 0)."""
    p = log_p.exp()
    # `where` before the product keeps both value and gradient finite where p = 0 and log q = -inf.
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return (p * diff).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w p + (1 − w) q) for 0 < w < 1, computed stably in log space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def forward_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_t‖p_s) at every position, ``[...]`` (no T² factor)."""
    return _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


def reverse_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_s‖p_t) at every position, ``[...]`` (no T² factor)."""
    return _kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))


def symmetric_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Jeffreys divergence KL(p_t‖p_s) + KL(p_s‖p_t) at every position, ``[...]`` (no T² factor)."""
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits, temperature)
    return _kl(log_t, log_s) + _kl(log_s, log_t)


def generalized_jsd_per_token(
    student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0, normalize: bool = True
) -> Tensor:
    """Generalised Jensen-Shannon divergence JSD(β) at every position, ``[...]`` (no T² factor).

    ``M = β p_t + (1 − β) p_s``; ``JSD_β = [β KL(p_t‖M) + (1 − β) KL(p_s‖M)] / (β (1 − β))`` (without the division
    when ``normalize=False``); β = 0 is forward KL and β = 1 reverse KL (the limits of the normalised form).
    """
    _check_fraction("beta", beta)
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits, temperature)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = _log_mixture(log_t, log_s, beta)
    jsd = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    return jsd / (beta * (1.0 - beta)) if normalize else jsd


def skew_forward_kl_per_token(
    student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """Skew forward KL ``KL(p_t ‖ α p_t + (1 − α) p_s)`` at every position, ``[...]`` (no T² factor)."""
    _check_fraction("alpha", alpha, allow_one=False)
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits, temperature)
    return _kl(log_t, log_s if alpha == 0.0 else _log_mixture(log_t, log_s, alpha))


def skew_reverse_kl_per_token(
    student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """Skew reverse KL ``KL(p_s ‖ α p_s + (1 − α) p_t)`` at every position, ``[...]`` (no T² factor)."""
    _check_fraction("alpha", alpha, allow_one=False)
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits, temperature)
    return _kl(log_s, log_t if alpha == 0.0 else _log_mixture(log_s, log_t, alpha))


def total_variation_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Total variation distance ``½ Σ |p_t − p_s|`` at every position, ``[...]`` (no T² factor)."""
    p_s = _log_probs(student_logits, temperature).exp()
    p_t = _log_probs(teacher_logits, temperature).exp()
    return 0.5 * (p_t - p_s).abs().sum(-1)


def reduce_token_losses(
    per_token: Tensor,
    labels: Tensor | None,
    ignore_index: int = -100,
    scale: float = 1.0,
) -> Tensor:
    """Sum ``per_token`` ``[...]`` over positions whose label is not ``ignore_index``, times ``scale``.

    Masked positions are removed with ``where`` (not multiplied by 0), so a non-finite value at an ignored position
    cannot turn the sum into NaN. An all-masked input gives 0.
    """
    if labels is not None:
        if labels.shape != per_token.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match logits positions {tuple(per_token.shape)}"
            )
        per_token = torch.where(
            labels != ignore_index, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)
        )
    total = per_token.sum()
    return total * scale if scale != 1.0 else total


def _t2(temperature: float, scale_by_temperature_squared: bool) -> float:
    return float(temperature) ** 2 if scale_by_temperature_squared else 1.0


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Sum over valid positions of KL(p_t‖p_s) (× T² by default). Shapes: logits ``[..., V]``, labels ``[...]``."""
    check_temperature(temperature)
    per_token = forward_kl_per_token(student_logits, teacher_logits, temperature)
    return reduce_token_losses(per_token, labels, ignore_index, _t2(temperature, scale_by_temperature_squared))


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Sum over valid positions of KL(p_s‖p_t) (× T² by default)."""
    check_temperature(temperature)
    per_token = reverse_kl_per_token(student_logits, teacher_logits, temperature)
    return reduce_token_losses(per_token, labels, ignore_index, _t2(temperature, scale_by_temperature_squared))


def symmetric_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Sum over valid positions of KL(p_t‖p_s) + KL(p_s‖p_t) (× T² by default)."""
    check_temperature(temperature)
    per_token = symmetric_kl_per_token(student_logits, teacher_logits, temperature)
    return reduce_token_losses(per_token, labels, ignore_index, _t2(temperature, scale_by_temperature_squared))


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    normalize: bool = True,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Sum over valid positions of JSD(β) (× T² by default); see :func:`generalized_jsd_per_token`."""
    check_temperature(temperature)
    per_token = generalized_jsd_per_token(student_logits, teacher_logits, beta, temperature, normalize)
    return reduce_token_losses(per_token, labels, ignore_index, _t2(temperature, scale_by_temperature_squared))


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Sum over valid positions of KL(p_t ‖ α p_t + (1 − α) p_s) (× T² by default)."""
    check_temperature(temperature)
    per_token = skew_forward_kl_per_token(student_logits, teacher_logits, alpha, temperature)
    return reduce_token_losses(per_token, labels, ignore_index, _t2(temperature, scale_by_temperature_squared))


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Sum over valid positions of KL(p_s ‖ α p_s + (1 − α) p_t) (× T² by default)."""
    check_temperature(temperature)
    per_token = skew_reverse_kl_per_token(student_logits, teacher_logits, alpha, temperature)
    return reduce_token_losses(per_token, labels, ignore_index, _t2(temperature, scale_by_temperature_squared))


def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Sum over valid positions of ½ Σ|p_t − p_s| (× T² by default)."""
    check_temperature(temperature)
    per_token = total_variation_per_token(student_logits, teacher_logits, temperature)
    return reduce_token_losses(per_token, labels, ignore_index, _t2(temperature, scale_by_temperature_squared))


def cross_entropy_sum(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum of token cross-entropies ``−log softmax(logits)[label]`` over valid positions.

    Args:
        logits: ``[..., V]``, upcast to float32.
        labels: ``[...]`` aligned with ``logits`` (already shifted); ``ignore_index`` positions are skipped.

    Returns:
        Scalar sum (0 when every position is ignored).
    """
    logits = upcast(logits)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
