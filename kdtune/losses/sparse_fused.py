"""Cross-entropy + a sparse (cached top-k) KD divergence for one chunk, with the logits' gradient written out by hand.

The fused objective (:mod:`kdtune.losses.fused`) hands each chunk's fp32 student logits ``[n, V]`` to a chunk loss
and needs ``d mixed / d logits``. With a cached teacher the divergence only sees a support of ``K`` entries per row
(the teacher's top-k, plus one tail bucket or renormalised; see :mod:`kdtune.losses.sparse`), so autograd through
``log_softmax`` → ``gather`` / ``scatter`` → ``logsumexp`` over ``[n, V]`` does far more work than the loss needs.
:func:`ce_sparse_kd` instead

1. reads the logits once, a few rows at a time on a CPU (block-sized intermediates stay in its cache): the logits at
   the teacher's ids and the target, and the mass of the rest (the tokens outside the top-k) as ``Σ exp(s − m)`` with
   ``m`` the rest's own max — a sum >= 1, so neither underflow nor cancellation, however peaked the student. From
   these come the log-normalisers at 1 and T, the cross-entropy, and the student's support;
2. evaluates the divergence on the ``[n, K]`` supports with autograd (any :class:`kdtune.losses.Divergence`'s
   ``per_token``; only ``[n, K]`` tensors in that graph), giving ``g = d KD / d a`` for the support log-probs ``a``;
3. writes ``d mixed / d logits`` in one more pass over the logits, through the support's Jacobian by hand. With
   ``z = logits / T``, ``p = softmax(z)``, ``G = Σ_c g_c`` and the tail's student mass ``Q`` (``a_tail = log Q``):

   * bucket: ``d KD / d z_j = g_j − p_j G`` for j in the top-k and ``p_j (g_tail / Q − G)`` outside it;
   * bucket at k = V (no tail): ``g_j − p_j G``;
   * renormalize: ``g_j − softmax_k(z)_j G`` in the top-k, 0 outside;

   and ``d mixed / d logits = (1 − r) (softmax(logits) − onehot(y)) + r · scale / T · d KD / d z``.

Values and gradients are those of the autograd reference (:func:`kdtune.losses.sparse.sparse_support` + the
divergence + ``F.cross_entropy`` under the linear mix), which is why the objective takes this path only for its own
mixing rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdtune.losses.fused import rows_per_block, stored_gradient_outputs, take_stored_gradient
from kdtune.losses.sparse import TailMode, student_support, teacher_support

__all__ = ["ce_sparse_kd"]

#: logits per row block on a CPU (fp32: 1 MiB per block-sized intermediate; one block per chunk on an accelerator).
#: Its block loops do fewer passes per row than :func:`kdtune.losses.fused.ce_forward_kl`'s, so larger blocks pay:
#: measured 64 rows 1.2x faster than 16 at V = 4096, 8 rows 1.25x faster than 2 at V = 32000 (T = 1).
BLOCK_ELEMENTS = 2**18


def ce_sparse_kd(
    logits: Tensor,
    t_ids: Tensor,
    t_logp: Tensor,
    targets: Tensor,
    *,
    divergence: Callable[[Tensor, Tensor], Tensor],
    tail: TailMode,
    kd_ratio: float,
    temperature: float,
    scale: float,
    mix: Callable[[Tensor, Tensor], Tensor],
    overwrite_logits: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mixed, ce_sum, kd_sum)`` of one chunk: cross-entropy + a divergence over the cached teacher's support.

    Args:
        logits: ``[n, V]`` fp32/fp64 student logits (a leaf with ``requires_grad`` for training).
        t_ids: ``[n, k]`` the teacher's top-k ids (distinct per row, ``< V``).
        t_logp: ``[n, k]`` the teacher's log-probabilities of those ids at temperature T.
        targets: ``[n]`` next-token ids.
        divergence: ``per_token(student_logp [n, K], teacher_logp [n, K]) -> [n]`` (a Divergence's ``per_token``).
        tail: ``"bucket"`` or ``"renormalize"`` (see :mod:`kdtune.losses.sparse`).
        kd_ratio: r of the linear mix; at 0 the divergence is computed for logging but gives no gradient.
        temperature: T; scale: T² or 1 (the factor on the divergence's sum); mix: the objective's mixing rule.
        overwrite_logits: write the gradient into the storage of ``logits`` (which the caller no longer reads).
    """
    return _CESparseKD.apply(
        logits, t_ids, t_logp, targets, divergence, tail, kd_ratio, temperature, scale, mix, overwrite_logits
    )


class _CESparseKD(torch.autograd.Function):
    """Forward computes the sums and ``d mixed / d logits``; backward scales that stored gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        t_ids: Tensor,
        t_logp: Tensor,
        targets: Tensor,
        divergence: Callable[[Tensor, Tensor], Tensor],
        tail: TailMode,
        kd_ratio: float,
        temperature: float,
        scale: float,
        mix: Callable[[Tensor, Tensor], Tensor],
        overwrite_logits: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, v = logits.shape
        ids = t_ids.long()  # [n, k]
        k = ids.shape[-1]
        T = float(temperature)
        has_rest = k < v  # tokens outside the top-k exist (their CE gradient, and the bucket's tail)
        block = rows_per_block(n, v, logits.device, BLOCK_ELEMENTS)
        need_grad = ctx.needs_input_grad[0]
        g = (logits if overwrite_logits else torch.empty_like(logits)) if need_grad else None  # [n, V]

        # 1. per row, block by block: the logits at the ids, the log-normalisers at 1 and T, the rest's mass. The
        # rest is summed as exp(s − m) with m the rest's own max (ids masked to −inf), so its sums are >= 1: no
        # underflow and no cancellation however peaked the student is. The block's d = s − m (T ≠ 1) or exp(s − m)
        # (T = 1) stays in the gradient's storage for step 3.
        s_ids = logits.new_empty(n, k)  # [n, k] logits at the ids
        s_y = logits.new_empty(n, 1)  # [n, 1] logit of the target
        m = logits.new_empty(n)  # [n] max of the rest
        sum1 = logits.new_empty(n)  # [n] Σ_rest exp(s − m)
        sum_t = sum1 if T == 1.0 else logits.new_empty(n)  # [n] Σ_rest exp((s − m) / T)
        for i in range(0, n, block):
            j = min(i + block, n)
            s, b_ids = logits[i:j], ids[i:j]  # [b, V], [b, k]
            torch.gather(s, -1, b_ids, out=s_ids[i:j])
            torch.gather(s, -1, targets[i:j, None], out=s_y[i:j])
            if not has_rest:
                continue
            d = (s if overwrite_logits else g[i:j].copy_(s)) if g is not None else s.clone()  # [b, V]
            d.scatter_(-1, b_ids, float("-inf"))
            torch.amax(d, -1, out=m[i:j])
            d.sub_(m[i:j, None])
            if T == 1.0:
                torch.sum(d.exp_(), -1, out=sum1[i:j])
            else:
                torch.sum(torch.exp(d), -1, out=sum1[i:j])
                torch.sum(torch.div(d, T).exp_(), -1, out=sum_t[i:j])
            del d
        z_ids = s_ids if T == 1.0 else s_ids / T  # [n, k]
        lse1 = torch.logsumexp(s_ids, -1)  # [n] logsumexp(s) (so far over the ids only)
        lse_t = lse1 if T == 1.0 else torch.logsumexp(z_ids, -1)  # [n] logsumexp(s / T)
        if has_rest:  # + the rest
            lse1 = torch.logaddexp(m + sum1.log(), lse1)
            lse_t = lse1 if T == 1.0 else torch.logaddexp(m / T + sum_t.log(), lse_t)
        ce_rows = lse1 - s_y.squeeze(-1)  # [n] −log p(y)
        s_top = z_ids - lse_t[:, None]  # [n, k] log softmax(s / T) at the ids
        s_tail = None
        if tail == "bucket" and has_rest:
            s_tail = (m / T + sum_t.log() - lse_t)[:, None]  # [n, 1] log of the student's mass outside the ids

        # 2. the divergence on the [n, K] supports (autograd on the supports only)
        a = student_support(s_top, s_tail, tail)  # [n, K]
        t_sup = teacher_support(t_logp.to(logits.dtype), tail, not has_rest)  # [n, K]
        c = kd_ratio * scale / T  # factor of d KD / d z in d mixed / d logits
        with torch.enable_grad():
            a_leaf = a.detach().requires_grad_(need_grad and c != 0.0)
            kd_rows = divergence(a_leaf, t_sup)  # [n]
            kd_sum = kd_rows.sum()
            ga = torch.autograd.grad(kd_sum, a_leaf)[0] if a_leaf.requires_grad else None  # [n, K]
        kd_sum = kd_sum.detach()

        # 3. d mixed / d logits, block by block: a per-row factor on the rest, the top-k entries set, CE's one-hot
        if g is not None:
            w_ce = 1.0 - kd_ratio
            top = torch.exp(s_ids - lse1[:, None]).mul_(w_ce)  # [n, k] (1 − r) p at the ids
            kd_rest = None  # [n] c · d KD / d z_j / exp((s_j − m) / T) for j in the rest (bucket only)
            if ga is not None:
                big_g = ga.sum(-1)  # [n] G
                x = a.exp() if tail == "renormalize" else s_top.exp()  # [n, k] softmax_k(z) or softmax(z) at the ids
                top.add_((ga[:, :k] - x * big_g[:, None]).mul_(c))
                if s_tail is not None:
                    kd_rest = c * (ga[:, -1] / sum_t - torch.exp(m / T - lse_t) * big_g)
            ce_rest = torch.exp(m - lse1).mul_(w_ce)  # [n] (1 − r) p_j / exp(s_j − m)
            minus_w_ce = logits.new_full((min(block, n), 1), -w_ce)  # CE's one-hot, added at the targets
            for i in range(0, n, block):
                j = min(i + block, n)
                gb, b_ids = g[i:j], ids[i:j]  # [b, V] (holding d or exp(d) of step 1), [b, k]
                if has_rest:
                    if T == 1.0:
                        rest = ce_rest[i:j] if kd_rest is None else ce_rest[i:j] + kd_rest[i:j]
                        gb.mul_(rest[:, None])
                    else:
                        e_t = torch.div(gb, T).exp_() if kd_rest is not None else None
                        gb.exp_().mul_(ce_rest[i:j, None])
                        if e_t is not None:
                            gb.addcmul_(e_t, kd_rest[i:j, None])
                gb.scatter_(-1, b_ids, top[i:j])  # (at k = V every entry is set here)
                if w_ce:
                    gb.scatter_add_(-1, targets[i:j, None], minus_w_ce[: j - i])
        ce = ce_rows.sum()
        kd = kd_sum * scale if scale != 1.0 else kd_sum
        return stored_gradient_outputs(ctx, g, ce, kd, mix)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_mixed: Tensor, *_: Tensor) -> tuple:  # type: ignore[override]
        g = take_stored_gradient(ctx, grad_mixed, "ce_sparse_kd")
        return (g,) + (None,) * 10  # only the logits are differentiable
