"""distillation_objective (chunked, from hidden states) vs the direct full-logits computation."""

import pytest
import torch
import torch.nn.functional as F

import kdtune.losses as L
from kdtune.models.llama import llama


def _model(vocab: int, dim: int = 32, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    m = llama(
        vocab_size=vocab,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=dim,
        intermediate_dim=64,
        max_seq_len=64,
        tie_word_embeddings=tie,
    )
    for p in m.parameters():  # larger random weights so the distributions differ noticeably
        torch.nn.init.normal_(p, std=0.2)
    return m


def _batch(vocab: int, B: int = 3, T: int = 11):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    labels = tokens.clone()
    labels[:, :3] = -100  # prompt
    labels[-1, 6:] = -100  # padding
    return tokens, labels


def _direct(student, teacher, tokens, labels, kd_loss, vocab_kd):
    s_logits = student(tokens)[:, :-1].float()
    tgt = labels[:, 1:]
    ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), tgt.reshape(-1), reduction="sum")
    if teacher is None:
        return ce, torch.zeros(())
    with torch.no_grad():
        t_logits = teacher(tokens)[:, :-1].float()[..., :vocab_kd]
    kd = kd_loss.loss_sum(s_logits[..., :vocab_kd], t_logits, tgt)
    return ce, kd


@pytest.mark.parametrize("chunks,ckpt", [(1, True), (4, True), (4, False), (100, True)])
@pytest.mark.parametrize("loss_cls", [L.ForwardKLLoss, L.ReverseKLLoss])
def test_objective_matches_full_logits(chunks, ckpt, loss_cls):
    V = 64
    student, teacher = _model(V, seed=0), _model(V, dim=48, seed=1).requires_grad_(False).eval()
    tokens, labels = _batch(V)
    kd_loss = loss_cls(temperature=2.0)

    out = L.distillation_objective(
        student(tokens, return_hidden=True),
        teacher(tokens, return_hidden=True),
        student,
        teacher,
        labels,
        kd_loss,
        0.5,
        chunks,
        checkpoint_chunks=ckpt,
    )
    assert int(out.num_tokens) == int((labels[:, 1:] != -100).sum())
    loss = out.mixed_sum(0.5)
    grads = torch.autograd.grad(loss, list(student.parameters()))

    ce, kd = _direct(student, teacher, tokens, labels, kd_loss, V)
    ref_grads = torch.autograd.grad(0.5 * ce + 0.5 * kd, list(student.parameters()))
    torch.testing.assert_close(out.class_loss_sum, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd_loss_sum, kd, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_padded_teacher_vocab_is_sliced_to_student():
    Vs, Vt = 64, 80  # teacher output padded with 16 extra rows (like Qwen2.5-14B vs 3B)
    student, teacher = _model(Vs, tie=True, seed=0), _model(Vt, seed=1).requires_grad_(False).eval()
    with torch.no_grad():
        teacher.output.weight[Vs:] = 5.0  # padded rows get large logits: must not influence the KD term
    tokens, labels = _batch(Vs)
    kd_loss = L.ForwardKLLoss()
    out = L.distillation_objective(
        student(tokens, return_hidden=True),
        teacher(tokens, return_hidden=True),
        student,
        teacher,
        labels,
        kd_loss,
        0.5,
        3,
    )
    ce, kd = _direct(student, teacher, tokens, labels, kd_loss, Vs)
    torch.testing.assert_close(out.class_loss_sum, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd_loss_sum, kd, rtol=1e-5, atol=1e-5)


def test_padded_student_vocab_compares_shared_rows_only():
    Vs, Vt = 80, 64  # the student is the padded one: KD uses the first 64 logits of both, CE the student's 80
    student, teacher = _model(Vs, seed=0), _model(Vt, seed=1).requires_grad_(False).eval()
    tokens, labels = _batch(Vt)
    kd_loss = L.JSDLoss(beta=0.3)
    out = L.distillation_objective(
        student(tokens, return_hidden=True),
        teacher(tokens, return_hidden=True),
        student,
        teacher,
        labels,
        kd_loss,
        0.5,
        2,
    )
    ce, kd = _direct(student, teacher, tokens, labels, kd_loss, Vt)
    torch.testing.assert_close(out.class_loss_sum, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd_loss_sum, kd, rtol=1e-5, atol=1e-5)


def test_all_masked_batch_is_zero_and_backward_works():
    V = 64
    student, teacher = _model(V), _model(V, seed=1).requires_grad_(False)
    tokens, labels = _batch(V)
    labels[:] = -100
    out = L.distillation_objective(
        student(tokens, return_hidden=True),
        teacher(tokens, return_hidden=True),
        student,
        teacher,
        labels,
        L.ForwardKLLoss(),
        0.5,
        4,
    )
    assert int(out.num_tokens) == 0 and out.class_loss_sum.item() == 0.0 and out.kd_loss_sum.item() == 0.0
    out.mixed_sum(0.5).backward()
    assert all(
        p.grad is None or (torch.isfinite(p.grad).all() and p.grad.abs().max() == 0) for p in student.parameters()
    )


class _Exploding(torch.nn.Module):
    def output_logits(self, hidden):
        raise AssertionError("the teacher must not be evaluated without teacher hidden states")


def test_kd_ratio_zero_logs_kd_without_gradient():
    V = 64
    student, teacher = _model(V), _model(V, dim=48, seed=1).requires_grad_(False).eval()
    tokens, labels = _batch(V)
    th = teacher(tokens, return_hidden=True)
    h = student(tokens, return_hidden=True)
    at0 = L.distillation_objective(h, th, student, teacher, labels, L.ForwardKLLoss(), 0.0, 4)
    at5 = L.distillation_objective(h, th, student, teacher, labels, L.ForwardKLLoss(), 0.5, 4)
    torch.testing.assert_close(at0.kd_loss_sum, at5.kd_loss_sum)  # logged value is the same KD
    grads = torch.autograd.grad(at0.kd_loss_sum, list(student.parameters()), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)  # ... but it trains nothing


def test_no_teacher_hidden_skips_teacher_and_ce_objective():
    V = 64
    student = _model(V)
    tokens, labels = _batch(V)
    h = student(tokens, return_hidden=True)
    out = L.distillation_objective(h, None, student, _Exploding(), labels, L.ForwardKLLoss(), 0.5, 4)
    assert out.kd_loss_sum.item() == 0.0
    ce, _ = _direct(student, None, tokens, labels, None, V)
    torch.testing.assert_close(out.class_loss_sum, ce, rtol=1e-5, atol=1e-5)
    ce_only = L.cross_entropy_objective(h, student, labels, num_output_chunks=3)
    torch.testing.assert_close(ce_only.class_loss_sum, ce, rtol=1e-5, atol=1e-5)


def test_same_model_as_teacher_gives_zero_kd():
    V = 64
    student = _model(V)
    tokens, labels = _batch(V)
    h = student(tokens, return_hidden=True)
    for loss in (L.ForwardKLLoss(temperature=3.0), L.SymmetricKLLoss(), L.TVDLoss(), L.JSDLoss()):
        out = L.distillation_objective(h, h.detach(), student, student, labels, loss, 0.5, 3)
        assert abs(out.kd_loss_sum.item()) < 1e-4


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_no_vocab_sized_tensor_is_kept_for_backward():
    V = 500  # larger than every other dim here, so vocab-sized saved tensors are easy to spot
    student = _model(V)
    teacher = _model(V, dim=48, seed=1).requires_grad_(False).eval()
    tokens, labels = _batch(V, B=2, T=16)
    with torch.no_grad():
        th = teacher(tokens, return_hidden=True)
    h = student(tokens, return_hidden=True).detach().requires_grad_(True)

    def run(ckpt):
        return lambda: L.distillation_objective(
            h, th, student, teacher, labels, L.ForwardKLLoss(), 0.5, 4, checkpoint_chunks=ckpt
        )

    def vocab_sized(shapes):
        return [s for s in shapes if s and s[-1] == V and len(s) > 1 and s[0] > 1]  # ignore the [V, D] weight

    assert vocab_sized(_saved_shapes(run(False)))  # without recompute, per-chunk [n, V] logits are kept
    assert not vocab_sized(_saved_shapes(run(True)))  # with it, only hidden-state chunks are
