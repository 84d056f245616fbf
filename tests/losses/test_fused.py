"""kdtune.losses.fused: fused_linear_loss (gradients computed in forward, chunk by chunk) vs plain autograd on full
logits, the hand-written CE + forward-KL chunk loss, chunk sizing, the output weight, and the fused objective."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import kdtune.losses as L
import kdtune.losses.objective as OBJ
from kdtune.errors import ConfigError
from kdtune.losses import functional as KF
from kdtune.losses import fused as FU
from kdtune.losses.sparse import sparse_support
from kdtune.models.llama import llama
from kdtune.models.modules.lora import apply_lora

D, DT, V = 16, 24, 50

# name -> per-token divergence on tempered log-probabilities (kdtune.losses.functional), None = cross-entropy only
DIVERGENCES = {
    "ce_only": None,
    "forward_kl": KF.forward_kl,
    "reverse_kl": KF.reverse_kl,
    "jsd_0.3": partial(KF.generalized_jsd, beta=0.3),
    "jsd_0.5_unnormalized": partial(KF.generalized_jsd, beta=0.5, normalize=False),
    "symmetric_kl": KF.symmetric_kl,
    "skew_forward_kl": partial(KF.skew_forward_kl, alpha=0.1),
    "skew_reverse_kl": partial(KF.skew_reverse_kl, alpha=0.2),
    "tvd": KF.total_variation,
}


def _inputs(n: int, vocab_t: int = V, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, D, generator=g) * 1.5).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.7).to(dtype)
    ht = (torch.randn(n, DT, generator=g) * 1.5).to(dtype)
    wt = (torch.randn(vocab_t, DT, generator=g) * 0.7).to(dtype)
    y = torch.randint(0, V, (n,), generator=g)
    return h, w, ht, wt, y


def _mix(kd_ratio: float):
    """The objective's mixing rule: the unused term is dropped at kd_ratio 0 and 1."""

    def mix(ce, kd):
        if kd_ratio == 0.0:
            return ce
        if kd_ratio == 1.0:
            return kd
        return (1.0 - kd_ratio) * ce + kd_ratio * kd

    return mix


def _chunk_loss(y, div=None, teacher_logits=None, *, kd_ratio=0.5, T=1.0, scale=None):
    """CE + ``scale`` · divergence on the tempered log-probs of the shared vocabulary; teacher logits from a closure."""
    scale = T**2 if scale is None else scale
    mix = _mix(kd_ratio)

    def chunk_loss(logits, rows):
        ce = F.cross_entropy(logits, y[rows], reduction="sum")
        if div is None:
            return ce, ce, torch.zeros_like(ce)
        with torch.no_grad():
            t = KF.upcast(teacher_logits(rows))
        vocab = min(logits.shape[-1], t.shape[-1])
        s = logits if kd_ratio != 0.0 else logits.detach()  # at kd_ratio 0 the KD term is logged only
        kd = div(KF.log_probs(s[:, :vocab], T), KF.log_probs(t[:, :vocab], T)).sum() * scale
        return mix(ce, kd), ce, kd

    return chunk_loss


def _reference(h, w, ht, wt, y, div, kd_ratio, T):
    """Plain autograd on the full logits ``[N, V]`` (the teacher's padded vocabulary sliced to the student's)."""
    s = h @ w.t()  # [N, V]
    ce = F.cross_entropy(s, y, reduction="sum")
    if div is None:
        return ce, ce, torch.zeros((), dtype=ce.dtype)
    with torch.no_grad():
        t = (ht @ wt.t())[:, : s.shape[-1]]
    kd = T**2 * div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)).sum()
    return (1 - kd_ratio) * ce + kd_ratio * kd, ce, kd


def _fused(h, w, ht, wt, y, div, kd_ratio, T, **chunking):
    chunk_loss = _chunk_loss(y, div, lambda rows: ht[rows] @ wt.t(), kd_ratio=kd_ratio, T=T)
    return FU.fused_linear_loss(h, w, chunk_loss, **chunking)


def _run_both(dtype, name, T, kd_ratio, vocab_t=V, n=37, **chunking):
    div = DIVERGENCES[name]
    h, w, ht, wt, y = _inputs(n, vocab_t, dtype)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, parts = _fused(h1, w1, ht, wt, y, div, kd_ratio, T, **chunking)
    (loss / 7.0).backward()  # a non-unit incoming gradient exercises the scaling in backward
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref, ref_ce, ref_kd = _reference(h2, w2, ht, wt, y, div, kd_ratio, T)
    (ref / 7.0).backward()
    return (loss, parts, h1.grad, w1.grad), (ref, ref_ce, ref_kd, h2.grad, w2.grad)


# ------------------------------------------------------------------------------ fused_linear_loss vs autograd
@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_matches_autograd_float64(name, T):
    (loss, parts, gh, gw), (ref, ce, kd, rgh, rgw) = _run_both(torch.float64, name, T, 0.4, rows_per_chunk=8)
    tol = {"rtol": 1e-11, "atol": 1e-11}
    assert loss.dtype == torch.float64 and parts.num_rows == 37
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(parts.ce_sum, ce, **tol)
    torch.testing.assert_close(parts.kd_sum, kd.to(parts.kd_sum.dtype), **tol)
    assert not parts.ce_sum.requires_grad and not parts.kd_sum.requires_grad
    torch.testing.assert_close(gh, rgh, **tol)
    torch.testing.assert_close(gw, rgw, **tol)


@pytest.mark.parametrize("name", ["ce_only", "forward_kl", "reverse_kl", "jsd_0.3"])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("vocab_t", [V, V + 6])  # V + 6: teacher vocabulary padded past the student's
def test_matches_autograd_float32(name, T, vocab_t):
    (loss, parts, gh, gw), (ref, ce, kd, rgh, rgw) = _run_both(
        torch.float32, name, T, 0.5, vocab_t=vocab_t, num_output_chunks=3
    )
    tol = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(parts.ce_sum, ce, **tol)
    torch.testing.assert_close(parts.kd_sum, kd, **tol)
    torch.testing.assert_close(gh, rgh, **tol)
    torch.testing.assert_close(gw, rgw, **tol)
    assert gh.dtype == gw.dtype == torch.float32


def test_kd_ratio_zero_logs_kd_without_gradient():
    (loss, parts, gh, gw), (ref, ce, kd, rgh, rgw) = _run_both(torch.float64, "forward_kl", 2.0, 0.0)
    torch.testing.assert_close(parts.kd_sum, kd)  # logged
    assert parts.kd_sum > 0
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(gh, rgh)  # = the CE-only gradient
    (_, _, gh_ce, gw_ce), _ = _run_both(torch.float64, "ce_only", 1.0, 0.0)
    torch.testing.assert_close(gh, gh_ce)
    torch.testing.assert_close(gw, gw_ce)


def test_kd_ratio_one():
    (loss, parts, gh, gw), (ref, ce, kd, rgh, rgw) = _run_both(torch.float64, "reverse_kl", 1.5, 1.0)
    torch.testing.assert_close(loss, kd)
    torch.testing.assert_close(parts.ce_sum, ce)
    torch.testing.assert_close(gh, rgh)
    torch.testing.assert_close(gw, rgw)


def test_chunking_does_not_change_results():
    results = [
        _run_both(torch.float64, "forward_kl", 2.0, 0.5, **kw)[0]
        for kw in (
            {"rows_per_chunk": 1},
            {"num_output_chunks": 5},
            {},
            {"memory_budget_bytes": 1},
            {"rows_per_chunk": 1000},
        )
    ]
    (loss, parts, gh, gw), *rest = results
    for other_loss, other_parts, other_gh, other_gw in rest:
        for a, b in [(loss, other_loss), (parts.ce_sum, other_parts.ce_sum), (parts.kd_sum, other_parts.kd_sum)]:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gh, other_gh, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gw, other_gw, rtol=1e-12, atol=1e-12)


def test_frozen_weight_gets_no_gradient_and_hidden_does():
    h, w, ht, wt, y = _inputs(20, dtype=torch.float64)
    h1 = h.clone().requires_grad_()
    loss, _ = _fused(h1, w, ht, wt, y, KF.forward_kl, 0.5, 1.0)
    loss.backward()
    h2 = h.clone().requires_grad_()
    _reference(h2, w, ht, wt, y, KF.forward_kl, 0.5, 1.0)[0].backward()
    assert w.grad is None
    torch.testing.assert_close(h1.grad, h2.grad)


def test_frozen_hidden_gets_no_gradient_and_weight_does():
    h, w, ht, wt, y = _inputs(20, dtype=torch.float64)
    w1 = w.clone().requires_grad_()
    loss, _ = _fused(h, w1, ht, wt, y, KF.reverse_kl, 0.5, 2.0, rows_per_chunk=6)
    loss.backward()
    w2 = w.clone().requires_grad_()
    _reference(h, w2, ht, wt, y, KF.reverse_kl, 0.5, 2.0)[0].backward()
    assert h.grad is None
    torch.testing.assert_close(w1.grad, w2.grad)


def test_empty_batch():
    h, w, ht, wt, y = _inputs(0)
    h.requires_grad_()
    w.requires_grad_()
    loss, parts = _fused(h, w, ht, wt, y, KF.forward_kl, 0.5, 1.0)
    assert loss.item() == 0.0 and parts.ce_sum.item() == 0.0 and parts.kd_sum.item() == 0.0 and parts.num_rows == 0
    loss.backward()
    assert h.grad.shape == (0, D)
    assert w.grad is None or not w.grad.any()


def test_no_grad_evaluation_computes_no_gradient():
    h, w, ht, wt, y = _inputs(30, dtype=torch.float64)
    h.requires_grad_()
    w.requires_grad_()
    calls = []
    inner = _chunk_loss(y, KF.forward_kl, lambda r: ht[r] @ wt.t(), kd_ratio=0.5)

    def spy(logits, rows):
        calls.append(logits.requires_grad)
        return inner(logits, rows)

    with torch.no_grad():
        loss, parts = FU.fused_linear_loss(h, w, spy, rows_per_chunk=8)
    assert not loss.requires_grad and calls == [False] * 4
    ref = _reference(h.detach(), w.detach(), ht, wt, y, KF.forward_kl, 0.5, 1.0)
    torch.testing.assert_close(loss, ref[0])
    torch.testing.assert_close(parts.ce_sum, ref[1])
    torch.testing.assert_close(parts.kd_sum, ref[2])
    # inputs that do not require grad: the same plain loop, with gradients enabled
    calls.clear()
    loss2, _ = FU.fused_linear_loss(h.detach(), w.detach(), spy, rows_per_chunk=8)
    assert not loss2.requires_grad and calls == [False] * 4
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


def test_backward_twice_raises():
    h, w, ht, wt, y = _inputs(10)
    h.requires_grad_()
    loss, _ = _fused(h, w, ht, wt, y, None, 0.0, 1.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bf16_grads_in_param_dtype():
    h, w, ht, wt, y = _inputs(40)
    T = 2.0
    htb, wtb = ht.bfloat16(), wt.bfloat16()
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    chunk_loss = _chunk_loss(y, KF.forward_kl, lambda r: htb[r] @ wtb.t(), kd_ratio=0.5, T=T)
    loss, parts = FU.fused_linear_loss(hb, wb, chunk_loss, rows_per_chunk=16)
    loss.backward()
    assert loss.dtype == parts.ce_sum.dtype == torch.float32
    assert hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    # the same computation through plain autograd in bf16 (matmul in bf16, loss in fp32)
    h2, w2 = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    s = (h2 @ w2.t()).float()
    with torch.no_grad():
        t = (htb @ wtb.t()).float()
    kd = T**2 * KF.forward_kl(KF.log_probs(s, T), KF.log_probs(t, T)).sum()
    ref = 0.5 * F.cross_entropy(s, y, reduction="sum") + 0.5 * kd
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hb.grad.float(), h2.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(wb.grad.float(), w2.grad.float(), rtol=2e-2, atol=5e-2)


def test_bad_shapes_and_dtypes_raise():
    h, w, _, _, y = _inputs(5)
    chunk_loss = _chunk_loss(y)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        FU.fused_linear_loss(h[:, :-1], w, chunk_loss)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        FU.fused_linear_loss(h[None], w, chunk_loss)
    with pytest.raises(ValueError, match="dtype"):
        FU.fused_linear_loss(h.double(), w, chunk_loss)


# ----------------------------------------------------------------------------------------------- sparse support
def _sparse_reference(s, t_full, y, ids, div, T, kd_ratio, tail):
    """Full logits -> top-k support (+ tail) -> divergence, straightforwardly in probability space."""
    ce = F.cross_entropy(s, y, reduction="sum")
    s_p = torch.softmax(s / T, -1).gather(1, ids)  # [N, k]
    t_p = torch.softmax(t_full / T, -1).gather(1, ids)
    if tail == "bucket":
        s_sup = torch.cat([s_p, 1 - s_p.sum(-1, keepdim=True)], -1).log()
        t_sup = torch.cat([t_p, 1 - t_p.sum(-1, keepdim=True)], -1).log()
    else:
        s_sup = (s_p / s_p.sum(-1, keepdim=True)).log()
        t_sup = (t_p / t_p.sum(-1, keepdim=True)).log()
    kd = div(s_sup, t_sup).sum() * T**2
    return (1 - kd_ratio) * ce + kd_ratio * kd, ce, kd


def _sparse_chunk_loss(y, ids, t_logp, div, *, kd_ratio=0.5, T=1.0, tail="bucket"):
    """CE + T² · divergence over the teacher's top-k support (what a cached teacher source does)."""
    mix = _mix(kd_ratio)

    def chunk_loss(logits, rows):
        ce = F.cross_entropy(logits, y[rows], reduction="sum")
        s_sup, t_sup = sparse_support(KF.log_probs(logits, T), ids[rows], t_logp[rows], tail)
        kd = div(s_sup, t_sup).sum() * T**2
        return mix(ce, kd), ce, kd

    return chunk_loss


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd_0.3"])
def test_sparse_support_matches_reference(tail, name):
    div = DIVERGENCES[name]
    T, k = 2.0, 5
    h, w, ht, wt, y = _inputs(23, dtype=torch.float64)
    t_full = ht @ wt.t()
    t_logp, ids = torch.log_softmax(t_full / T, -1).topk(k, dim=-1)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    chunk_loss = _sparse_chunk_loss(y, ids, t_logp, div, T=T, tail=tail)
    loss, parts = FU.fused_linear_loss(h1, w1, chunk_loss, rows_per_chunk=6)
    loss.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref, ce, kd = _sparse_reference(h2 @ w2.t(), t_full, y, ids, div, T, 0.5, tail)
    ref.backward()
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(parts.ce_sum, ce, **tol)
    torch.testing.assert_close(parts.kd_sum, kd, **tol)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


def test_sparse_tail_finite_when_top_k_holds_all_mass():
    """A student (and teacher) so peaked that the top-k mass rounds to 1: tail floored, gradients finite."""
    h, w, ht, wt, y = _inputs(8)
    w = w * 200.0  # huge logits: softmax mass all in the top entry (fp32)
    t_logp, ids = torch.log_softmax(ht @ wt.t() * 200.0, -1).topk(3, dim=-1)
    h.requires_grad_()
    w.requires_grad_()
    for div in (KF.forward_kl, KF.reverse_kl):
        loss, parts = FU.fused_linear_loss(h, w, _sparse_chunk_loss(y, ids, t_logp, div))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(parts.kd_sum)
        assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
        h.grad = w.grad = None


# ----------------------------------------------------------------------------------------------------- sizing
def test_rows_per_chunk_for_budget():
    assert FU.rows_per_chunk_for(128256, 512 * 2**20) == 128  # 130 fit, rounded down to whole GEMM tiles
    assert FU.rows_per_chunk_for(128256) == FU.rows_per_chunk_for(128256, FU.DEFAULT_MEMORY_BUDGET_BYTES) == 128
    assert FU.rows_per_chunk_for(128256, 512 * 2**20, tensors_per_row=4) == 256  # 261 fit
    assert FU.rows_per_chunk_for(128256, 1) == FU.MIN_ROWS_PER_CHUNK
    assert FU.rows_per_chunk_for(100, 2**40) == FU.MAX_ROWS_PER_CHUNK
    for bad in (0, -5, 1.5):
        with pytest.raises(ConfigError, match="loss_memory_budget"):
            FU.rows_per_chunk_for(100, bad)


def test_chunk_slices():
    assert FU.chunk_slices(0, 10) == []
    assert FU.chunk_slices(0, 10, rows_per_chunk=4) == []
    assert FU.chunk_slices(10, 10, rows_per_chunk=4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert FU.chunk_slices(10, 10, num_output_chunks=3) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert FU.chunk_slices(2, 10, num_output_chunks=8) == [slice(0, 1), slice(1, 2)]  # no empty chunk
    assert FU.chunk_slices(5000, 128256) == [slice(s, min(s + 128, 5000)) for s in range(0, 5000, 128)]
    assert FU.chunk_slices(200, 128256, memory_budget_bytes=1) == [slice(0, 64), slice(64, 128), slice(128, 192), slice(192, 200)]  # fmt: skip
    # precedence: rows_per_chunk > num_output_chunks > memory budget
    assert FU.chunk_slices(10, 10, rows_per_chunk=4, num_output_chunks=2) == FU.chunk_slices(10, 10, rows_per_chunk=4)
    assert FU.chunk_slices(1000, 10, num_output_chunks=2, memory_budget_bytes=1) == [slice(0, 500), slice(500, 1000)]
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="num_output_chunks"):
            FU.chunk_slices(10, 10, num_output_chunks=bad)
        with pytest.raises(ConfigError, match="loss_rows_per_chunk"):
            FU.chunk_slices(10, 10, rows_per_chunk=bad)
    with pytest.raises(ConfigError, match="loss_memory_budget"):
        FU.chunk_slices(10, 10, memory_budget_bytes=0)


# ---------------------------------------------------------------------------- ce_forward_kl (hand-written gradient)
def _ce_forward_kl_loss(y, teacher_logits, *, kd_ratio, T, scale):
    def chunk_loss(logits, rows):
        t = teacher_logits(rows) if teacher_logits is not None else None
        ratio = kd_ratio if t is not None else 0.0
        mix = _mix(ratio) if t is not None else (lambda ce, kd: ce)
        return FU.ce_forward_kl(logits, t, y[rows], kd_ratio=ratio, temperature=T, scale=scale, mix=mix)

    return chunk_loss


def _forward_kl_written_out(s, t, T):
    """Σ p_t (log p_t − log p_s) at temperature T, from the logits (no zero teacher probabilities here)."""
    s_logp, t_logp = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("vocab_t", [V, V + 6, V - 5])  # padded teacher; a student vocabulary larger than the teacher's
@pytest.mark.parametrize("t2", [True, False])
def test_ce_forward_kl_matches_autograd_float64(kd_ratio, T, vocab_t, t2):
    scale = T**2 if t2 else 1.0
    h, w, ht, wt, y = _inputs(29, vocab_t, torch.float64)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    chunk_loss = _ce_forward_kl_loss(y, lambda rows: ht[rows] @ wt.t(), kd_ratio=kd_ratio, T=T, scale=scale)
    loss, parts = FU.fused_linear_loss(h1, w1, chunk_loss, rows_per_chunk=8)
    (loss * 0.3).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    s = h2 @ w2.t()
    vocab = min(V, vocab_t)
    ce = F.cross_entropy(s, y, reduction="sum")
    kd = scale * _forward_kl_written_out(s[:, :vocab], (ht @ wt.t())[:, :vocab], T)
    ref = (1 - kd_ratio) * ce + kd_ratio * kd
    (ref * 0.3).backward()
    tol = {"rtol": 1e-11, "atol": 1e-11}
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(parts.ce_sum, ce, **tol)
    torch.testing.assert_close(parts.kd_sum, kd, **tol)  # logged at kd_ratio 0 too
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ce_forward_kl_float32_and_ce_only(T):
    _, (ref, ce, kd, rgh, rgw) = _run_both(torch.float32, "forward_kl", T, 0.5, num_output_chunks=3)
    h, w, ht, wt, y = _inputs(37)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    chunk_loss = _ce_forward_kl_loss(y, lambda rows: ht[rows] @ wt.t(), kd_ratio=0.5, T=T, scale=T**2)
    fast, fast_parts = FU.fused_linear_loss(h1, w1, chunk_loss, num_output_chunks=3)
    (fast / 7.0).backward()
    tol = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(fast, ref, **tol)
    torch.testing.assert_close(fast_parts.ce_sum, ce, **tol)
    torch.testing.assert_close(fast_parts.kd_sum, kd, **tol)
    torch.testing.assert_close(h1.grad, rgh, **tol)
    torch.testing.assert_close(w1.grad, rgw, **tol)
    # CE only (fine-tuning: no teacher)
    h2 = h.clone().requires_grad_()
    ce_chunk = _ce_forward_kl_loss(y, None, kd_ratio=0.0, T=T, scale=1.0)
    ce_only, ce_parts = FU.fused_linear_loss(h2, w, ce_chunk)
    ce_only.backward()
    h3 = h.clone().requires_grad_()
    F.cross_entropy(h3 @ w.t(), y, reduction="sum").backward()
    torch.testing.assert_close(ce_only, ce, **tol)
    torch.testing.assert_close(ce_parts.ce_sum, ce, **tol)
    assert ce_parts.kd_sum.item() == 0.0
    torch.testing.assert_close(h2.grad, h3.grad, **tol)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ce_forward_kl_teacher_zero_probabilities(T):
    """A teacher logit of −inf (probability 0) contributes 0, as in the functional forward KL."""
    h, w, ht, wt, y = _inputs(12, dtype=torch.float64)
    t_logits = ht @ wt.t()
    t_logits[:, 3] = float("-inf")
    h1 = h.clone().requires_grad_()
    chunk_loss = _ce_forward_kl_loss(y, lambda r: t_logits[r], kd_ratio=0.5, T=T, scale=T**2)
    loss, parts = FU.fused_linear_loss(h1, w, chunk_loss, rows_per_chunk=5)
    loss.backward()
    h2 = h.clone().requires_grad_()
    s = h2 @ w.t()
    kd = T**2 * KF.forward_kl(KF.log_probs(s, T), KF.log_probs(t_logits, T)).sum()
    ref = 0.5 * F.cross_entropy(s, y, reduction="sum") + 0.5 * kd
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(parts.kd_sum)
    assert torch.isfinite(h1.grad).all()
    torch.testing.assert_close(parts.kd_sum, kd.detach())
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h1.grad, h2.grad)


def test_ce_forward_kl_directly_and_backward_twice_raises():
    """On its own (not inside fused_linear_loss): parts not differentiable, gradient = autograd's, consumed once."""
    g = torch.Generator().manual_seed(7)
    s = torch.randn(9, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(9, V + 3, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (9,), generator=g)
    s1 = s.clone().requires_grad_()
    mixed, ce, kd = FU.ce_forward_kl(s1, t, y, kd_ratio=0.25, temperature=2.0, scale=4.0, mix=_mix(0.25))
    assert mixed.requires_grad and not ce.requires_grad and not kd.requires_grad
    (mixed * 3.0).backward(retain_graph=True)
    s2 = s.clone().requires_grad_()
    ref_ce = F.cross_entropy(s2, y, reduction="sum")
    ref_kd = 4.0 * _forward_kl_written_out(s2, t[:, :V], 2.0)
    (3.0 * (0.75 * ref_ce + 0.25 * ref_kd)).backward()
    tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(ce, ref_ce.detach(), **tol)
    torch.testing.assert_close(kd, ref_kd.detach(), **tol)
    torch.testing.assert_close(s1.grad, s2.grad, **tol)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        mixed.backward()
    # without a gradient (evaluation) nothing is kept
    with torch.no_grad():
        mixed_eval, _, _ = FU.ce_forward_kl(s, t, y, kd_ratio=0.25, temperature=2.0, scale=4.0, mix=_mix(0.25))
    torch.testing.assert_close(mixed_eval, mixed.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("T, vocab_t", [(1.0, V), (2.0, V), (1.0, V - 5)])
def test_ce_forward_kl_row_blocks_and_overwrite_are_exact(monkeypatch, T, vocab_t):
    """Row blocks (a partial last one) and writing the gradient into the logits give bit-identical results."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(11, V, generator=g) * 2
    t = torch.randn(11, vocab_t, generator=g) * 2
    t[:, 2] = float("-inf")  # a zero teacher probability in some block
    y = torch.randint(0, V, (11,), generator=g)

    def run(overwrite: bool):
        s1 = s.clone().requires_grad_()
        t1 = t.clone()
        mixed, ce, kd = FU.ce_forward_kl(
            s1, t1, y, kd_ratio=0.3, temperature=T, scale=T**2, mix=_mix(0.3), overwrite_logits=overwrite
        )
        (grad,) = torch.autograd.grad(mixed, s1)
        assert torch.equal(t1, t)  # the teacher's logits are never written
        return mixed, ce, kd, grad, s1

    whole = run(False)
    assert torch.equal(whole[4], s)  # not overwritten by default
    monkeypatch.setattr(FU, "BLOCK_ELEMENTS", 4 * V)  # blocks of 4 rows: 4, 4, 3
    for overwrite in (False, True):
        blocked = run(overwrite)
        for a, b in zip(whole[:4], blocked[:4], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if overwrite:
            assert blocked[3].data_ptr() == blocked[4].data_ptr()  # the gradient lives in the logits' storage


def test_rows_per_block_is_cache_sized_on_a_cpu_and_the_whole_chunk_on_an_accelerator():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert FU.rows_per_block(1020, 4096, cpu, 2**16) == 16
    assert FU.rows_per_block(5, 4096, cpu, 2**16) == 5  # never more rows than the chunk has
    assert FU.rows_per_block(4096, 128256, cpu, 2**16) == 1  # at least one row
    assert FU.rows_per_block(4096, 128256, cuda, 2**16) == 4096  # one block: each pass is one kernel launch
    assert FU.rows_per_block(0, 4096, cuda, 2**16) == 1


def _ce_forward_kl_reference(s, t, y, *, kd_ratio, T, scale):
    """float64 autograd reference of ce_forward_kl (KF.forward_kl on the shared vocabulary): mixed, ce, kd, grad."""
    s64 = s.detach().double().requires_grad_()
    vocab = min(s.shape[-1], t.shape[-1])
    ce = F.cross_entropy(s64, y, reduction="sum")
    kd = scale * KF.forward_kl(KF.log_probs(s64[:, :vocab], T), KF.log_probs(t[:, :vocab].double(), T)).sum()
    mixed = _mix(kd_ratio)(ce, kd)
    (grad,) = torch.autograd.grad(mixed, s64)
    return mixed.detach(), ce.detach(), kd.detach(), grad


def _ce_forward_kl_float32(s, t, y, *, kd_ratio, T, scale, overwrite=True):
    s1 = s.clone().requires_grad_()
    mixed, ce, kd = FU.ce_forward_kl(
        s1, t, y, kd_ratio=kd_ratio, temperature=T, scale=scale, mix=_mix(kd_ratio), overwrite_logits=overwrite
    )
    (grad,) = torch.autograd.grad(mixed, s1)
    return mixed.detach(), ce, kd, grad


def _terms_inputs(n, vocab_t, seed=7):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=g) * 3
    t = torch.randn(n, vocab_t, generator=g) * 3
    t[:, 2] = float("-inf")  # a zero teacher probability
    return s, t, torch.randint(0, V, (n,), generator=g)


@pytest.mark.parametrize("kd_ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("T, vocab_t", [(1.0, V), (2.0, V), (1.0, V - 5), (0.7, V - 5), (1.0, None)])
def test_ce_forward_kl_terms_equal_the_float64_reference(T, vocab_t, kd_ratio):
    """The whole-tensor formulation that ``compile: true`` compiles, run eagerly in float64: values and gradient."""
    s, t, y = _terms_inputs(9, vocab_t or V)
    s, t = s.double(), t.double()
    scale = T**2
    if vocab_t is None:  # cross-entropy only
        ce, kd, grad = FU.ce_forward_kl_terms(s, None, y, 1.0, 0.0, 1.0)
        s64 = s.clone().requires_grad_()
        ce_ref = F.cross_entropy(s64, y, reduction="sum")
        (grad_ref,) = torch.autograd.grad(ce_ref, s64)
        torch.testing.assert_close(ce, ce_ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)
        assert kd.item() == 0.0
        return
    ref = _ce_forward_kl_reference(s, t, y, kd_ratio=kd_ratio, T=T, scale=scale)
    ce, kd, grad = FU.ce_forward_kl_terms(s, t[:, : min(V, t.shape[-1])], y, 1 - kd_ratio, kd_ratio * scale / T, T)
    mixed = _mix(kd_ratio)(ce, kd * scale)
    for a, b in zip((mixed, ce, kd * scale, grad), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.slow  # inductor compiles each branch (~5-20 s each on a loaded 2-core CPU)
@pytest.mark.parametrize("T, vocab_t", [(1.0, V), (2.0, V - 5), (1.0, None)])
def test_compiled_ce_forward_kl_equals_the_eager_one(T, vocab_t):
    """``compiled=True`` (torch.compile of ce_forward_kl_terms) gives the block loop's values and gradient to fp32
    precision, for another chunk size too (the row count is not baked into the compiled code)."""
    for n in (13, 21):
        s, t, y = _terms_inputs(n, vocab_t or V, seed=n)
        t = None if vocab_t is None else t
        kw = dict(kd_ratio=0.4 if t is not None else 0.0, temperature=T, scale=T**2)
        mix = _mix(kw["kd_ratio"])
        out = {}
        for compiled in (False, True):
            s1 = s.clone().requires_grad_()
            mixed, ce, kd = FU.ce_forward_kl(s1, t, y, mix=mix, overwrite_logits=True, compiled=compiled, **kw)
            (grad,) = torch.autograd.grad(mixed * 2.0, s1)  # an incoming gradient scales the stored one
            out[compiled] = (mixed.detach(), ce, kd, grad)
        for a, b in zip(out[False], out[True], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, vocab_t", [(1.0, V), (2.0, V), (1.0, V - 5), (0.7, V - 5), (2.0, V + 4)])
def test_ce_forward_kl_extreme_logits_float32(T, vocab_t):
    """Targets whose student probability underflows to 0 in fp32 (CE ≈ 300, finite and exact), large logits and a
    teacher offset by a constant (softmax is shift-invariant: the row maxima are subtracted before anything else)."""
    g = torch.Generator().manual_seed(5)
    n = 12
    s = torch.randn(n, V, generator=g) * 8 + 60  # logits around 60: exp(s) alone would overflow
    t = torch.randn(n, vocab_t, generator=g) * 8 - 500  # the teacher offset by −560 from the student
    vocab = min(V, vocab_t)
    t[:, :vocab] += 0.5 * (s[:, :vocab] - 60)  # and correlated with it
    y = torch.randint(0, V, (n,), generator=g)
    s[:6, y[:6]] = 0.0  # p_s(y) ≈ exp(−300 or less): 0 in fp32
    s[torch.arange(6), y[:6]] = -250.0
    ref = _ce_forward_kl_reference(s, t, y, kd_ratio=0.5, T=T, scale=T**2)
    got = _ce_forward_kl_float32(s, t, y, kd_ratio=0.5, T=T, scale=T**2)
    assert all(torch.isfinite(x).all() for x in got)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-5)
    # CE only (no teacher) on the same logits
    s1 = s.clone().requires_grad_()
    _, ce, kd = FU.ce_forward_kl(s1, None, y, kd_ratio=0.0, temperature=T, scale=1.0, mix=lambda c, k: c)
    torch.testing.assert_close(ce.double(), ref[1], rtol=1e-6, atol=1e-5)
    assert kd.item() == 0.0


def test_ce_forward_kl_same_distribution_is_zero_and_shift_invariant():
    """KL(p‖p) = 0 exactly; a teacher whose logits are the student's plus 64 gives the float64 reference's (≈ 0)."""
    g = torch.Generator().manual_seed(8)
    s = torch.randn(7, V, generator=g) * 3
    y = torch.randint(0, V, (7,), generator=g)
    for T in (1.0, 2.0):
        _, ce, kd, grad = _ce_forward_kl_float32(s, s.clone(), y, kd_ratio=0.4, T=T, scale=T**2)
        assert kd.item() == 0.0
        # the KD part of the gradient cancels: what is left is (1 − r) · the CE gradient
        ce_ref = _ce_forward_kl_reference(s, s, y, kd_ratio=0.0, T=T, scale=T**2)
        torch.testing.assert_close(grad.double(), 0.6 * ce_ref[3], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ce.double(), ce_ref[1], rtol=1e-6, atol=1e-6)
        t = s + 64.0
        got = _ce_forward_kl_float32(s, t, y, kd_ratio=0.4, T=T, scale=T**2)
        ref = _ce_forward_kl_reference(s, t, y, kd_ratio=0.4, T=T, scale=T**2)
        for a, b in zip(got, ref, strict=True):  # fp32 rounding of the shifted logits: ~1e-7 per row, × T²
            torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=4e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ce_forward_kl_infinite_logits_follow_the_functional_kl(T):
    """−inf where both teacher and student have it, and where only the teacher has it, count 0 (KF.kl); a student
    −inf where the teacher has mass makes that row's KL +inf, as in KF.kl."""
    g = torch.Generator().manual_seed(9)
    s = torch.randn(6, V, generator=g) * 2
    t = torch.randn(6, V, generator=g) * 2
    y = torch.randint(0, V, (6,), generator=g)
    t[:, 3] = float("-inf")
    s[:, 3] = float("-inf")  # both −inf: 0 − (−inf) − (−inf) is NaN in the written-out KL; it must count 0
    t[:, 7] = float("-inf")  # teacher only
    y[y == 3] = 4  # no target at a −inf student logit (its CE would be +inf)
    ref = _ce_forward_kl_reference(s, t, y, kd_ratio=0.5, T=T, scale=T**2)
    got = _ce_forward_kl_float32(s, t, y, kd_ratio=0.5, T=T, scale=T**2)
    assert all(torch.isfinite(x).all() for x in got)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
    s[2, 11] = float("-inf")  # the teacher has mass there
    _, _, kd, _ = _ce_forward_kl_float32(s, t, y, kd_ratio=0.5, T=T, scale=T**2)
    assert kd.item() == float("inf")


def test_ce_forward_kl_without_gradient_overwrite_gives_the_same_values():
    """Evaluation (no gradient) computes the same sums whether it may use the logits' storage or not."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(9, V, generator=g) * 2
    t = torch.randn(9, V - 5, generator=g) * 2
    y = torch.randint(0, V, (9,), generator=g)
    for T in (1.0, 2.0):
        with torch.no_grad():
            a = FU.ce_forward_kl(s.clone(), t, y, kd_ratio=0.3, temperature=T, scale=T**2, mix=_mix(0.3))
            s2 = s.clone()
            b = FU.ce_forward_kl(
                s2, t, y, kd_ratio=0.3, temperature=T, scale=T**2, mix=_mix(0.3), overwrite_logits=True
            )
        with_grad = _ce_forward_kl_float32(s, t, y, kd_ratio=0.3, T=T, scale=T**2)
        for x, y2, z in zip(a, b, with_grad[:3], strict=True):
            torch.testing.assert_close(x, y2, rtol=0, atol=0)
            torch.testing.assert_close(x, z, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- fused_output_weight
def _model(vocab: int, dim: int, tie: bool, seed: int):
    torch.manual_seed(seed)
    m = llama(
        vocab_size=vocab,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        embed_dim=dim,
        intermediate_dim=32,
        max_seq_len=32,
        tie_word_embeddings=tie,
    )
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def _lora_student(vocab: int = 64, dropout: float = 0.0):
    m = apply_lora(
        _model(vocab, 16, False, 0),
        ["q_proj", "v_proj"],
        apply_lora_to_output=True,
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=dropout,
    )
    torch.manual_seed(5)
    for n, p in m.named_parameters():
        if "lora_b" in n:
            torch.nn.init.normal_(p, std=0.3)  # a non-zero update, so the effective weight differs from the base
    return m


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (3, 11), generator=g)
    labels = tokens.clone()
    labels[:, :3] = -100
    labels[-1, 6:] = -100
    return {"tokens": tokens, "labels": labels}


def test_fused_output_weight_untied_and_tied():
    m = _model(64, 16, False, 0)
    assert FU.fused_output_weight(m) is m.output.weight
    tied = _model(64, 16, True, 0)
    assert FU.fused_output_weight(tied) is tied.tok_embeddings.weight
    h = torch.randn(5, 16)
    for model in (m, tied):
        torch.testing.assert_close(h @ FU.fused_output_weight(model).t(), model.output_logits(h), rtol=0, atol=0)


def test_fused_output_weight_lora_output_is_the_effective_weight():
    m = _lora_student()
    out = m.output
    w = FU.fused_output_weight(m)
    torch.testing.assert_close(w, out.weight + out.scaling * (out.lora_b.weight @ out.lora_a.weight))
    assert w.requires_grad and not torch.equal(w, out.weight)
    h = torch.randn(5, 16, dtype=w.dtype)
    torch.testing.assert_close(h @ w.t(), m.output_logits(h), rtol=1e-6, atol=1e-6)
    w.square().sum().backward()  # differentiable in the adapter; the frozen base gets nothing
    assert out.lora_a.weight.grad is not None and out.lora_b.weight.grad is not None
    assert out.lora_a.weight.grad.any() and out.weight.grad is None
    out.disabled = True  # disabled adapters: the base weight itself
    assert FU.fused_output_weight(m) is out.weight


def test_fused_output_weight_falls_back():
    drop = _lora_student(dropout=0.1).train()
    assert FU.fused_output_weight(drop) is None  # dropout on the adapter while training
    assert FU.fused_output_weight(drop.eval()) is not None  # ... is the identity in evaluation
    nf4 = _lora_student()
    nf4.output._quantize_base = True  # an NF4 base has no plain weight to multiply
    assert FU.fused_output_weight(nf4) is None
    biased = _model(64, 16, False, 0)
    biased.output = torch.nn.Linear(16, 64, bias=True)
    assert FU.fused_output_weight(biased) is None
    sharded = _model(64, 16, False, 0)
    sharded.output.weight.device_mesh = object()  # what a DTensor (FSDP) weight has
    assert FU.fused_output_weight(sharded) is None
    sharded_tied = _model(64, 16, True, 0)
    sharded_tied.tok_embeddings.weight.device_mesh = object()
    assert FU.fused_output_weight(sharded_tied) is None
    sharded_lora = _lora_student()
    sharded_lora.output.weight.device_mesh = object()
    assert FU._lora_effective_weight(sharded_lora.output) is None
    assert FU.fused_output_weight(sharded_lora) is None


# ------------------------------------------------------------------------ through the objective: fused vs not
@pytest.fixture
def fused_calls(monkeypatch):
    """The output weights the objective handed to fused_linear_loss (empty: it took the unfused path)."""
    calls = []
    real = OBJ.fused_linear_loss

    def spy(hidden, weight, chunk_loss, **kwargs):
        calls.append(weight)
        return real(hidden, weight, chunk_loss, **kwargs)

    monkeypatch.setattr(OBJ, "fused_linear_loss", spy)
    return calls


class _Hellinger(L.Divergence):
    """A divergence the library does not ship: the fused path runs it through the objective's generic chunk loss."""

    def per_token(self, student_logp, teacher_logp):
        return 1 - (0.5 * (student_logp + teacher_logp)).exp().sum(-1)


def _students():
    return {
        "untied": lambda: _model(64, 16, False, 0),
        "tied": lambda: _model(64, 16, True, 0),
        "lora_output": _lora_student,
    }


KD_CASES = {
    "forward_kl_T2": (L.ForwardKLLoss, 2.0, 0.5),  # the hand-written CE + forward-KL chunk loss
    "skew_reverse_kl_T2": (partial(L.SkewReverseKLLoss, alpha=0.2), 2.0, 0.3),  # the generic chunk loss
    "custom_divergence": (_Hellinger, 1.0, 0.5),
    "fine_tuning": (None, 1.0, 0.0),
}


def _objective_run(student, batch, fused, *, kd_cls, teacher, T, kd_ratio, **kw):
    obj = L.DistillationObjective(
        kd_cls() if kd_cls else None, teacher=teacher if kd_cls else None, kd_ratio=kd_ratio, temperature=T,
        fused=fused, **kw,
    )  # fmt: skip
    out = obj(student, batch)
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss_sum, params) if out.loss_sum.requires_grad else None
    return out, grads


def _assert_same(a, b, tol):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for x, y in zip(out_a, out_b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x.detach(), y.detach(), **tol)
    if grads_a is None or grads_b is None:
        assert grads_a is None and grads_b is None
        return
    for x, y in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("kd_case", list(KD_CASES))
@pytest.mark.parametrize("kind", list(_students()))
def test_objective_fused_equals_unfused(kind, kd_case, fused_calls):
    """float64, so the fused path must agree to rounding: values, parts and every trained parameter's gradient."""
    kd_cls, T, kd_ratio = KD_CASES[kd_case]
    student = _students()[kind]().double()
    teacher = _model(72, 24, False, 1).double().requires_grad_(False).eval()  # padded teacher vocabulary
    batch = _batch(64)
    kw = {"kd_cls": kd_cls, "teacher": teacher, "T": T, "kd_ratio": kd_ratio, "num_output_chunks": 3}
    unfused = _objective_run(student, batch, False, **kw)
    assert fused_calls == []
    fused = _objective_run(student, batch, True, **kw)
    assert len(fused_calls) == 1  # the fused path was taken
    weight = fused_calls[0]
    if kind == "untied":
        assert weight is student.output.weight
    elif kind == "tied":
        assert weight is student.tok_embeddings.weight
    else:
        assert weight.requires_grad and weight is not student.output.weight  # the LoRA effective weight
        trained = [n for n, p in student.named_parameters() if p.requires_grad]
        assert "output.lora_a.weight" in trained and "output.lora_b.weight" in trained
        assert "output.weight" not in trained
    assert fused[0].loss_sum.dtype == torch.float64
    if kd_cls is None:
        assert fused[0].kd_loss_sum is None
    _assert_same(fused, unfused, {"rtol": 1e-10, "atol": 1e-10})


@pytest.mark.parametrize("fallback", ["bias", "lora_dropout", "nf4"])
def test_objective_falls_back_to_unfused_without_a_single_output_weight(fallback, fused_calls):
    if fallback == "bias":
        student = _model(64, 16, False, 0)
        student.output = torch.nn.Linear(16, 64, bias=True)
    elif fallback == "lora_dropout":
        student = _lora_student(dropout=0.1).train()
    else:
        student = _lora_student()
        student.output._quantize_base = True
    teacher = _model(64, 24, False, 1).requires_grad_(False).eval()
    batch = _batch(64)
    kw = {"kd_cls": L.ForwardKLLoss, "teacher": teacher, "T": 2.0, "kd_ratio": 0.5}
    runs = []
    for fused in (True, False):
        torch.manual_seed(11)  # the same dropout masks in both runs
        runs.append(_objective_run(student, batch, fused, **kw))
    assert fused_calls == []
    _assert_same(*runs, {"rtol": 0, "atol": 0})


@pytest.mark.parametrize("kind", list(_students()))
def test_objective_fused_evaluation_under_no_grad(kind, fused_calls):
    student = _students()[kind]().eval()
    teacher = _model(64, 24, False, 1).requires_grad_(False).eval()
    batch = _batch(64)
    kw = {"kd_cls": L.ForwardKLLoss, "teacher": teacher, "T": 2.0, "kd_ratio": 0.5}
    with torch.no_grad():
        fused = _objective_run(student, batch, True, **kw)
        unfused = _objective_run(student, batch, False, **kw)
    assert len(fused_calls) == 1 and fused[1] is None and not fused[0].loss_sum.requires_grad
    _assert_same(fused, unfused, {"rtol": 1e-6, "atol": 1e-6})
