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

The chunk loss is the objective's (:class:`kdtune.losses.DistillationObjective` builds it: cross-entropy, the
teacher source's support, the divergence, the mix); :func:`ce_forward_kl` is its hand-written fast path for
cross-entropy + forward KL against a live teacher, with one ``exp`` pass per softmax at ``T == 1``.

What the caller passes as ``weight`` (see :func:`fused_output_weight`): the output projection's weight, or the
token-embedding weight for tied embeddings (autograd then adds the fused path's gradient to the embedding lookup's);
for a LoRA output projection the effective weight ``W + scale · B @ A`` (differentiable, so the adapter gets its
gradient through autograd; costs one ``[V, D]`` tensor), or the caller falls back to the unfused objective when there
is no single effective weight (NF4 base, dropout on the adapter in training, a bias).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.losses import functional as KF
from kdtune.perf import compile_options

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "ChunkLoss",
    "FusedLossParts",
    "chunk_slices",
    "ce_forward_kl",
    "ce_forward_kl_terms",
    "fused_linear_loss",
    "fused_output_weight",
    "rows_per_block",
    "rows_per_chunk_for",
    "stored_gradient_outputs",
    "take_stored_gradient",
]

#: ``chunk_loss(logits_fp32 [n, V], rows) -> (mixed_sum, ce_sum, kd_sum)``; ``rows`` indexes the ``N`` hidden rows;
#: the logits are the chunk loss's to overwrite.
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

    ``clamp(budget // (vocab_size * 4 * tensors_per_row), 64, 4096)`` rounded down to a multiple of 64: at least 64
    rows so the output-layer GEMMs stay efficient, at most 4096 because more rows gain no GEMM speed, whole tiles of
    64 / 128 rows because a GPU GEMM of 130 rows (V = 128k at the default budget) computes 192 or 256.

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
    rows -= rows % MIN_ROWS_PER_CHUNK
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


def rows_per_block(num_rows: int, vocab_size: int, device: torch.device, block_elements: int) -> int:
    """Rows per block of a chunk loss's row loop (:func:`ce_forward_kl`, the sparse KD loss).

    On a CPU, ``block_elements // vocab_size`` rows (at least 1), so the block-sized intermediates stay in the core's
    cache between the loop's passes. On an accelerator the whole chunk: there each pass is a kernel launch and there
    is no per-core cache to fit, so row blocks would only multiply the launches (at V = 128k one row per block, ~15
    launches per position); one block runs each pass once per chunk, over tensors the chunk budget already counts.

    Args:
        num_rows: rows of the chunk (``n``).
        vocab_size: ``V`` of the chunk's logits.
        device: where the logits live.
        block_elements: the CPU block's size in logits.

    Returns:
        A row count in ``[1, max(num_rows, 1)]``.
    """
    if device.type != "cpu":
        return max(1, num_rows)
    return max(1, min(num_rows, block_elements // max(vocab_size, 1)))


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
            with gradients enabled on a leaf tensor of logits; only ``mixed_sum`` is differentiated. The logits are
            not read after the call, so the chunk loss may use their storage (e.g. for their gradient).
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


# ------------------------------------------------------------------- chunk losses with a gradient written in forward
def stored_gradient_outputs(
    ctx: torch.autograd.function.FunctionCtx,
    grad: Tensor | None,
    ce: Tensor,
    kd: Tensor,
    mix: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``(mixed, ce, kd)`` outputs of a chunk loss whose forward already computed ``d mixed / d logits``.

    Stores ``grad`` on ``ctx`` for :func:`take_stored_gradient`; ``ce`` and ``kd`` are logged sums, not differentiated.
    """
    mixed = mix(ce, kd).clone()  # a tensor of its own: ce and kd are marked non-differentiable
    ctx.grad = grad
    ctx.mark_non_differentiable(ce, kd)
    return mixed, ce, kd


def take_stored_gradient(ctx: torch.autograd.function.FunctionCtx, grad_mixed: Tensor, name: str) -> Tensor:
    """The gradient stored by :func:`stored_gradient_outputs`, scaled in place by ``grad_mixed`` (once only)."""
    g, ctx.grad = ctx.grad, None
    if g is None:
        raise RuntimeError(f"{name}: backward ran twice")
    if not (grad_mixed.device.type == "cpu" and grad_mixed.item() == 1.0):  # × 1 (inside fused_linear_loss): exact
        g.mul_(grad_mixed)
    return g


# ---------------------------------------------------------------------------------------------- default chunk losses


def ce_forward_kl(
    logits: Tensor,
    teacher_logits: Tensor | None,
    targets: Tensor,
    *,
    kd_ratio: float,
    temperature: float,
    scale: float,
    mix: Callable[[Tensor, Tensor], Tensor],
    overwrite_logits: bool = False,
    compiled: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mixed, ce_sum, kd_sum)`` of one chunk for cross-entropy + forward KL with the gradient written out by hand.

    The same values and gradients as computing CE and ``KL(p_t‖p_s)`` with autograd, with one ``exp`` pass over the
    student's and one over the teacher's logits at ``T = 1`` on a shared vocabulary (three and two at ``T ≠ 1`` or
    with a smaller teacher vocabulary) and no elementwise logarithm. Only valid for the linear mix ``(1 − r) · ce + r · kd`` (``mix``
    computes the value; the gradient assumes that rule), which is why the objective takes this path only for its own
    mixing rule.

    On a CPU the rows are processed in blocks of a few rows (:data:`BLOCK_ELEMENTS` logits per block) so that every
    intermediate is block-sized and stays in the core's cache; only the gradient ``[n, V]`` is written to memory. On
    an accelerator the chunk is one block (:func:`rows_per_block`).

    Args:
        logits: ``[n, V]`` fp32 student logits (a leaf with ``requires_grad`` for training).
        teacher_logits: ``[n, V_t]`` fp32 teacher logits (no grad), or None (cross-entropy only).
        targets: ``[n]`` next-token ids.
        kd_ratio: r; temperature: T; scale: T² or 1; mix: the objective's mixing rule.
        overwrite_logits: write the gradient into the storage of ``logits`` (which the caller no longer reads)
            instead of a new ``[n, V]`` tensor, as :func:`fused_linear_loss`'s chunk losses may.
        compiled: when the gradient is needed, compute the chunk with :func:`ce_forward_kl_terms` through
            ``torch.compile`` (``compile: true``): one fused kernel per pass instead of the block loop's many small
            ops; the same formulas, rounded differently (agreement to fp32 precision is tested). The gradient is then
            a new tensor (one more ``[n, V]`` while the chunk's logits are alive).
    """
    return _CEForwardKL.apply(
        logits, teacher_logits, targets, kd_ratio, temperature, scale, mix, overwrite_logits, compiled
    )


#: logits per row block of :func:`ce_forward_kl` on a CPU (fp32: 256 KiB per block-sized buffer, a few of them in
#: L2). Measured (1 thread, real chunk shapes): at V = 4096 16 rows beat 8 and 32 by 5-10 %, at V = 32000 2 rows beat
#: 1 and 4.
BLOCK_ELEMENTS = 2**16


class _CEForwardKL(torch.autograd.Function):
    """CE + forward-KL sums of one chunk with d mixed / d logits written out (few passes over ``[n, V]``, in place).

    ``d mixed / d s = (1 − r) (softmax(s) − onehot(y)) + r · c · (softmax(s / T) − p_t)`` on the KD support, with
    ``c = T² / T`` (or ``1 / T`` without the T² factor).

    Per block of rows, with each row shifted by its own max (``a = s − max s``, ``w = t − max t``): one ``exp`` pass
    per softmax and the row sums ``z_a``, ``z_w``. Then ``log Σ exp(s) = max s + log z_a`` >= the max, so the
    cross-entropy ``log Σ exp(s) − s_y`` stays finite and exact where ``p_s(y)`` underflows. At ``T = 1`` on the
    whole vocabulary ``KL = Σ p_t (w − a) + log(z_a / z_w)`` with ``p_t = exp(w) / z_w`` (``w − a`` taken before the
    ``exp``) and the gradient is ``exp(a)`` scaled in place by ``1 / z_a`` minus ``c · p_t``. Otherwise (``T ≠ 1`` or
    a smaller teacher vocabulary) the KD terms come from ``log_softmax`` of ``t / T`` and ``s_K / T`` on the support
    ``K``, as in the unfused objective (the same rounding: the two paths agree to well below fp32's error on small
    KL values), with one ``exp`` each for ``p_t`` and ``softmax(s_K / T)``. Terms where ``p_t = 0`` count 0, as in
    :func:`kdtune.losses.functional.kl`: ``nansum`` leaves out the ``0 · (−inf)`` of a teacher logit −inf.
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
        mix: Callable[[Tensor, Tensor], Tensor],
        overwrite_logits: bool,
        compiled: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, v = logits.shape
        teacher = t_logits is not None
        vocab = v if t_logits is None else min(v, t_logits.shape[-1])
        T = float(temperature)
        shared = T == 1.0 and vocab == v  # the KD softmax of the student is its CE softmax
        w_ce = 1.0 - kd_ratio
        c = kd_ratio * scale / T if teacher else 0.0
        need_grad = ctx.needs_input_grad[0]
        if compiled and need_grad:
            terms = _compiled_terms(logits.device)
            ce, kd, grad = terms(logits, t_logits[:, :vocab] if teacher else None, targets, w_ce, c, T)
            return stored_gradient_outputs(ctx, grad, ce, kd * scale if teacher else kd, mix)
        g = (logits if overwrite_logits else torch.empty_like(logits)) if need_grad else None  # [n, V]
        block = rows_per_block(n, v, logits.device, BLOCK_ELEMENTS)
        s_y = logits.gather(-1, targets[:, None])  # [n, 1] logit of the target (before any overwrite)
        m = logits.new_empty(n, 1)  # [n, 1] max s
        z = logits.new_empty(n, 1)  # [n, 1] Σ exp(s − max s)
        z_t, dot = logits.new_empty(n, 1), logits.new_empty(n, 1)  # [n, 1] Σ exp(w); Σ exp(w) (w − a) or KL
        # block buffers: a then exp(a) when there is no gradient to write; w or log p_t (then exp), w − a or
        # log p_t − log q_s (then × exp(w) or p_t); log q_s (then q_s)
        e_buf = logits.new_empty(block, v) if g is None and not overwrite_logits else None
        p_buf = d_buf = u_buf = None
        if teacher:
            p_buf, d_buf = logits.new_empty(block, vocab), logits.new_empty(block, vocab)
            u_buf = None if shared else logits.new_empty(block, vocab)
        t_blocks = t_logits[:, :vocab].split(block) if teacher else itertools.repeat(None)
        e_blocks = g.split(block) if g is not None else logits.split(block) if e_buf is None else None
        for bi, (s, t, m_b, z_b, zt_b, dot_b) in enumerate(
            zip(logits.split(block), t_blocks, m.split(block), z.split(block), z_t.split(block), dot.split(block))
        ):  # [b, V], [b, vocab], [b, 1] ...
            b = s.shape[0]
            e = e_blocks[bi] if e_blocks is not None else e_buf[:b]  # [b, V] a, then exp(a)
            torch.amax(s, -1, keepdim=True, out=m_b)
            if teacher:
                p, d = (p_buf, d_buf) if b == block else (p_buf[:b], d_buf[:b])  # [b, vocab]
                if shared:
                    torch.sub(t, torch.amax(t, -1, keepdim=True), out=p)  # w
                    u = torch.sub(s, m_b, out=e)  # u = a
                else:  # log-softmax over the support, as the unfused objective (the same rounding); before a
                    _log_softmax(t, T, out=p)  # log p_t
                    u = _log_softmax(s[:, :vocab], T, out=u_buf if b == block else u_buf[:b])  # log q_s
                    torch.sub(s, m_b, out=e)
                torch.sub(p, u, out=d)  # w − a or log p_t − log q_s
                p.exp_()
                if shared:
                    torch.sum(p, -1, keepdim=True, out=zt_b)
                torch.nansum(d.mul_(p), -1, keepdim=True, out=dot_b)  # 0 · (−inf) where p_t = 0: NaN, left out
            else:
                torch.sub(s, m_b, out=e)
            torch.sum(e.exp_(), -1, keepdim=True, out=z_b)
            if g is None:
                continue
            k = w_ce + c if shared else w_ce  # the weight of softmax(s) in the gradient
            inv_z = z_b.reciprocal()  # [b, 1]
            e.mul_(inv_z if k == 1.0 else inv_z.mul_(k))
            if c and shared:
                e.addcmul_(p, zt_b.reciprocal(), value=-c)
            elif c:
                (e if vocab == v else e[:, :vocab]).add_(u.exp_().sub_(p), alpha=c)
        if g is not None and w_ce:
            g.scatter_add_(-1, targets[:, None], logits.new_full((n, 1), -w_ce))  # − (1 − r) onehot(y)
        ce = torch.sub(m, s_y).add_(torch.log(z)).sum()  # Σ log Σ exp(s) − s_y = Σ −log p_s(y)
        if teacher and shared:  # one log of z / z_t (near 1 for similar distributions), not a difference of two logs
            kd = dot.div_(z_t).add_(torch.div(z, z_t).log_()).sum() * scale  # Σ KL(p_t‖q_s) × scale
        elif teacher:
            kd = dot.sum() * scale
        else:
            kd = torch.zeros_like(ce)
        return stored_gradient_outputs(ctx, g, ce, kd, mix)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_mixed: Tensor, *_: Tensor) -> tuple:  # type: ignore[override]
        return (take_stored_gradient(ctx, grad_mixed, "ce_forward_kl"),) + (None,) * 8


def ce_forward_kl_terms(
    logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, w_ce: float, c: float, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(ce_sum, kl_sum, d mixed / d logits)`` of one chunk in plain tensor ops: what ``compile: true`` compiles.

    The formulas of :class:`_CEForwardKL` written whole-tensor, for inductor to fuse into a few passes per row (its
    CPU code keeps each row's intermediates in cache; on a GPU each pass is one kernel).

    Args:
        logits: ``[n, V]`` student logits.
        teacher_logits: ``[n, K]`` teacher logits on the KD support (``K <= V``, the first K ids), or None (CE only).
        targets: ``[n]`` next-token ids.
        w_ce: ``1 − r``, the weight of the cross-entropy.
        c: ``r · scale / T``, the weight of ``softmax(s_K / T) − p_t`` in the gradient (0 without a teacher).
        temperature: T.

    Returns:
        The CE sum, the unscaled forward-KL sum (0 without a teacher) and the ``[n, V]`` gradient.
    """
    vocab = logits.shape[-1]
    m = logits.amax(-1, keepdim=True)  # [n, 1]
    a = logits - m
    e = a.exp()  # [n, V] exp(s − max s)
    z = e.sum(-1, keepdim=True)  # [n, 1]
    ce = (m + z.log() - logits.gather(-1, targets[:, None])).sum()
    target = torch.arange(vocab, device=logits.device) == targets[:, None]  # [n, V] onehot(y)
    if teacher_logits is None:
        grad = e * (w_ce / z)
        return ce, torch.zeros_like(ce), torch.where(target, grad - w_ce, grad)
    if temperature == 1.0 and teacher_logits.shape[-1] == vocab:  # one softmax of the student serves CE and KD
        w = teacher_logits - teacher_logits.amax(-1, keepdim=True)  # [n, V]
        e_t = w.exp()
        z_t = e_t.sum(-1, keepdim=True)
        dot = torch.where(e_t > 0, e_t * (w - a), 0.0).sum(-1, keepdim=True)  # a p_t = 0 term counts 0
        kd = (dot / z_t + (z / z_t).log()).sum()
        grad = e * ((w_ce + c) / z) - e_t * (c / z_t)
    else:  # KD over the support at T, as the unfused objective
        k = teacher_logits.shape[-1]
        log_p = torch.log_softmax(teacher_logits / temperature, -1)  # [n, K]
        log_q = torch.log_softmax(logits[:, :k] / temperature, -1)
        p = log_p.exp()
        kd = torch.where(p > 0, p * (log_p - log_q), 0.0).sum()
        grad = e * (w_ce / z) + F.pad(c * (log_q.exp() - p), (0, vocab - k))
    return ce, kd, torch.where(target, grad - w_ce, grad)


_COMPILED_TERMS: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {}


def _compiled_terms(device: torch.device) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """:func:`ce_forward_kl_terms` through ``torch.compile`` for ``device``'s type (built once; C++ wrapper on a CPU)."""
    if device.type not in _COMPILED_TERMS:
        _COMPILED_TERMS[device.type] = torch.compile(ce_forward_kl_terms, options=compile_options(device))
    return _COMPILED_TERMS[device.type]


def _log_softmax(x: Tensor, temperature: float, *, out: Tensor) -> Tensor:
    """``log_softmax(x / T)`` into ``out`` (``x [b, K]``), the same values as :func:`kdtune.losses.functional.log_probs`."""
    if temperature != 1.0:
        x = torch.div(x, temperature, out=out)
    return torch.ops.aten._log_softmax.out(x, -1, False, out=out)


# ---------------------------------------------------------------------------------------- the objective, fused


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
