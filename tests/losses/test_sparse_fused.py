"""The hand-written CE + sparse-KD chunk loss (kdtune.losses.sparse_fused) against autograd references: the sparse
support of kdtune.losses.sparse + the divergence + F.cross_entropy under the linear mix (values and gradients), the
dense loss at k = V, tiny student tails, and the objective's fused path with a cached teacher vs its unfused path."""

import pytest
import torch
import torch.nn.functional as F

import kdtune.losses as L
import kdtune.losses.objective as objective_module
import kdtune.losses.sparse_fused as sparse_fused
from kdtune.losses import functional as KF
from kdtune.losses.sparse import TAIL_MODES, sparse_support
from kdtune.losses.sparse_fused import ce_sparse_kd

V, N = 41, 23

DIVERGENCES = {
    "forward_kl": L.ForwardKLLoss(),
    "reverse_kl": L.ReverseKLLoss(),
    "symmetric_kl": L.SymmetricKLLoss(),
    "jsd_0.3": L.JSDLoss(beta=0.3),
    "jsd_0.5_unnormalized": L.JSDLoss(beta=0.5, normalize=False),
    "skew_forward_kl": L.SkewForwardKLLoss(alpha=0.1),
    "skew_reverse_kl": L.SkewReverseKLLoss(alpha=0.2),
    "tvd": L.TVDLoss(),
}


def _inputs(seed: int, k: int, T: float, dtype=torch.float64, scale: float = 3.0, value_dtype=None):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, V, (N,), generator=g)
    t_logp = torch.log_softmax(t / T, -1)
    vals, ids = t_logp.topk(k, -1)
    perm = torch.randperm(k, generator=g)  # the support's order must not matter
    vals, ids = vals[:, perm], ids[:, perm].to(torch.int32)
    vals = vals.to(value_dtype or dtype)
    return s, ids, vals, y, t


def _mix(r):
    return lambda ce, kd: ce if r == 0.0 else (kd if r == 1.0 else (1 - r) * ce + r * kd)


def _reference(s, ids, vals, y, div, tail, r, T, t2):
    """(mixed, ce, kd) and d mixed / d s by autograd through sparse_support (what the unfused objective computes)."""
    s = s.detach().clone().requires_grad_(True)
    ce = F.cross_entropy(s, y, reduction="sum")
    s_for_kd = s if r != 0.0 else s.detach()
    s_sup, t_sup = sparse_support(KF.log_probs(s_for_kd, T), ids, vals, tail)
    kd = div.per_token(s_sup, t_sup).sum() * (T**2 if t2 else 1.0)
    mixed = _mix(r)(ce, kd)
    (grad,) = torch.autograd.grad(mixed, s)
    return mixed.detach(), ce.detach(), kd.detach(), grad


def _fast(s, ids, vals, y, div, tail, r, T, t2, overwrite=False, grad_scale=1.0):
    s = s.detach().clone().requires_grad_(True)
    leaf = s
    if overwrite:  # as inside fused_linear_loss: the chunk loss may overwrite its logits with their gradient
        s = s.detach().clone().requires_grad_(True)
    mixed, ce, kd = ce_sparse_kd(
        s, ids, vals, y, divergence=div.per_token, tail=tail, kd_ratio=r, temperature=T,
        scale=T**2 if t2 else 1.0, mix=_mix(r), overwrite_logits=overwrite,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(mixed * grad_scale, s)
    del leaf
    return mixed.detach(), ce, kd, grad


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("k", [1, 7, V])
@pytest.mark.parametrize("r,T,t2", [(0.5, 1.0, True), (0.3, 2.0, True), (0.7, 0.7, False), (0.0, 1.0, True),
                                    (1.0, 1.5, True)])  # fmt: skip
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_equals_the_autograd_sparse_reference(name: str, r: float, T: float, t2: bool, k: int, tail: str) -> None:
    div = DIVERGENCES[name]
    s, ids, vals, y, _ = _inputs(0, k, T)
    ref = _reference(s, ids, vals, y, div, tail, r, T, t2)
    got = _fast(s, ids, vals, y, div, tail, r, T, t2)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("k", [7, V])
def test_row_blocks_equal_one_block(monkeypatch, T: float, k: int, tail: str) -> None:
    """Blocks of a few rows (a CPU's, with a partial last one) and the whole chunk as one block (an accelerator's)
    give bit-identical values and gradients."""
    div = DIVERGENCES["forward_kl"]
    s, ids, vals, y, _ = _inputs(2, k, T, dtype=torch.float32)
    whole = _fast(s, ids, vals, y, div, tail, 0.5, T, True, overwrite=True)  # N * V < BLOCK_ELEMENTS: one block
    monkeypatch.setattr(sparse_fused, "BLOCK_ELEMENTS", 4 * V)  # blocks of 4 rows: 4, ..., 4, 3
    blocked = _fast(s, ids, vals, y, div, tail, 0.5, T, True, overwrite=True)
    for a, b in zip(whole, blocked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd_0.3"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fp32_bf16_values_overwrite_and_incoming_gradient(name: str, T: float, tail: str) -> None:
    """fp32 logits with bf16 cache values, the gradient written into the logits' storage, and a scaled backward."""
    div = DIVERGENCES[name]
    s, ids, vals, y, _ = _inputs(1, 9, T, dtype=torch.float32, value_dtype=torch.bfloat16)
    ref = _reference(s, ids, vals, y, div, tail, 0.5, T, True)
    got = _fast(s, ids, vals, y, div, tail, 0.5, T, True, overwrite=True, grad_scale=3.0)
    for a, b in zip(got[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[3], 3.0 * ref[3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "symmetric_kl", "jsd_0.3", "tvd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_k_equals_v_is_the_dense_loss(name: str, T: float) -> None:
    """k = V (either tail mode): CE + the dense divergence of the full teacher distribution, values and gradients."""
    div = DIVERGENCES[name]
    for tail in TAIL_MODES:
        s, ids, vals, y, t = _inputs(2, V, T)
        s_leaf = s.clone().requires_grad_(True)
        ce = F.cross_entropy(s_leaf, y, reduction="sum")
        kd = div.per_token(KF.log_probs(s_leaf, T), KF.log_probs(t, T)).sum() * T**2
        dense = 0.6 * ce + 0.4 * kd
        (g_dense,) = torch.autograd.grad(dense, s_leaf)
        mixed, ce_f, kd_f, g = _fast(s, ids, vals, y, div, tail, 0.4, T, True)
        torch.testing.assert_close(mixed, dense.detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(kd_f, kd.detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(g, g_dense, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd_0.3"])
def test_tiny_student_tail_mass(name: str, T: float) -> None:
    """Rows whose student puts < e^-60 outside the teacher's top-k (the p / Q route would leave fp32's range): the
    tail's gradient is computed exactly there, in fp64 and (finite, equal) in fp32."""
    div = DIVERGENCES[name]
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        s, ids, vals, y, _ = _inputs(3, 5, T, dtype=dtype)
        s = s.clone()
        rows = torch.arange(0, N, 2)
        s[rows] = -40.0 * T  # every token unlikely ...
        s[rows[:, None], ids[rows].long()] = 60.0 * T  # ... except the teacher's top-k: tail mass ~e^-100
        ref = _reference(s, ids, vals, y, div, "bucket", 0.5, T, True)
        got = _fast(s, ids, vals, y, div, "bucket", 0.5, T, True)
        assert torch.isfinite(got[3]).all()
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_no_gradient_under_no_grad_and_kd_ratio_zero_gives_the_ce_gradient() -> None:
    s, ids, vals, y, _ = _inputs(4, 6, 1.0)
    with torch.no_grad():
        mixed, ce, kd = ce_sparse_kd(
            s, ids, vals, y, divergence=L.ForwardKLLoss().per_token, tail="bucket", kd_ratio=0.5, temperature=1.0,
            scale=1.0, mix=_mix(0.5),
        )  # fmt: skip
    assert not mixed.requires_grad and kd > 0
    torch.testing.assert_close(mixed, 0.5 * ce + 0.5 * kd)
    _, _, kd0, g0 = _fast(s, ids, vals, y, L.ForwardKLLoss(), "bucket", 0.0, 1.0, True)
    s_leaf = s.clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(s_leaf, y, reduction="sum"), s_leaf)
    torch.testing.assert_close(g0, g_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd0, kd)


# ---------------------------------------------------------------------------------------- through the objective
class _InMemoryCache(L.CachedTeacher):
    """A CachedTeacher whose top-k come from a teacher model in memory (the cache's lookup is tested elsewhere)."""

    def __init__(self, teacher, k: int, T: float, tail: str) -> None:  # no cache directory
        self.teacher, self.k, self.T, self.tail = teacher, k, T, tail

    def prepare(self, batch, mask):
        with torch.no_grad():
            logits = self.teacher(batch["tokens"])[:, :-1][mask].double()  # [N, V]
        vals, ids = torch.log_softmax(logits / self.T, -1).topk(self.k, -1)
        return ids, vals


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("kd_loss,kd_ratio,T", [(L.ForwardKLLoss(), 0.5, 1.0), (L.ReverseKLLoss(), 0.3, 2.0),
                                                (L.JSDLoss(beta=0.3), 1.0, 1.0), (L.ForwardKLLoss(), 0.0, 1.0)])  # fmt: skip
@pytest.mark.parametrize("tie", [False, True])
def test_objective_fused_equals_unfused_with_a_cached_teacher(kd_loss, kd_ratio, T, tie, tail, monkeypatch) -> None:
    from tests.losses.test_objective import _batch, _frozen, _model, _params

    calls = []
    original = objective_module.ce_sparse_kd
    monkeypatch.setattr(objective_module, "ce_sparse_kd", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    vocab = 64
    student = _model(vocab, tie=tie).double()  # fp64: the two paths agree to rounding, 1e-9
    source = _InMemoryCache(_frozen(_model(vocab, dim=48, seed=1)).double(), k=8, T=T, tail=tail)
    batch = _batch(vocab)
    outs = []
    for fused in (False, True):
        obj = L.DistillationObjective(
            kd_loss, teacher=source, kd_ratio=kd_ratio, temperature=T, fused=fused, num_output_chunks=2
        )
        out = obj(student, batch)
        outs.append((out, torch.autograd.grad(out.loss_sum, _params(student), allow_unused=True)))
    assert len(calls) == 2  # the fused run took the sparse path, chunk by chunk
    (a, ga), (b, gb) = outs
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.detach().double(), y.detach().double(), rtol=1e-9, atol=1e-9)
    for x, y in zip(ga, gb, strict=True):
        if x is None or y is None:
            assert (x is None or x.abs().max() == 0) and (y is None or y.abs().max() == 0)
        else:
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # evaluation: the same sums, no gradient
        ev = L.DistillationObjective(kd_loss, teacher=source, kd_ratio=kd_ratio, temperature=T)(student, batch)
    torch.testing.assert_close(ev.loss_sum, b.loss_sum.detach(), rtol=1e-9, atol=1e-9)
