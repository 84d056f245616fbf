"""KD divergences on a sparse support: a cached teacher's top-k tokens (+ one tail bucket, or renormalised).

A cached teacher stores, per trained position, only its ``k`` most likely token ids and their log-probabilities
``t_logp [n, k]`` (at the cache temperature T: ``logits / T − logZ_T``). The student's full log-probabilities
``s_logp [n, V]`` (also at temperature T, i.e. ``log_softmax(student_logits / T)``) are reduced to the same support,
which is again a categorical distribution for both models, so every divergence below is the dense one of
:mod:`kdtune.losses.functional` applied to that support. Two documented ways to form the support (``tail=``):

* ``"bucket"`` (default): the ``k`` tokens plus ONE extra category holding the rest of the mass, for both models:
  ``K = k + 1`` entries, each model's support sums to 1. The teacher's tail is ``log(1 − Σ_k p_t)``, computed stably
  (``log1mexp`` of the top-k logsumexp), and kept at least ``TEACHER_TAIL_FLOOR`` below 0 in log space, so rounding
  of stored values (bf16) that makes ``Σ_k p_t`` reach 1 cannot give ``log 0`` (that would make reverse KL infinite).
  The student's tail is the logsumexp of its log-probabilities outside the top-k (no cancellation, exact gradients).
  When ``k == V`` there is no tail (both models' rest is empty), so the support is the full vocabulary and every
  divergence equals the dense one. By the data-processing inequality each divergence on this coarser support is a
  lower bound of the full-vocabulary divergence.
* ``"renormalize"``: both models renormalised over the teacher's top-k (``K = k``): ``log p − logsumexp_k(log p)``.
  Ignores the tail entirely; at ``k == V`` it is the dense divergence too.

The divergences (``*_per_token(s_logp [n, K], t_logp [n, K]) -> [n]``) take LOG-PROBABILITIES already tempered and
follow the conventions of :mod:`kdtune.losses.functional`: forward KL ``Σ p_t (log p_t − log p_s)``, reverse KL,
symmetric KL (their sum), JSD(β) divided by β(1 − β) (``normalize=False`` leaves that out; β = 0 / 1 are forward /
reverse KL), skew forward / reverse KL(α), total variation. Entries with zero probability contribute 0.
:func:`sparse_kd_loss_sum` is the reducing form: ``T² · Σ_n per_token`` (T² switchable), as the dense losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from kdtune.errors import ConfigError
from kdtune.losses import functional as KF
from kdtune.losses.functional import check_temperature, upcast

__all__ = [
    "DIVERGENCES",
    "TAIL_MODES",
    "TEACHER_TAIL_FLOOR",
    "forward_kl_per_token",
    "generalized_jsd_per_token",
    "log1mexp",
    "reverse_kl_per_token",
    "skew_forward_kl_per_token",
    "skew_reverse_kl_per_token",
    "sparse_kd_loss_sum",
    "sparse_support",
    "student_support",
    "symmetric_kl_per_token",
    "teacher_support",
    "total_variation_per_token",
]

TailMode = Literal["bucket", "renormalize"]
TAIL_MODES: tuple[str, ...] = ("bucket", "renormalize")

#: The teacher's top-k log-mass is clamped to at most ``-TEACHER_TAIL_FLOOR`` before ``log1mexp``, so its tail bucket
#: keeps a probability of at least ~``TEACHER_TAIL_FLOOR`` (float32 rounding level; a true tail below it is noise).
TEACHER_TAIL_FLOOR = 2.0**-24


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, stable at both ends (Mächler 2012): ``log(−expm1(x))`` for ``x > −ln 2``,
    ``log1p(−exp(x))`` below. ``x = 0`` gives ``−inf``."""
    small = x > -math.log(2.0)
    # each branch is evaluated on values where it is safe, so neither the value nor the gradient of the unused one
    # can be NaN
    near = torch.where(small, x, torch.full_like(x, -1.0))
    far = torch.where(small, torch.full_like(x, -1.0), x)
    return torch.where(small, torch.log(-torch.expm1(near)), torch.log1p(-torch.exp(far)))


def _check_tail(tail: str) -> None:
    if tail not in TAIL_MODES:
        raise ConfigError(f"tail={tail!r} is not a sparse-KD tail mode; use one of {', '.join(TAIL_MODES)}")


def sparse_support(s_logp: Tensor, t_ids: Tensor, t_logp: Tensor, tail: TailMode = "bucket") -> tuple[Tensor, Tensor]:
    """Both models' log-probabilities over the teacher's top-k support (see the module docstring).

    Args:
        s_logp: ``[n, V]`` student log-probabilities at temperature T (``log_softmax(logits / T)``), fp32/fp64.
        t_ids: ``[n, k]`` the teacher's top-k token ids (distinct per row, ``< V``), any integer dtype.
        t_logp: ``[n, k]`` the teacher's log-probabilities of those tokens at temperature T (normalised over V).
        tail: ``"bucket"`` (top-k + one bucket for the rest) or ``"renormalize"`` (both renormalised over the top-k).

    Returns:
        ``(s_sup, t_sup)``, each ``[n, K]`` log-probabilities summing to 1 over K (``K = k + 1`` for ``"bucket"`` with
        ``k < V``, else ``K = k``), in ``s_logp``'s dtype.
    """
    _check_tail(tail)
    if s_logp.dim() != 2 or t_ids.shape != t_logp.shape or t_ids.shape[0] != s_logp.shape[0]:
        raise ValueError(
            f"sparse_support needs s_logp [n, V], t_ids and t_logp [n, k]; got {tuple(s_logp.shape)}, "
            f"{tuple(t_ids.shape)}, {tuple(t_logp.shape)}"
        )
    V, k = s_logp.shape[-1], t_ids.shape[-1]
    if k > V:
        raise ValueError(f"the teacher support has k={k} entries but the student vocabulary only V={V}")
    ids = t_ids.long()
    s_top = s_logp.gather(-1, ids)  # [n, k]
    s_tail = None
    if tail == "bucket" and k < V:
        # the student's rest, summed directly over the tokens outside the top-k (exact, gradient included)
        s_rest = s_logp.scatter(-1, ids, float("-inf"))  # [n, V]
        s_tail = torch.logsumexp(s_rest, -1, keepdim=True)  # [n, 1]
    return student_support(s_top, s_tail, tail), teacher_support(t_logp.to(s_logp.dtype), tail, k == V)


def student_support(s_top: Tensor, s_tail: Tensor | None, tail: TailMode) -> Tensor:
    """The student's support ``[n, K]`` from its log-probs at the top-k ids ``s_top [n, k]`` and, for ``"bucket"``
    with ``k < V``, its log-mass outside them ``s_tail [n, 1]`` (None when there is no tail)."""
    if tail == "renormalize":
        return s_top - torch.logsumexp(s_top, -1, keepdim=True)
    return s_top if s_tail is None else torch.cat([s_top, s_tail], -1)


def teacher_support(t_top: Tensor, tail: TailMode, full: bool) -> Tensor:
    """The teacher's support ``[n, K]`` from its top-k log-probs ``t_top [n, k]``; ``full``: k = V (no tail)."""
    if tail == "renormalize":
        return t_top - torch.logsumexp(t_top, -1, keepdim=True)
    if full:  # nothing outside the top-k: the support is the whole vocabulary
        return t_top
    t_mass = torch.logsumexp(t_top, -1, keepdim=True).clamp(max=-TEACHER_TAIL_FLOOR)  # [n, 1]
    return torch.cat([t_top, log1mexp(t_mass)], -1)  # [n, k + 1]


# ----------------------------------------------------------------------------------- divergences on a support
# The same formulas as the dense path (kdtune.losses.functional): a divergence only sees two log-prob supports.
forward_kl_per_token = KF.forward_kl
reverse_kl_per_token = KF.reverse_kl
symmetric_kl_per_token = KF.symmetric_kl
skew_forward_kl_per_token = KF.skew_forward_kl
skew_reverse_kl_per_token = KF.skew_reverse_kl
total_variation_per_token = KF.total_variation


def generalized_jsd_per_token(s_logp: Tensor, t_logp: Tensor, beta: float = 0.5, normalize: bool = True) -> Tensor:
    """JSD(β) per row, ``[n]`` (see :func:`kdtune.losses.functional.generalized_jsd`); β is checked first."""
    return KF.generalized_jsd(s_logp, t_logp, KF.check_fraction("beta", beta), normalize)


#: divergence name -> per-token function on a support (extra keyword arguments: ``beta``/``normalize``, ``alpha``)
DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl_per_token,
    "reverse_kl": reverse_kl_per_token,
    "symmetric_kl": symmetric_kl_per_token,
    "jsd": generalized_jsd_per_token,
    "skew_forward_kl": skew_forward_kl_per_token,
    "skew_reverse_kl": skew_reverse_kl_per_token,
    "tvd": total_variation_per_token,
}


def sparse_kd_loss_sum(
    student_logits: Tensor,
    t_ids: Tensor,
    t_logp: Tensor,
    divergence: str | Callable[..., Tensor] = "forward_kl",
    *,
    tail: TailMode = "bucket",
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    **divergence_kwargs: float | bool,
) -> Tensor:
    """``T² · Σ_n divergence(student, teacher)`` over a sparse teacher support (T² switchable), a scalar.

    Args:
        student_logits: ``[n, V]`` student logits of the trained positions (upcast to fp32; divided by T here).
        t_ids: ``[n, k]`` the teacher's top-k ids.
        t_logp: ``[n, k]`` the teacher's log-probabilities of those ids at temperature ``temperature``.
        divergence: a name of :data:`DIVERGENCES` or a ``per_token(s_logp, t_logp, **kwargs)`` function.
        tail: ``"bucket"`` or ``"renormalize"`` (see the module docstring).
        temperature: T, applied to the student's logits (the teacher's values are already at T).
        scale_by_temperature_squared: multiply by T² (Hinton et al. 2015), as the dense losses do.
        **divergence_kwargs: e.g. ``beta=0.5`` for ``"jsd"``, ``alpha=0.1`` for the skew KLs.
    """
    check_temperature(temperature)
    if isinstance(divergence, str):
        if divergence not in DIVERGENCES:
            raise ConfigError(f"divergence={divergence!r} is unknown; use one of {', '.join(DIVERGENCES)}")
        divergence = DIVERGENCES[divergence]
    logits = upcast(student_logits)
    s_logp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    s_sup, t_sup = sparse_support(s_logp, t_ids, t_logp, tail)
    total = divergence(s_sup, t_sup, **divergence_kwargs).sum()
    return total * float(temperature) ** 2 if scale_by_temperature_squared and temperature != 1.0 else total
