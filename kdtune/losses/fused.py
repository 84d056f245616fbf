"""The fused output-layer + loss path: logits, loss and their gradients computed chunk by chunk in the forward pass.

:func:`fused_linear_loss` takes the final hidden states of the ``N`` trained positions ``[N, D]`` and the output
weight ``[V, D]``. For each chunk of rows it computes the fp32 logits ``[n, V]``, calls the caller's ``chunk_loss`` on
them (which may also run the teacher's output layer for the same rows, once, under ``no_grad``), takes the gradient of
the chunk's mixed loss with respect to the logits with autograd, and immediately turns it into the gradient with
respect to the hidden rows (``g @ W``) and, only when the weight trains, into the weight gradient (``g.T @ h``). Nothing
vocab-sized outlives its chunk and nothing is recomputed in backward: backward only scales the stored gradients by the
incoming gradient of the loss.

Chunks are sized by a row budget derived from a memory budget (:func:`rows_per_chunk_for`) so the output-layer GEMMs
get enough rows to run efficiently; an explicit row count or a ``num_output_chunks``-style chunk count overrides it.

The chunk losses follow the objective contract: temperature is applied once here, divergences receive tempered
log-probabilities ``per_token(s_logp [n, K], t_logp [n, K]) -> [n]`` over a categorical support (the dense vocabulary
for a live teacher, :func:`dense_kd_chunk_loss`; top-k plus a tail bucket or renormalised top-k for a cached teacher,
:func:`sparse_kd_chunk_loss`), ``kd_sum = T² · Σ per_token`` and ``mixed = (1 − kd_ratio) · ce_sum + kd_ratio ·
kd_sum``. With ``T == 1`` one student log-softmax serves the cross-entropy and the divergence.

What the caller passes as ``weight`` (see :func:`fused_output_weight`): the output projection's weight, or the
token-embedding weight for tied embeddings (autograd then adds the fused path's gradient to the embedding lookup's);
for a LoRA output projection the effective weight ``W + scale · B @ A`` (differentiable, so the adapter gets its
gradient through autograd; costs one ``[V, D]`` tensor), or the caller falls back to the unfused objective when there
is no single effective weight (NF4 base, dropout on the adapter in training, a bias).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.losses import functional as KF
from kdtune.losses import kd as KD

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "ChunkLoss",
    "FusedLossParts",
    "FusedObjectiveOutput",
    "chunk_slices",
    "dense_kd_chunk_loss",
    "fused_distillation_objective",
    "fused_linear_loss",
    "forward_kl_chunk_loss",
    "fused_output_weight",
    "kd_chunk_loss",
    "logprob_divergence",
    "rows_per_chunk_for",
    "sparse_kd_chunk_loss",
]

#: ``chunk_loss(logits_fp32 [n, V], rows) -> (mixed_sum, ce_sum, kd_sum)``; ``rows`` indexes the ``N`` hidden rows.
ChunkLoss = Callable[[Tensor, slice], tuple[Tensor, Tensor, Tensor]]
#: ``per_token(s_logp [n, K], t_logp [n, K]) -> [n]`` on tempered log-probabilities over one categorical support.
Divergence = Callable[[Tensor, Tensor], Tensor]

DEFAULT_MEMORY_BUDGET_BYTES = 512 * 2**20
#: fp32 ``[n, V]`` tensors alive at once per chunk in the default chunk losses (student and teacher logits and
#: log-probs, the divergence's intermediates, their gradients); measured peak ≈ 6-8 of them.
VOCAB_TENSORS_PER_ROW = 8
MIN_ROWS_PER_CHUNK, MAX_ROWS_PER_CHUNK = 64, 4096


class FusedLossParts(NamedTuple):
    """The logged parts of :func:`fused_linear_loss` (detached fp32 scalars) and the number of rows.

    Attributes:
        ce_sum: student cross-entropy summed over the rows.
        kd_sum: divergence summed over the rows (× T² when the chunk loss scales); 0 without a teacher.
        num_rows: ``N``.
    """

    ce_sum: Tensor
    kd_sum: Tensor
    num_rows: int


# ----------------------------------------------------------------------------------------------------- chunk sizing
def rows_per_chunk_for(
    vocab_size: int,
    memory_budget_bytes: int | None = None,
    *,
    tensors_per_row: int = VOCAB_TENSORS_PER_ROW,
) -> int:
    """Rows per chunk so that ``tensors_per_row`` fp32 ``[rows, vocab_size]`` tensors fit in the memory budget.

    ``clamp(budget // (vocab_size * 4 * tensors_per_row), 64, 4096)``: at least 64 rows so the output-layer GEMMs
    stay efficient, at most 4096 because more rows gain no GEMM speed.

    Args:
        vocab_size: ``V`` of the logits.
        memory_budget_bytes: bytes the chunk's vocab-sized tensors may take (default 512 MiB).
        tensors_per_row: how many fp32 ``[n, V]`` tensors are alive at once per chunk.

    Returns:
        The row count.
    """
    budget = DEFAULT_MEMORY_BUDGET_BYTES if memory_budget_bytes is None else memory_budget_bytes
    if not isinstance(budget, int) or budget <= 0:
        raise ConfigError(f"loss_memory_budget={budget!r} is invalid: give a positive number of bytes (e.g. 536870912)")
    rows = budget // max(1, vocab_size * 4 * tensors_per_row)
    return int(min(max(rows, MIN_ROWS_PER_CHUNK), MAX_ROWS_PER_CHUNK))


def chunk_slices(
    num_rows: int,
    vocab_size: int,
    *,
    rows_per_chunk: int | None = None,
    num_output_chunks: int | None = None,
    memory_budget_bytes: int | None = None,
) -> list[slice]:
    """Split ``num_rows`` rows into consecutive chunks.

    Precedence: ``rows_per_chunk`` if given; else ``num_output_chunks`` (that many near-equal chunks, the old
    ``num_output_chunks`` setting); else the memory budget (:func:`rows_per_chunk_for`). No chunk is empty.

    Returns:
        ``slice`` objects covering ``range(num_rows)`` in order (empty list for ``num_rows == 0``).
    """
    if rows_per_chunk is not None and (not isinstance(rows_per_chunk, int) or rows_per_chunk < 1):
        raise ConfigError(f"loss_rows_per_chunk={rows_per_chunk!r} is invalid: it must be an integer >= 1")
    if num_output_chunks is not None and (not isinstance(num_output_chunks, int) or num_output_chunks < 1):
        raise ConfigError(f"num_output_chunks={num_output_chunks!r} is invalid: it must be an integer >= 1")
    if num_rows == 0:
        return []
    if rows_per_chunk is None and num_output_chunks is not None:
        k = min(num_output_chunks, num_rows)
        return [slice((i * num_rows) // k, ((i + 1) * num_rows) // k) for i in range(k)]
    step = rows_per_chunk if rows_per_chunk is not None else rows_per_chunk_for(vocab_size, memory_budget_bytes)
    return [slice(s, min(s + step, num_rows)) for s in range(0, num_rows, step)]


# ------------------------------------------------------------------------------------------------ the fused function
def _chunk_logits(h: Tensor, weight: Tensor) -> Tensor:
    """``h [n, D] @ weight.T`` in the parameters' dtype, upcast to fp32: ``[n, V]`` (as ``output_logits`` + upcast)."""
    return KF.upcast(h @ weight.t())


def _sum_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of the loss sums: float64 for float64 weights, else float32 (the logits' upcast dtype)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class _FusedLinearLoss(torch.autograd.Function):
    """Forward computes the loss sums and the gradients; backward scales the stored gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        chunk_loss: ChunkLoss,
        slices: list[slice],
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None  # [N, D]
        grad_weight: Tensor | None = None  # [V, D], allocated on the first chunk with a gradient
        loss = torch.zeros((), dtype=_sum_dtype(weight), device=hidden.device)
        ce_total, kd_total = loss.clone(), loss.clone()
        for rows in slices:
            h = hidden[rows]  # [n, D]
            logits = _chunk_logits(h, weight)  # [n, V] fp32, computed without a graph (forward runs under no_grad)
            with torch.enable_grad():
                logits.requires_grad_(True)  # a leaf: the chunk loss's graph starts here
                mixed, ce, kd = chunk_loss(logits, rows)
                g = None
                if mixed.requires_grad:
                    (g,) = torch.autograd.grad(mixed, logits, allow_unused=True)  # [n, V] fp32
            del logits
            loss += mixed.detach()
            ce_total += ce.detach()
            kd_total += kd.detach()
            if g is None:
                continue
            g = g.to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(g, weight, out=grad_hidden[rows])  # [n, D]
            if need_grad_weight:
                if grad_weight is None:
                    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
                grad_weight.addmm_(g.t(), h)  # [V, D]
            del g
        ctx.grads = (grad_hidden, grad_weight)
        ctx.mark_non_differentiable(ce_total, kd_total)
        return loss, ce_total, kd_total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *_: Tensor) -> tuple:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("fused_linear_loss: backward ran twice (its gradients are consumed by the first run)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # the stored gradients are scaled in place and handed over
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    chunk_loss: ChunkLoss,
    *,
    rows_per_chunk: int | None = None,
    num_output_chunks: int | None = None,
    memory_budget_bytes: int | None = None,
) -> tuple[Tensor, FusedLossParts]:
    """Output layer + loss over ``N`` rows, chunk by chunk, with the gradients computed in the forward pass.

    Args:
        hidden: ``[N, D]`` final (normed) hidden states of the trained positions, same dtype as ``weight``.
        weight: ``[V, D]`` output weight (own, tied embedding, or a LoRA effective weight); its gradient is computed
            only when it requires grad.
        chunk_loss: ``chunk_loss(logits_fp32 [n, V], rows: slice) -> (mixed_sum, ce_sum, kd_sum)``, scalars; called
            with gradients enabled on a leaf tensor of logits; only ``mixed_sum`` is differentiated.
        rows_per_chunk: explicit rows per chunk (overrides the rest).
        num_output_chunks: split into this many near-equal chunks (the old setting) when ``rows_per_chunk`` is None.
        memory_budget_bytes: otherwise chunks are sized by this budget (:func:`rows_per_chunk_for`).

    Returns:
        ``(loss_sum, parts)``: ``loss_sum`` is the differentiable fp32 sum of ``mixed_sum`` over chunks (its backward
        only scales stored gradients; it may run once); ``parts`` holds the detached CE and KD sums. Under
        ``torch.no_grad()`` (or when neither input requires grad) no gradient is computed at all. ``N = 0`` gives
        zero sums (and zero gradients).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N, D] and weight {tuple(weight.shape)} [V, D]")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} differs from the output weight's {weight.dtype}")
    n, vocab = hidden.shape[0], weight.shape[0]
    slices = chunk_slices(
        n,
        vocab,
        rows_per_chunk=rows_per_chunk,
        num_output_chunks=num_output_chunks,
        memory_budget_bytes=memory_budget_bytes,
    )
    need_h = hidden.requires_grad and torch.is_grad_enabled()
    need_w = weight.requires_grad and torch.is_grad_enabled()
    if need_h or need_w:
        loss, ce, kd = _FusedLinearLoss.apply(hidden.contiguous(), weight, chunk_loss, slices, need_h, need_w)
        return loss, FusedLossParts(ce, kd, n)
    # Evaluation / frozen inputs: plain chunked loop, no autograd at all.
    with torch.no_grad():
        loss = torch.zeros((), dtype=_sum_dtype(weight), device=hidden.device)
        ce_total, kd_total = loss.clone(), loss.clone()
        for rows in slices:
            mixed, ce, kd = chunk_loss(_chunk_logits(hidden[rows], weight), rows)
            loss += mixed
            ce_total += ce
            kd_total += kd
    return loss, FusedLossParts(ce_total, kd_total, n)


# ---------------------------------------------------------------------------------------------- default chunk losses
def _mix(ce_sum: Tensor, kd_sum: Tensor, kd_ratio: float) -> Tensor:
    """``(1 − kd_ratio) · ce_sum + kd_ratio · kd_sum``; a term with weight 0 is left out (no gradient path)."""
    if kd_ratio == 0.0:
        return ce_sum
    if kd_ratio == 1.0:
        return kd_sum
    return (1.0 - kd_ratio) * ce_sum + kd_ratio * kd_sum


def _check_kd_args(kd_ratio: float, temperature: float) -> None:
    KF.check_temperature(temperature)
    if not (isinstance(kd_ratio, (int, float)) and 0.0 <= kd_ratio <= 1.0):
        raise ConfigError(f"kd_ratio={kd_ratio!r} is invalid: it must lie in [0, 1] (e.g. kd_ratio=0.5)")


def _ce_and_kd_logp(logits: Tensor, temperature: float, vocab: int, grad_ce: bool, grad_kd: bool) -> tuple:
    """Student log-probs for CE (``[n, V]``) and, tempered, for the divergence (``[n, vocab]``); one log-softmax when
    ``T == 1`` and the supports agree. A part whose gradient is not needed is computed from detached logits."""
    if temperature == 1.0 and vocab == logits.shape[-1]:
        logp = torch.log_softmax(logits if (grad_ce or grad_kd) else logits.detach(), dim=-1)
        return (logp if grad_ce else logp.detach()), (logp if grad_kd else logp.detach())
    ce_logp = torch.log_softmax(logits if grad_ce else logits.detach(), dim=-1)
    s = (logits if grad_kd else logits.detach())[:, :vocab]
    kd_logp = torch.log_softmax(s / temperature if temperature != 1.0 else s, dim=-1)
    return ce_logp, kd_logp


def _ce_sum(logp: Tensor, targets: Tensor) -> Tensor:
    """``−Σ logp[i, targets[i]]`` (fp32 scalar)."""
    return -logp.gather(1, targets[:, None]).sum()


def dense_kd_chunk_loss(
    targets: Tensor,
    *,
    kd_ratio: float = 0.5,
    temperature: float = 1.0,
    divergence: Divergence | None = None,
    teacher_logits: Callable[[slice], Tensor] | None = None,
    scale_by_temperature_squared: bool = True,
) -> ChunkLoss:
    """Chunk loss for cross-entropy + a divergence against a live teacher's dense distribution.

    Args:
        targets: ``[N]`` int64 next-token ids of the trained rows (all valid).
        kd_ratio: mixing weight in [0, 1]; at 0 the KD sum is computed for logging without gradient.
        temperature: T; the student's and the teacher's logits are divided by T once, here.
        divergence: ``per_token(s_logp, t_logp) -> [n]`` on tempered log-probs (e.g. :func:`logprob_divergence`);
            None for fine-tuning (CE only).
        teacher_logits: ``rows -> [n, V_t]`` teacher logits for those rows (run the teacher's output layer there,
            under ``no_grad``); a padded teacher vocabulary is sliced to the student's (both to ``min(V_s, V_t)``).
        scale_by_temperature_squared: multiply the KD sum by T².

    Returns:
        A :data:`ChunkLoss` for :func:`fused_linear_loss`.
    """
    _check_kd_args(kd_ratio, temperature)
    use_kd = divergence is not None and teacher_logits is not None
    if (divergence is None) != (teacher_logits is None):
        raise ValueError("dense_kd_chunk_loss needs both divergence and teacher_logits, or neither (CE only)")
    scale = temperature**2 if scale_by_temperature_squared else 1.0
    grad_ce, grad_kd = kd_ratio != 1.0, kd_ratio != 0.0

    def chunk_loss(logits: Tensor, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
        y = targets[rows]  # [n]
        if not use_kd:
            ce = _ce_sum(torch.log_softmax(logits, dim=-1), y)
            return ce, ce, torch.zeros_like(ce)
        with torch.no_grad():
            t = KF.upcast(teacher_logits(rows))  # [n, V_t] fp32
        vocab = min(logits.shape[-1], t.shape[-1])
        t = t[:, :vocab]
        with torch.no_grad():
            t_logp = torch.log_softmax(t / temperature if temperature != 1.0 else t, dim=-1)  # [n, vocab]
        del t
        ce_logp, s_logp = _ce_and_kd_logp(logits, temperature, vocab, grad_ce, grad_kd)
        ce = _ce_sum(ce_logp, y)
        kd = divergence(s_logp, t_logp).sum() * scale
        return _mix(ce, kd, kd_ratio), ce, kd

    return chunk_loss


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, stable on both ends (Mächler 2012), with finite gradients everywhere.

    Each branch sees only inputs in its own range (so the branch ``where`` does not pick cannot put 0 · inf = NaN into
    the gradient), and ``x`` is kept below ``-1e-30`` (at ``x = 0`` the value would be ``-inf``).
    """
    cut = -math.log(2.0)
    near = x > cut
    x_near = torch.where(near, x, torch.full_like(x, cut)).clamp(max=-1e-30)
    x_far = torch.where(near, torch.full_like(x, cut), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def sparse_kd_chunk_loss(
    targets: Tensor,
    teacher_ids: Tensor,
    teacher_logp: Tensor,
    *,
    kd_ratio: float = 0.5,
    temperature: float = 1.0,
    divergence: Divergence,
    tail: bool = True,
    scale_by_temperature_squared: bool = True,
    min_tail_logp: float = -60.0,
) -> ChunkLoss:
    """Chunk loss for cross-entropy + a divergence against a cached teacher's top-k distribution.

    The support is the ``k`` cached ids plus, with ``tail=True``, one bucket holding the remaining mass
    ``log(1 − Σ p)`` of each model (floored at ``min_tail_logp`` so a tail of exactly 0 stays finite); with
    ``tail=False`` both distributions are renormalised over the ``k`` ids.

    Args:
        targets: ``[N]`` int64 next-token ids.
        teacher_ids: ``[N, k]`` int64 vocabulary ids of the cached entries.
        teacher_logp: ``[N, k]`` teacher log-probs at temperature ``temperature`` (``logits / T − logZ_T``).
        kd_ratio, temperature, divergence, scale_by_temperature_squared: see :func:`dense_kd_chunk_loss`.
        tail: tail bucket (True) or renormalised top-k (False).
        min_tail_logp: floor of the tail buckets' log-mass.

    Returns:
        A :data:`ChunkLoss` for :func:`fused_linear_loss`.
    """
    _check_kd_args(kd_ratio, temperature)
    if teacher_ids.shape != teacher_logp.shape or teacher_ids.dim() != 2 or teacher_ids.shape[0] != targets.shape[0]:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logp {tuple(teacher_logp.shape)} must both be "
            f"[N, k] with N = {targets.shape[0]}"
        )
    scale = temperature**2 if scale_by_temperature_squared else 1.0
    grad_ce, grad_kd = kd_ratio != 1.0, kd_ratio != 0.0

    def support(logp_k: Tensor) -> Tensor:
        lse = torch.logsumexp(logp_k, dim=-1, keepdim=True)  # [n, 1]
        if not tail:
            return logp_k - lse
        rest = _log1mexp(lse.clamp(max=0.0)).clamp(min=min_tail_logp)  # [n, 1]
        return torch.cat([logp_k, rest], dim=-1)  # [n, k + 1]

    def chunk_loss(logits: Tensor, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
        ids = teacher_ids[rows]  # [n, k]
        ce_logp, s_logp = _ce_and_kd_logp(logits, temperature, logits.shape[-1], grad_ce, grad_kd)
        ce = _ce_sum(ce_logp, targets[rows])
        with torch.no_grad():
            t_sup = support(KF.upcast(teacher_logp[rows]))
        kd = divergence(support(s_logp.gather(1, ids)), t_sup).sum() * scale
        return _mix(ce, kd, kd_ratio), ce, kd

    return chunk_loss


class _CEForwardKL(torch.autograd.Function):
    """CE + forward-KL sums of one chunk with d mixed / d logits written out (few passes over ``[n, V]``, in place).

    ``d mixed / d s = (1 − r) (softmax(s) − onehot(y)) + r · c · (softmax(s / T) − p_t)`` on the KD support, with
    ``c = T² / T`` (or ``1 / T`` without the T² factor).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        t_logits: Tensor | None,
        targets: Tensor,
        kd_ratio: float,
        temperature: float,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, v = logits.shape
        rows = torch.arange(n, device=logits.device)
        s_logp = torch.log_softmax(logits, dim=-1)  # [n, V]
        ce = -s_logp[rows, targets].sum()
        kd = torch.zeros_like(ce)
        vocab, shared, s_kd, p_t = v, True, s_logp, None
        if t_logits is not None:
            vocab = min(v, t_logits.shape[-1])
            t = t_logits[:, :vocab]
            t_logp = torch.log_softmax(t / temperature if temperature != 1.0 else t, dim=-1)  # [n, vocab]
            shared = temperature == 1.0 and vocab == v
            if not shared:
                s = logits[:, :vocab]
                s_kd = torch.log_softmax(s / temperature if temperature != 1.0 else s, dim=-1)  # [n, vocab]
            p_t = t_logp.exp()  # [n, vocab]
            per_token = t_logp.sub_(s_kd).mul_(p_t).sum(-1)  # [n]; the buffer of t_logp is reused
            if torch.isnan(per_token).any():  # 0 · (−inf) where the teacher gives a token probability 0
                t_logp = torch.log_softmax(t / temperature if temperature != 1.0 else t, dim=-1)
                per_token = KF._kl(t_logp, s_kd)
            del t_logp
            kd = per_token.sum() * scale
        mixed = _mix(ce, kd, kd_ratio).clone()  # a tensor of its own: ce and kd are marked non-differentiable
        ctx.grad = None
        if ctx.needs_input_grad[0]:
            w_ce = 1.0 - kd_ratio
            c = kd_ratio * scale / temperature if p_t is not None else 0.0
            g = s_logp.exp_()  # [n, V] softmax(s), in the buffer of s_logp
            if shared:
                g.mul_(w_ce + c)
            else:
                g.mul_(w_ce)
                if c:
                    g[:, :vocab].add_(s_kd.exp_(), alpha=c)
            if c:
                g[:, :vocab].sub_(p_t, alpha=c)
            if w_ce:
                g[rows, targets] -= w_ce
            ctx.grad = g
        ctx.mark_non_differentiable(ce, kd)
        return mixed, ce, kd

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_mixed: Tensor, *_: Tensor) -> tuple:  # type: ignore[override]
        g, ctx.grad = ctx.grad, None
        if g is None:
            raise RuntimeError("forward_kl_chunk_loss: backward ran twice")
        return g.mul_(grad_mixed), None, None, None, None, None


def forward_kl_chunk_loss(
    targets: Tensor,
    *,
    kd_ratio: float = 0.5,
    temperature: float = 1.0,
    teacher_logits: Callable[[slice], Tensor] | None = None,
    scale_by_temperature_squared: bool = True,
) -> ChunkLoss:
    """Chunk loss for cross-entropy + forward KL (or CE only without a teacher) with an analytic gradient.

    Same values and gradients as :func:`dense_kd_chunk_loss` with the forward KL divergence, in about a third of the
    elementwise passes over ``[n, V]`` (the gradient is written in place into the student's softmax buffer).

    Args:
        targets, kd_ratio, temperature, teacher_logits, scale_by_temperature_squared: see :func:`dense_kd_chunk_loss`.

    Returns:
        A :data:`ChunkLoss` for :func:`fused_linear_loss`.
    """
    _check_kd_args(kd_ratio, temperature)
    scale = temperature**2 if scale_by_temperature_squared else 1.0
    ratio = kd_ratio if teacher_logits is not None else 0.0

    def chunk_loss(logits: Tensor, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
        t = None
        if teacher_logits is not None:
            with torch.no_grad():
                t = KF.upcast(teacher_logits(rows))  # [n, V_t] fp32
        return _CEForwardKL.apply(logits, t, targets[rows], ratio, temperature, scale)

    return chunk_loss


def kd_chunk_loss(
    targets: Tensor,
    kd_loss: KD.KDLoss | None,
    teacher_logits: Callable[[slice], Tensor] | None,
    kd_ratio: float,
) -> ChunkLoss:
    """The chunk loss for a :class:`~kdtune.losses.KDLoss` and a live teacher (None, None: fine-tuning, CE only).

    Forward KL and CE only take the analytic :func:`forward_kl_chunk_loss`; every other divergence goes through
    :func:`dense_kd_chunk_loss` with :func:`logprob_divergence`. Temperature and T² come from ``kd_loss``.
    """
    if kd_loss is None or teacher_logits is None:
        return forward_kl_chunk_loss(targets, kd_ratio=0.0)
    common = {
        "kd_ratio": kd_ratio,
        "temperature": kd_loss.temperature,
        "teacher_logits": teacher_logits,
        "scale_by_temperature_squared": kd_loss.scale_by_temperature_squared,
    }
    if isinstance(kd_loss, KD.ForwardKLLoss):
        return forward_kl_chunk_loss(targets, **common)
    return dense_kd_chunk_loss(targets, divergence=logprob_divergence(kd_loss), **common)


def logprob_divergence(kd_loss: KD.KDLoss) -> Divergence:
    """The divergence of a :class:`~kdtune.losses.KDLoss` as ``per_token(s_logp, t_logp) -> [n]`` on log-probs.

    Same formulas (``kdtune.losses.functional``) without the softmaxes and the temperature, which the chunk loss
    applies once. Raises ``TypeError`` for a loss class it does not know (use the unfused objective for it).
    """
    kl, mix = KF._kl, KF._log_mixture
    if isinstance(kd_loss, KD.ForwardKLLoss):
        return lambda s, t: kl(t, s)
    if isinstance(kd_loss, KD.ReverseKLLoss):
        return lambda s, t: kl(s, t)
    if isinstance(kd_loss, KD.SymmetricKLLoss):
        return lambda s, t: kl(t, s) + kl(s, t)
    if isinstance(kd_loss, KD.JSDLoss):
        beta, normalize = kd_loss.beta, kd_loss.normalize
        if beta == 0.0:
            return lambda s, t: kl(t, s)
        if beta == 1.0:
            return lambda s, t: kl(s, t)

        def jsd(s: Tensor, t: Tensor) -> Tensor:
            m = mix(t, s, beta)
            out = beta * kl(t, m) + (1.0 - beta) * kl(s, m)
            return out / (beta * (1.0 - beta)) if normalize else out

        return jsd
    if isinstance(kd_loss, KD.SkewForwardKLLoss):
        a = kd_loss.alpha
        return lambda s, t: kl(t, s if a == 0.0 else mix(t, s, a))
    if isinstance(kd_loss, KD.SkewReverseKLLoss):
        a = kd_loss.alpha
        return lambda s, t: kl(s, t if a == 0.0 else mix(s, t, a))
    if isinstance(kd_loss, KD.TVDLoss):
        return lambda s, t: 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    raise TypeError(f"{type(kd_loss).__name__} has no log-prob form for the fused loss; use the unfused objective")


# ---------------------------------------------------------------------------------------- the objective, fused
class FusedObjectiveOutput(NamedTuple):
    """Per-micro-batch sums, as the objective contract's ``ObjectiveOutput``.

    Attributes:
        loss_sum: fp32 scalar ``(1 − kd_ratio) · ce_sum + kd_ratio · kd_sum``, differentiable.
        class_loss_sum: detached cross-entropy sum.
        kd_loss_sum: detached KD sum (× T² if the loss scales); 0 without a teacher.
        num_tokens: int64 scalar, number of trained positions.
    """

    loss_sum: Tensor
    class_loss_sum: Tensor
    kd_loss_sum: Tensor
    num_tokens: Tensor


def fused_distillation_objective(
    student_hidden: Tensor,
    teacher_hidden: Tensor | None,
    student: nn.Module,
    teacher: nn.Module | None,
    labels: Tensor,
    kd_loss: KD.KDLoss | None,
    kd_ratio: float = 0.5,
    *,
    ignore_index: int = -100,
    rows_per_chunk: int | None = None,
    num_output_chunks: int | None = None,
    memory_budget_bytes: int | None = None,
) -> FusedObjectiveOutput:
    """``distillation_objective`` through the fused path: same inputs, same sums, no recompute in backward.

    Trained positions are ``labels[:, 1:] != ignore_index`` in row-major order; the student's output weight comes from
    :func:`fused_output_weight` (when there is none, this falls back to
    :func:`~kdtune.losses.distillation_objective`); the teacher's logits are ``teacher.output_logits`` of the chunk's
    rows, computed once under ``no_grad`` (``teacher_hidden`` may be an inference tensor, see
    :func:`kdtune.perf.teacher_forward`). The chunk loss is :func:`kd_chunk_loss`.

    Args:
        student_hidden: ``[B, T, D]`` final hidden states of the student.
        teacher_hidden: ``[B, T, Dt]`` of the teacher, or None (fine-tuning: CE only).
        student, teacher: modules with ``output_logits``.
        labels: ``[B, T]`` aligned with the tokens (shifted here).
        kd_loss: its divergence, temperature and T² switch are used; None without a teacher.
        kd_ratio: mixing weight; at 0 the KD sum is still computed for logging (without gradient).
        ignore_index: label value of untrained positions.
        rows_per_chunk, num_output_chunks, memory_budget_bytes: chunking, see :func:`chunk_slices`.

    Returns:
        :class:`FusedObjectiveOutput`.
    """
    from kdtune.losses.objective import distillation_objective  # noqa: PLC0415  (the fallback only)

    use_teacher = teacher_hidden is not None and teacher is not None and kd_loss is not None
    targets = labels[:, 1:]  # [B, T-1]
    mask = targets != ignore_index  # [B, T-1]
    num_tokens = mask.sum()
    weight = fused_output_weight(student)
    if weight is None:
        out = distillation_objective(
            student_hidden,
            teacher_hidden if use_teacher else None,
            student,
            teacher if use_teacher else None,
            labels,
            kd_loss if use_teacher else None,
            kd_ratio if use_teacher else 0.0,
            num_output_chunks or 8,
            ignore_index=ignore_index,
        )
        mixed = out.mixed_sum(kd_ratio if use_teacher else 0.0)
        return FusedObjectiveOutput(mixed, out.class_loss_sum.detach(), out.kd_loss_sum.detach(), num_tokens)
    h = student_hidden[:, :-1][mask]  # [N, D]
    y = targets[mask]  # [N]
    teacher_logits = None
    if use_teacher:
        h_t = teacher_hidden[:, :-1][mask]  # [N, Dt]

        def teacher_logits(rows: slice) -> Tensor:
            return teacher.output_logits(h_t[rows])  # [n, V_t]

    chunk_loss = kd_chunk_loss(y, kd_loss if use_teacher else None, teacher_logits, kd_ratio if use_teacher else 0.0)
    loss, parts = fused_linear_loss(
        h,
        weight,
        chunk_loss,
        rows_per_chunk=rows_per_chunk,
        num_output_chunks=num_output_chunks,
        memory_budget_bytes=memory_budget_bytes,
    )
    return FusedObjectiveOutput(loss, parts.ce_sum, parts.kd_sum, num_tokens)


# ------------------------------------------------------------------------------------------------ the output weight
def fused_output_weight(model: nn.Module) -> Tensor | None:
    """The ``[V, D]`` weight whose ``h @ W.T`` equals ``model.output_logits(h)``, or None when there is none.

    * tied embeddings (``model.output is None``): ``model.tok_embeddings.weight`` (its gradient from the fused path
      adds to the embedding lookup's through autograd);
    * ``nn.Linear`` without bias: its weight;
    * a LoRA output projection (``LoRALinear``): the effective weight ``W + scale · B @ A``, a differentiable
      ``[V, D]`` tensor built from the adapter (disabled adapters: ``W``);
    * None for an NF4 base, dropout on the adapter while training, a bias, or a sharded (FSDP ``DTensor``) weight,
      which the fused path does not gather — then use the unfused objective.
    """
    output = getattr(model, "output", None)
    if output is None:
        emb = getattr(model, "tok_embeddings", None)
        weight = emb.weight if emb is not None else None
    elif getattr(output, "bias", None) is not None:
        weight = None
    elif hasattr(output, "lora_a") and hasattr(output, "lora_b"):
        weight = _lora_effective_weight(output)
    elif isinstance(output, nn.Linear):
        weight = output.weight
    else:
        weight = None
    if weight is not None and hasattr(weight, "device_mesh"):
        return None
    return weight


def _lora_effective_weight(output: nn.Module) -> Tensor | None:
    """``W + scale · B @ A`` of a ``LoRALinear`` (differentiable in A and B), or None when it has no such weight."""
    if getattr(output, "quantize_base", False) or (output.training and output.dropout_p > 0):
        return None
    if output.disabled:
        return output.weight
    if hasattr(output.weight, "device_mesh"):
        return None
    delta = output.lora_b.weight @ output.lora_a.weight  # [V, r] @ [r, D]
    return output.weight + output.scaling * delta
