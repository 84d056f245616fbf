"""fused_linear_loss (gradients computed in forward, chunk by chunk) vs plain autograd on full logits."""

import pytest
import torch
import torch.nn.functional as F

import kdtune.losses as L
from kdtune.errors import ConfigError
from kdtune.losses import fused as FU
from kdtune.models.llama import llama
from kdtune.models.modules.lora import apply_lora

D, DT, V = 16, 24, 50

DIVERGENCES = {
    "ce_only": None,
    "forward_kl": lambda T: L.ForwardKLLoss(temperature=T),
    "reverse_kl": lambda T: L.ReverseKLLoss(temperature=T),
    "jsd_0.3": lambda T: L.JSDLoss(beta=0.3, temperature=T),
    "jsd_0.5_unnormalized": lambda T: L.JSDLoss(beta=0.5, normalize=False, temperature=T),
    "symmetric_kl": lambda T: L.SymmetricKLLoss(temperature=T),
    "skew_forward_kl": lambda T: L.SkewForwardKLLoss(alpha=0.1, temperature=T),
    "skew_reverse_kl": lambda T: L.SkewReverseKLLoss(alpha=0.2, temperature=T),
    "tvd": lambda T: L.TVDLoss(temperature=T),
}


def _inputs(n: int, vocab_t: int = V, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, D, generator=g) * 1.5).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.7).to(dtype)
    ht = (torch.randn(n, DT, generator=g) * 1.5).to(dtype)
    wt = (torch.randn(vocab_t, DT, generator=g) * 0.7).to(dtype)
    y = torch.randint(0, V, (n,), generator=g)
    return h, w, ht, wt, y


def _reference(h, w, ht, wt, y, kd_loss, kd_ratio):
    """Plain autograd on the full logits with the existing functional losses (independent log-softmaxes)."""
    s = h @ w.t()  # [N, V]
    ce = F.cross_entropy(s, y, reduction="sum")
    if kd_loss is None:
        return ce, ce, torch.zeros(())
    with torch.no_grad():
        t = (ht @ wt.t())[:, : s.shape[-1]]
    kd = kd_loss.loss_sum(s, t)
    return (1 - kd_ratio) * ce + kd_ratio * kd, ce, kd


def _fused(h, w, ht, wt, y, kd_loss, kd_ratio, **chunking):
    if kd_loss is None:
        chunk_loss = FU.dense_kd_chunk_loss(y, kd_ratio=kd_ratio)
    else:
        chunk_loss = FU.dense_kd_chunk_loss(
            y,
            kd_ratio=kd_ratio,
            temperature=kd_loss.temperature,
            divergence=FU.logprob_divergence(kd_loss),
            teacher_logits=lambda rows: ht[rows] @ wt.t(),
            scale_by_temperature_squared=kd_loss.scale_by_temperature_squared,
        )
    return FU.fused_linear_loss(h, w, chunk_loss, **chunking)


def _run_both(dtype, name, T, kd_ratio, vocab_t=V, n=37, **chunking):
    kd_loss = DIVERGENCES[name](T) if DIVERGENCES[name] else None
    h, w, ht, wt, y = _inputs(n, vocab_t, dtype)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, parts = _fused(h1, w1, ht, wt, y, kd_loss, kd_ratio, **chunking)
    (loss / 7.0).backward()  # a non-unit incoming gradient exercises the scaling in backward
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref, ref_ce, ref_kd = _reference(h2, w2, ht, wt, y, kd_loss, kd_ratio)
    (ref / 7.0).backward()
    return (loss, parts, h1.grad, w1.grad), (ref, ref_ce, ref_kd, h2.grad, w2.grad)


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_matches_autograd_float64(name, T):
    (loss, parts, gh, gw), (ref, ce, kd, rgh, rgw) = _run_both(torch.float64, name, T, 0.4, rows_per_chunk=8)
    tol = {"rtol": 1e-11, "atol": 1e-11}
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(parts.ce_sum, ce, **tol)
    torch.testing.assert_close(parts.kd_sum, kd.to(parts.kd_sum.dtype), **tol)
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
    (_, _, gh_ce, _), _ = _run_both(torch.float64, "ce_only", 1.0, 0.0)
    torch.testing.assert_close(gh, gh_ce)


def test_kd_ratio_one():
    (loss, parts, gh, gw), (ref, ce, kd, rgh, rgw) = _run_both(torch.float64, "reverse_kl", 1.5, 1.0)
    torch.testing.assert_close(loss, kd)
    torch.testing.assert_close(parts.ce_sum, ce)
    torch.testing.assert_close(gh, rgh)
    torch.testing.assert_close(gw, rgw)


def test_chunking_does_not_change_results():
    results = [
        _run_both(torch.float64, "forward_kl", 2.0, 0.5, **kw)[0]
        for kw in ({"rows_per_chunk": 1}, {"num_output_chunks": 5}, {}, {"memory_budget_bytes": 1})
    ]
    for other in results[1:]:
        for a, b in zip((results[0][0], results[0][2], results[0][3]), (other[0], other[2], other[3])):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_frozen_weight_gets_no_gradient_and_hidden_does():
    h, w, ht, wt, y = _inputs(20, dtype=torch.float64)
    h1 = h.clone().requires_grad_()
    kd_loss = L.ForwardKLLoss()
    loss, _ = _fused(h1, w, ht, wt, y, kd_loss, 0.5)
    loss.backward()
    h2 = h.clone().requires_grad_()
    _reference(h2, w, ht, wt, y, kd_loss, 0.5)[0].backward()
    assert w.grad is None
    torch.testing.assert_close(h1.grad, h2.grad)


def test_empty_batch():
    h, w, ht, wt, y = _inputs(0)
    h.requires_grad_()
    w.requires_grad_()
    loss, parts = _fused(h, w, ht, wt, y, L.ForwardKLLoss(), 0.5)
    assert loss.item() == 0.0 and parts.ce_sum.item() == 0.0 and parts.kd_sum.item() == 0.0 and parts.num_rows == 0
    loss.backward()
    assert h.grad.shape == (0, D)
    assert w.grad is None or not w.grad.any()


def test_no_grad_evaluation_computes_no_gradient():
    h, w, ht, wt, y = _inputs(30, dtype=torch.float64)
    h.requires_grad_()
    w.requires_grad_()
    calls = []

    def spy(logits, rows):
        calls.append(logits.requires_grad)
        return inner(logits, rows)

    inner = FU.dense_kd_chunk_loss(
        y, divergence=FU.logprob_divergence(L.ForwardKLLoss()), teacher_logits=lambda r: ht[r] @ wt.t()
    )
    with torch.no_grad():
        loss, parts = FU.fused_linear_loss(h, w, spy, rows_per_chunk=8)
    assert not loss.requires_grad and calls == [False] * 4
    ref = _reference(h.detach(), w.detach(), ht, wt, y, L.ForwardKLLoss(), 0.5)
    torch.testing.assert_close(loss, ref[0])
    torch.testing.assert_close(parts.kd_sum, ref[2])


def test_backward_twice_raises():
    h, w, ht, wt, y = _inputs(10)
    h.requires_grad_()
    loss, _ = _fused(h, w, ht, wt, y, None, 0.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bf16_grads_in_param_dtype():
    h, w, ht, wt, y = _inputs(40)
    kd_loss = L.ForwardKLLoss(temperature=2.0)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss, parts = _fused(hb, wb, ht.bfloat16(), wt.bfloat16(), y, kd_loss, 0.5, rows_per_chunk=16)
    loss.backward()
    assert loss.dtype == torch.float32 and hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    # Same computation through plain autograd in bf16 (matmul in bf16, loss in fp32).
    h2, w2 = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    s = (h2 @ w2.t()).float()
    with torch.no_grad():
        t = (ht.bfloat16() @ wt.bfloat16().t()).float()
    ref = 0.5 * F.cross_entropy(s, y, reduction="sum") + 0.5 * kd_loss.loss_sum(s, t)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hb.grad.float(), h2.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(wb.grad.float(), w2.grad.float(), rtol=2e-2, atol=5e-2)


# ------------------------------------------------------------------------------------------ real models, objective
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


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (3, 11), generator=g)
    labels = tokens.clone()
    labels[:, :3] = -100
    labels[-1, 6:] = -100
    return tokens, labels


def _fused_objective(student, teacher, tokens, labels, kd_loss, kd_ratio):
    """What the objective does with the fused path: gather trained rows, run the fused loss."""
    mask = labels[:, 1:] != -100
    h = student(tokens, return_hidden=True)[:, :-1][mask]  # [N, D]
    with torch.inference_mode():
        t_hidden = teacher(tokens, return_hidden=True)
    ht = t_hidden[:, :-1][mask]  # [N, Dt], an inference tensor: used under no_grad only
    wt = FU.fused_output_weight(teacher)
    chunk_loss = FU.dense_kd_chunk_loss(
        labels[:, 1:][mask],
        kd_ratio=kd_ratio,
        temperature=kd_loss.temperature,
        divergence=FU.logprob_divergence(kd_loss),
        teacher_logits=lambda rows: ht[rows] @ wt.t(),
    )
    return FU.fused_linear_loss(h, FU.fused_output_weight(student), chunk_loss, rows_per_chunk=7)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kd_cls", [L.ForwardKLLoss, L.ReverseKLLoss])
def test_equals_distillation_objective(tie, kd_cls):
    """Values and gradients of every student parameter equal today's objective; tied weights included."""
    student, teacher = _model(64, 16, tie, 0), _model(70, 24, False, 1).requires_grad_(False).eval()
    tokens, labels = _batch(64)
    kd_loss = kd_cls(temperature=2.0)
    loss, parts = _fused_objective(student, teacher, tokens, labels, kd_loss, 0.5)
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t_hidden = teacher(tokens, return_hidden=True)
    ref = L.distillation_objective(
        student(tokens, return_hidden=True), t_hidden, student, teacher, labels, kd_loss, 0.5, num_output_chunks=3
    )
    ref.mixed_sum(0.5).backward()
    tol = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(loss, ref.mixed_sum(0.5), **tol)
    torch.testing.assert_close(parts.ce_sum, ref.class_loss_sum, **tol)
    torch.testing.assert_close(parts.kd_sum, ref.kd_loss_sum, **tol)
    assert parts.num_rows == int(ref.num_tokens)
    for n, p in student.named_parameters():
        torch.testing.assert_close(fused_grads[n], p.grad, **tol, msg=lambda m, n=n: f"{n}: {m}")


def test_lora_output_effective_weight():
    def lora_student():
        m = _model(64, 16, False, 0)
        return apply_lora(m, ["q_proj", "v_proj"], apply_lora_to_output=True, lora_rank=4, lora_alpha=8)

    student, teacher = lora_student(), _model(64, 24, False, 1).requires_grad_(False).eval()
    torch.manual_seed(5)
    for n, p in student.named_parameters():
        if "lora_b" in n:
            torch.nn.init.normal_(p, std=0.3)  # non-zero update so the effective weight differs from the base
    twin = lora_student()
    twin.load_state_dict(student.state_dict())
    tokens, labels = _batch(64)
    kd_loss = L.ForwardKLLoss()
    loss, _ = _fused_objective(student, teacher, tokens, labels, kd_loss, 0.5)
    loss.backward()
    with torch.no_grad():
        t_hidden = teacher(tokens, return_hidden=True)
    ref = L.distillation_objective(twin(tokens, return_hidden=True), t_hidden, twin, teacher, labels, kd_loss, 0.5)
    ref.mixed_sum(0.5).backward()
    torch.testing.assert_close(loss, ref.mixed_sum(0.5), rtol=1e-6, atol=1e-6)
    trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert any("output.lora" in n for n, _ in trained)
    for (n, p), q in zip(trained, [q for q in twin.parameters() if q.requires_grad]):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_output_weight_falls_back():
    m = _model(64, 16, False, 0)
    assert FU.fused_output_weight(m) is m.output.weight
    assert FU.fused_output_weight(_model(64, 16, True, 0)) is not None
    drop = apply_lora(_model(64, 16, False, 0), ["q_proj"], apply_lora_to_output=True, lora_dropout=0.1).train()
    assert FU.fused_output_weight(drop) is None
    assert FU.fused_output_weight(drop.eval()) is not None
    sharded = _model(64, 16, False, 0)
    sharded.output.weight.device_mesh = object()  # what a DTensor (FSDP) weight has
    assert FU.fused_output_weight(sharded) is None
    biased = _model(64, 16, False, 0)
    biased.output = torch.nn.Linear(16, 64, bias=True)
    assert FU.fused_output_weight(biased) is None


# ----------------------------------------------------------------------------------------------- sparse support
def _sparse_reference(s, t_full, y, ids, kd_loss_div, T, kd_ratio, tail):
    """Full logits -> top-k support (+ tail) -> divergence, straightforwardly."""
    ce = F.cross_entropy(s, y, reduction="sum")
    s_p = torch.softmax(s / T, -1).gather(1, ids)  # [N, k]
    t_p = torch.softmax(t_full / T, -1).gather(1, ids)
    if tail:
        s_sup = torch.cat([s_p, 1 - s_p.sum(-1, keepdim=True)], -1).log()
        t_sup = torch.cat([t_p, 1 - t_p.sum(-1, keepdim=True)], -1).log()
    else:
        s_sup = (s_p / s_p.sum(-1, keepdim=True)).log()
        t_sup = (t_p / t_p.sum(-1, keepdim=True)).log()
    kd = kd_loss_div(s_sup, t_sup).sum() * T**2
    return (1 - kd_ratio) * ce + kd_ratio * kd, ce, kd


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("kd_cls", [L.ForwardKLLoss, L.ReverseKLLoss, lambda: L.JSDLoss(beta=0.3)])
def test_sparse_support_matches_reference(tail, kd_cls):
    T, k = 2.0, 5
    h, w, ht, wt, y = _inputs(23, dtype=torch.float64)
    t_full = ht @ wt.t()
    t_logp_all = torch.log_softmax(t_full / T, -1)
    t_logp, ids = t_logp_all.topk(k, dim=-1)
    div = FU.logprob_divergence(kd_cls())
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    chunk_loss = FU.sparse_kd_chunk_loss(y, ids, t_logp, kd_ratio=0.5, temperature=T, divergence=div, tail=tail)
    loss, parts = FU.fused_linear_loss(h1, w1, chunk_loss, rows_per_chunk=6)
    loss.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref, ce, kd = _sparse_reference(h2 @ w2.t(), t_full, y, ids, div, T, 0.5, tail)
    ref.backward()
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(parts.kd_sum, kd, **tol)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


# ----------------------------------------------------------------------------------------------------- sizing
def test_rows_per_chunk_for_budget():
    assert FU.rows_per_chunk_for(128256, 512 * 2**20) == 130
    assert FU.rows_per_chunk_for(128256, 1) == FU.MIN_ROWS_PER_CHUNK
    assert FU.rows_per_chunk_for(100, 2**40) == FU.MAX_ROWS_PER_CHUNK
    with pytest.raises(ConfigError, match="loss_memory_budget"):
        FU.rows_per_chunk_for(100, 0)


def test_chunk_slices():
    assert FU.chunk_slices(0, 10) == []
    assert FU.chunk_slices(10, 10, rows_per_chunk=4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert FU.chunk_slices(10, 10, num_output_chunks=3) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert FU.chunk_slices(2, 10, num_output_chunks=8) == [slice(0, 1), slice(1, 2)]
    assert FU.chunk_slices(5000, 128256) == [slice(s, min(s + 130, 5000)) for s in range(0, 5000, 130)]
    with pytest.raises(ConfigError, match="num_output_chunks"):
        FU.chunk_slices(10, 10, num_output_chunks=0)
    with pytest.raises(ConfigError, match="loss_rows_per_chunk"):
        FU.chunk_slices(10, 10, rows_per_chunk=-1)


def test_unknown_divergence_raises():
    class Custom(L.KDLoss):
        def per_token(self, s, t):
            return (s - t).sum(-1)

    with pytest.raises(TypeError, match="unfused objective"):
        FU.logprob_divergence(Custom())


# ------------------------------------------------------------------------------- analytic forward KL / CE path
@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("vocab_t", [V, V + 6, V - 5])  # padded teacher; a smaller teacher vocabulary
@pytest.mark.parametrize("t2", [True, False])
def test_forward_kl_analytic_matches_autograd(kd_ratio, T, vocab_t, t2):
    kd_loss = L.ForwardKLLoss(temperature=T, scale_by_temperature_squared=t2)
    h, w, ht, wt, y = _inputs(29, vocab_t, torch.float64)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    chunk_loss = FU.kd_chunk_loss(y, kd_loss, lambda rows: ht[rows] @ wt.t(), kd_ratio)
    loss, parts = FU.fused_linear_loss(h1, w1, chunk_loss, rows_per_chunk=8)
    (loss * 0.3).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    s = h2 @ w2.t()
    vocab = min(V, vocab_t)
    ce = F.cross_entropy(s, y, reduction="sum")
    kd = kd_loss.loss_sum(s[:, :vocab], (ht @ wt.t())[:, :vocab])
    ref = (1 - kd_ratio) * ce + kd_ratio * kd
    (ref * 0.3).backward()
    tol = {"rtol": 1e-11, "atol": 1e-11}
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(parts.ce_sum, ce, **tol)
    torch.testing.assert_close(parts.kd_sum, kd, **tol)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_forward_kl_analytic_float32_and_ce_only(T):
    (loss, parts, gh, gw), (ref, ce, kd, rgh, rgw) = _run_both(torch.float32, "forward_kl", T, 0.5, num_output_chunks=3)
    h, w, ht, wt, y = _inputs(37)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    chunk_loss = FU.kd_chunk_loss(y, L.ForwardKLLoss(temperature=T), lambda rows: ht[rows] @ wt.t(), 0.5)
    fast, fast_parts = FU.fused_linear_loss(h1, w1, chunk_loss, num_output_chunks=3)
    (fast / 7.0).backward()
    tol = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(fast, ref, **tol)
    torch.testing.assert_close(fast_parts.kd_sum, kd, **tol)
    torch.testing.assert_close(h1.grad, rgh, **tol)
    torch.testing.assert_close(w1.grad, rgw, **tol)
    # CE only (fine-tuning)
    h2 = h.clone().requires_grad_()
    ce_only, ce_parts = FU.fused_linear_loss(h2, w, FU.kd_chunk_loss(y, None, None, 0.0))
    ce_only.backward()
    h3 = h.clone().requires_grad_()
    F.cross_entropy(h3 @ w.t(), y, reduction="sum").backward()
    torch.testing.assert_close(ce_only, ce, **tol)
    assert ce_parts.kd_sum.item() == 0.0
    torch.testing.assert_close(h2.grad, h3.grad, **tol)


def test_forward_kl_analytic_teacher_zero_probabilities():
    """A teacher logit of −inf (probability 0) contributes 0, as in the functional forward KL."""
    h, w, ht, wt, y = _inputs(12, dtype=torch.float64)
    t_logits = ht @ wt.t()
    t_logits[:, 3] = float("-inf")
    h1 = h.clone().requires_grad_()
    loss, parts = FU.fused_linear_loss(h1, w, FU.kd_chunk_loss(y, L.ForwardKLLoss(), lambda r: t_logits[r], 0.5))
    loss.backward()
    h2 = h.clone().requires_grad_()
    s = h2 @ w.t()
    ref = 0.5 * F.cross_entropy(s, y, reduction="sum") + 0.5 * L.forward_kl(s, t_logits)
    ref.backward()
    assert torch.isfinite(parts.kd_sum)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h1.grad, h2.grad)


def test_kd_chunk_loss_selects_generic_for_other_divergences():
    (loss, _, gh, _), (ref, _, _, rgh, _) = _run_both(torch.float64, "reverse_kl", 2.0, 0.5)
    h, w, ht, wt, y = _inputs(37, dtype=torch.float64)
    h1 = h.clone().requires_grad_()
    out, _ = FU.fused_linear_loss(
        h1, w, FU.kd_chunk_loss(y, L.ReverseKLLoss(temperature=2.0), lambda r: ht[r] @ wt.t(), 0.5)
    )
    (out / 7.0).backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h1.grad, rgh)


# ------------------------------------------------------------------------------ fused_distillation_objective
@pytest.mark.parametrize(
    "case", ["forward_kl", "reverse_kl_T2", "kd_ratio_0", "no_teacher", "fallback_bias", "tied_padded_teacher"]
)
def test_fused_distillation_objective_equals_distillation_objective(case):
    tie = case == "tied_padded_teacher"
    student = _model(64, 16, tie, 0)
    teacher = _model(72 if tie else 64, 24, False, 1).requires_grad_(False).eval()
    if case == "fallback_bias":
        student.output = torch.nn.Linear(16, 64, bias=True)
    kd_loss = L.ReverseKLLoss(temperature=2.0) if case == "reverse_kl_T2" else L.ForwardKLLoss()
    kd_ratio = 0.0 if case == "kd_ratio_0" else 0.5
    use_teacher = case != "no_teacher"
    tokens, labels = _batch(64)
    with torch.inference_mode():
        t_hidden = teacher(tokens, return_hidden=True) if use_teacher else None
    out = FU.fused_distillation_objective(
        student(tokens, return_hidden=True),
        t_hidden,
        student,
        teacher if use_teacher else None,
        labels,
        kd_loss if use_teacher else None,
        kd_ratio,
        rows_per_chunk=5,
    )
    (out.loss_sum / out.num_tokens).backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t_plain = teacher(tokens, return_hidden=True) if use_teacher else None
    ref = L.distillation_objective(
        student(tokens, return_hidden=True),
        t_plain,
        student,
        teacher if use_teacher else None,
        labels,
        kd_loss if use_teacher else None,
        kd_ratio,
        num_output_chunks=3,
    )
    mixed = ref.mixed_sum(kd_ratio if use_teacher else 0.0)
    (mixed / ref.num_tokens).backward()
    tol = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(out.loss_sum, mixed, **tol)
    torch.testing.assert_close(out.class_loss_sum, ref.class_loss_sum.detach(), **tol)
    torch.testing.assert_close(out.kd_loss_sum, ref.kd_loss_sum.detach(), **tol)
    assert not out.class_loss_sum.requires_grad and not out.kd_loss_sum.requires_grad
    assert int(out.num_tokens) == int(ref.num_tokens)
    if case == "kd_ratio_0":
        assert out.kd_loss_sum > 0  # logged
    for n, p in student.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, **tol, msg=lambda m, n=n: f"{n}: {m}")


def test_fused_distillation_objective_all_masked_and_eval():
    student, teacher = _model(64, 16, False, 0), _model(64, 24, False, 1).requires_grad_(False).eval()
    tokens, labels = _batch(64)
    hidden = student(tokens, return_hidden=True)
    with torch.no_grad():
        t_hidden = teacher(tokens, return_hidden=True)
    masked = torch.full_like(labels, -100)
    out = FU.fused_distillation_objective(hidden, t_hidden, student, teacher, masked, L.ForwardKLLoss(), 0.5)
    assert int(out.num_tokens) == 0 and out.loss_sum.item() == 0.0
    out.loss_sum.backward()  # an all-masked micro-batch must not break the step
    with torch.no_grad():
        ev = FU.fused_distillation_objective(
            student(tokens, return_hidden=True), t_hidden, student, teacher, labels, L.ForwardKLLoss(), 0.5
        )
        ref = L.distillation_objective(
            student(tokens, return_hidden=True), t_hidden, student, teacher, labels, L.ForwardKLLoss(), 0.5
        )
    assert not ev.loss_sum.requires_grad
    torch.testing.assert_close(ev.loss_sum, ref.mixed_sum(0.5), rtol=1e-6, atol=1e-6)


def test_sparse_tail_finite_when_top_k_holds_all_mass():
    """A student (and teacher) so peaked that the top-k mass rounds to 1: tail floored, gradients finite."""
    h, w, ht, wt, y = _inputs(8)
    w = w * 200.0  # huge logits: softmax mass all in the top entry (fp32)
    t_logp, ids = torch.log_softmax(ht @ wt.t() * 200.0, -1).topk(3, dim=-1)
    h.requires_grad_()
    w.requires_grad_()
    for kd_cls in (L.ForwardKLLoss, L.ReverseKLLoss):
        div = FU.logprob_divergence(kd_cls())
        loss, parts = FU.fused_linear_loss(h, w, FU.sparse_kd_chunk_loss(y, ids, t_logp, divergence=div))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(parts.kd_sum)
        assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
        h.grad = w.grad = None


def test_log1mexp_values_and_finite_gradients():
    x = torch.tensor([0.0, -1e-12, -1e-6, -0.5, -0.6931, -0.6932, -3.0, -40.0, -200.0], requires_grad=True)
    out = FU._log1mexp(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    ref = torch.log1p(-torch.exp(x.detach().double()))  # float64: accurate enough away from 0
    torch.testing.assert_close(out[3:].double(), ref[3:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[2].double(), torch.log(torch.tensor(1e-6, dtype=torch.float64)), rtol=1e-5, atol=0)
    assert out[0] < -60  # log(1 − exp(0)) = −inf, kept finite
