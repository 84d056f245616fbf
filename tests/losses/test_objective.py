"""DistillationObjective (chunked, from hidden states) vs the direct full-logits computation written here."""

import math

import pytest
import torch
import torch.nn.functional as F

import kdtune.losses as L
from kdtune.errors import ConfigError
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


def _frozen(m):
    return m.requires_grad_(False).eval()


def _batch(vocab: int, B: int = 3, T: int = 11):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    labels = tokens.clone()
    labels[:, :3] = -100  # prompt
    labels[-1, 6:] = -100  # padding
    return {"tokens": tokens, "labels": labels}


# Reference divergences per position, from log-probabilities, written out here.
def _ref_forward(s_logp, t_logp):
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def _ref_reverse(s_logp, t_logp):
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


def _ref_jsd(beta):
    def jsd(s_logp, t_logp):
        ps, pt = s_logp.exp(), t_logp.exp()
        m = beta * pt + (1 - beta) * ps
        j = beta * (pt * (t_logp - m.log())).sum(-1) + (1 - beta) * (ps * (s_logp - m.log())).sum(-1)
        return j / (beta * (1 - beta))

    return jsd


def _direct(student, teacher, batch, ref_div=None, T=1.0, vocab_kd=None):
    """(CE sum, T² · divergence sum) over the valid shifted positions, from the full [B, T, V] logits."""
    tokens, labels = batch["tokens"], batch["labels"]
    s_logits = student(tokens)[:, :-1].float()
    tgt = labels[:, 1:]
    mask = tgt != -100
    ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), tgt.reshape(-1), reduction="sum")
    if teacher is None:
        return ce, None
    vocab_kd = vocab_kd or s_logits.shape[-1]
    with torch.no_grad():
        t_logits = teacher(tokens)[:, :-1].float()[..., :vocab_kd]
    s_logp = torch.log_softmax(s_logits[..., :vocab_kd] / T, dim=-1)
    t_logp = torch.log_softmax(t_logits / T, dim=-1)
    kd = T**2 * ref_div(s_logp, t_logp)[mask].sum()
    return ce, kd


def _from_hidden(objective, student, batch):
    mask = batch["labels"][:, 1:] != objective.ignore_index
    state = objective.teacher.prepare(batch, mask) if objective.teacher is not None else None
    return objective.from_hidden(student, student(batch["tokens"], return_hidden=True), batch["labels"], state)


def _params(m):
    return [p for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("chunks,ckpt", [(1, True), (1, False), (4, True), (4, False), (100, True)])
@pytest.mark.parametrize("loss_cls,ref_div", [(L.ForwardKLLoss, _ref_forward), (L.ReverseKLLoss, _ref_reverse)])
def test_objective_matches_full_logits(chunks, ckpt, loss_cls, ref_div):
    V, T = 64, 2.0
    student, teacher = _model(V, seed=0), _frozen(_model(V, dim=48, seed=1))
    batch = _batch(V)
    obj = L.DistillationObjective(
        loss_cls(), teacher=teacher, kd_ratio=0.5, temperature=T, num_output_chunks=chunks, checkpoint_chunks=ckpt
    )
    out = _from_hidden(obj, student, batch)
    assert isinstance(out, L.ObjectiveOutput)
    assert int(out.num_tokens) == int((batch["labels"][:, 1:] != -100).sum())
    grads = torch.autograd.grad(out.loss_sum, _params(student))

    ce, kd = _direct(student, teacher, batch, ref_div, T)
    ref_grads = torch.autograd.grad(0.5 * ce + 0.5 * kd, _params(student))
    torch.testing.assert_close(out.class_loss_sum, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd_loss_sum, kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss_sum, 0.5 * ce + 0.5 * kd, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", [L.ForwardKLLoss(), L.ReverseKLLoss(), L.JSDLoss(beta=0.3)], ids=repr)
def test_chunked_equals_unchunked(loss):
    V = 64
    student, teacher = _model(V, seed=0).double(), _frozen(_model(V, dim=48, seed=1).double())
    batch = _batch(V)
    results = []
    for chunks, ckpt in [(1, False), (4, True), (4, False), (7, True), (1000, False)]:
        obj = L.DistillationObjective(
            loss, teacher=teacher, kd_ratio=0.3, temperature=2.0, num_output_chunks=chunks, checkpoint_chunks=ckpt
        )
        out = _from_hidden(obj, student, batch)
        assert out.loss_sum.dtype == torch.float64
        results.append((out, torch.autograd.grad(out.loss_sum, _params(student))))
    (ref, ref_grads), *rest = results
    for out, grads in rest:
        for a, b in zip(out[:3], ref[:3], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_temperature_squared_scaling():
    V, T = 64, 3.0
    student, teacher = _model(V, seed=0), _frozen(_model(V, dim=48, seed=1))
    batch = _batch(V)
    scaled = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, temperature=T)
    raw = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, temperature=T, scale_by_temperature_squared=False)
    assert scaled.kd_scale == pytest.approx(T**2) and raw.kd_scale == 1.0
    with torch.no_grad():
        out_s, out_r = scaled(student, batch), raw(student, batch)
        _, kd = _direct(student, teacher, batch, _ref_forward, T)
    torch.testing.assert_close(out_s.kd_loss_sum, kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_r.kd_loss_sum, kd / T**2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_s.class_loss_sum, out_r.class_loss_sum)


def test_padded_teacher_vocab_is_sliced_to_student():
    Vs, Vt = 64, 80  # teacher output padded with 16 extra rows (like Qwen2.5-14B vs 3B)
    student, teacher = _model(Vs, tie=True, seed=0), _frozen(_model(Vt, seed=1))
    with torch.no_grad():
        teacher.output.weight[Vs:] = 5.0  # padded rows get large logits: must not influence the KD term
    batch = _batch(Vs)
    obj = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, temperature=2.0, num_output_chunks=3)
    out = _from_hidden(obj, student, batch)
    ce, kd = _direct(student, teacher, batch, _ref_forward, 2.0, vocab_kd=Vs)
    torch.testing.assert_close(out.class_loss_sum, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd_loss_sum, kd, rtol=1e-5, atol=1e-5)


def test_padded_student_vocab_compares_shared_rows_only():
    Vs, Vt = 80, 64  # the student is the padded one: KD uses the first 64 logits of both, CE the student's 80
    student, teacher = _model(Vs, seed=0), _frozen(_model(Vt, seed=1))
    batch = _batch(Vt)
    obj = L.DistillationObjective(L.JSDLoss(beta=0.3), teacher=teacher, num_output_chunks=2)
    out = _from_hidden(obj, student, batch)
    grads = torch.autograd.grad(out.loss_sum, _params(student))
    ce, kd = _direct(student, teacher, batch, _ref_jsd(0.3), 1.0, vocab_kd=Vt)
    ref_grads = torch.autograd.grad(0.5 * ce + 0.5 * kd, _params(student))
    torch.testing.assert_close(out.class_loss_sum, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd_loss_sum, kd, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ckpt", [True, False])
def test_all_masked_batch_is_zero_and_backward_works(ckpt):
    V = 64
    student, teacher = _model(V), _frozen(_model(V, seed=1))
    batch = _batch(V)
    batch["labels"][:] = -100
    obj = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, num_output_chunks=4, checkpoint_chunks=ckpt)
    out = obj(student, batch)
    assert int(out.num_tokens) == 0
    assert out.loss_sum.item() == 0.0 and out.class_loss_sum.item() == 0.0 and out.kd_loss_sum.item() == 0.0
    out.loss_sum.backward()
    assert all(
        p.grad is None or (torch.isfinite(p.grad).all() and p.grad.abs().max() == 0) for p in student.parameters()
    )
    # the same without a teacher
    ft = L.DistillationObjective(num_output_chunks=4)(student, batch)
    assert ft.kd_loss_sum is None and ft.loss_sum.item() == 0.0
    ft.loss_sum.backward()


def test_masked_positions_with_nan_hidden_states_do_not_leak():
    V = 64
    student, teacher = _model(V), _frozen(_model(V, seed=1))
    batch = _batch(V)
    assert batch["labels"][0, 1] == -100  # so hidden position 0 of row 0 is not trained
    obj = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, num_output_chunks=2)
    mask = batch["labels"][:, 1:] != -100
    hidden = student(batch["tokens"], return_hidden=True).detach().clone()
    hidden[0, 0] = float("nan")
    hidden.requires_grad_(True)
    out = obj.from_hidden(student, hidden, batch["labels"], obj.teacher.prepare(batch, mask))
    assert all(torch.isfinite(x) for x in out[:3])
    out.loss_sum.backward()
    assert torch.isfinite(hidden.grad).all()


def test_kd_ratio_zero_logs_kd_without_gradient():
    V = 64
    student, teacher = _model(V), _frozen(_model(V, dim=48, seed=1))
    batch = _batch(V)
    # the unfused path keeps the parts differentiable, so "no KD gradient" can be checked on kd_loss_sum itself
    at0 = _from_hidden(
        L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=0.0, fused=False), student, batch
    )
    at5 = _from_hidden(
        L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=0.5, fused=False), student, batch
    )
    torch.testing.assert_close(at0.kd_loss_sum, at5.kd_loss_sum)  # logged value is the same KD
    assert at0.kd_loss_sum.item() > 0
    torch.testing.assert_close(at0.loss_sum, at0.class_loss_sum, rtol=0, atol=0)
    kd_grads = torch.autograd.grad(at0.kd_loss_sum, _params(student), allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().max() == 0 for g in kd_grads)  # ... but it trains nothing
    loss_grads = torch.autograd.grad(at0.loss_sum, _params(student), retain_graph=True)
    ce_grads = torch.autograd.grad(at0.class_loss_sum, _params(student))
    for g, r in zip(loss_grads, ce_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_kd_ratio_one_optimises_kd_only():
    V = 64
    student, teacher = _model(V), _frozen(_model(V, dim=48, seed=1))
    out = L.DistillationObjective(L.ReverseKLLoss(), teacher=teacher, kd_ratio=1.0)(student, _batch(V))
    torch.testing.assert_close(out.loss_sum, out.kd_loss_sum, rtol=0, atol=0)


def test_mix_drops_the_unused_term_even_if_non_finite():
    teacher = _frozen(_model(16))
    nan, inf = float("nan"), float("inf")
    at0 = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=0.0)
    at1 = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=1.0)
    mid = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=0.25)
    assert at0.mix(2.0, nan) == 2.0 and at0.mix(2.0, inf) == 2.0
    assert at1.mix(nan, 3.0) == 3.0 and at1.mix(-inf, 3.0) == 3.0
    assert at0.mix(torch.tensor(2.0), torch.tensor(nan)).item() == 2.0
    assert at1.mix(torch.tensor(nan), torch.tensor(3.0)).item() == 3.0
    assert mid.mix(2.0, 6.0) == pytest.approx(0.75 * 2.0 + 0.25 * 6.0)
    assert math.isnan(mid.mix(2.0, nan))  # in the interior both terms count
    # without a teacher the mix is the cross-entropy, whatever kd_ratio says
    no_teacher = L.DistillationObjective(kd_ratio=0.7)
    assert no_teacher.kd_ratio == 0.0 and no_teacher.mix(2.0, nan) == 2.0


class _ExplodingSource:
    def prepare(self, batch, mask):
        raise AssertionError("the teacher must not be run")

    def log_probs(self, state, student_logits, temperature):
        raise AssertionError("the teacher must not be evaluated")


def test_no_teacher_is_cross_entropy_and_never_calls_the_teacher():
    V = 64
    student = _model(V)
    batch = _batch(V)
    ce, _ = _direct(student, None, batch)
    ref_grads = torch.autograd.grad(ce, _params(student))
    ft = L.DistillationObjective(num_output_chunks=3)
    out = ft(student, batch)
    assert out.kd_loss_sum is None
    torch.testing.assert_close(out.class_loss_sum, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss_sum, out.class_loss_sum, rtol=0, atol=0)
    for g, r in zip(torch.autograd.grad(out.loss_sum, _params(student)), ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # an objective with a teacher source given no teacher state computes CE only and never touches the source
    exploding = L.DistillationObjective(L.ForwardKLLoss(), teacher=_ExplodingSource(), num_output_chunks=3)
    h = student(batch["tokens"], return_hidden=True)
    out2 = exploding.from_hidden(student, h, batch["labels"], None)
    assert out2.kd_loss_sum is None
    torch.testing.assert_close(out2.loss_sum, ce, rtol=1e-5, atol=1e-5)


def test_same_model_as_teacher_gives_zero_kd():
    V = 64
    student = _model(V)
    batch = _batch(V)
    for loss, T in [(L.ForwardKLLoss(), 3.0), (L.SymmetricKLLoss(), 1.0), (L.TVDLoss(), 1.0), (L.JSDLoss(), 2.0)]:
        out = L.DistillationObjective(loss, teacher=student, temperature=T, num_output_chunks=3)(student, batch)
        assert abs(out.kd_loss_sum.item()) < 1e-4, loss


def test_a_custom_teacher_source_plugs_in():
    class UniformTeacher:  # e.g. how a cached teacher plugs in: prepare once, then log-probs per chunk
        def prepare(self, batch, mask):
            return (torch.zeros(int(mask.sum()), 1),)

        def log_probs(self, state, student_logits, temperature):
            (s,) = state
            assert s.shape[0] == student_logits.shape[0]
            v = student_logits.shape[-1]
            return L.functional.log_probs(student_logits, temperature), torch.full_like(student_logits, -math.log(v))

    V = 64
    student = _model(V)
    batch = _batch(V)
    source = UniformTeacher()
    assert isinstance(source, L.TeacherSource)
    out = L.DistillationObjective(L.ForwardKLLoss(), teacher=source, num_output_chunks=4)(student, batch)
    uniform = _frozen(_model(V, seed=1))
    with torch.no_grad():
        uniform.output.weight.zero_()  # all-zero logits: the uniform distribution
        _, kd = _direct(student, uniform, batch, _ref_forward, 1.0)
    torch.testing.assert_close(out.kd_loss_sum, kd, rtol=1e-5, atol=1e-5)


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def _saved_alive_after(fn):
    """Shapes of the tensors saved for backward during ``fn()`` that are still alive once it returned."""
    import gc
    import weakref

    refs = []

    def pack(t):
        refs.append((tuple(t.shape), weakref.ref(t)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    gc.collect()
    alive = [shape for shape, ref in refs if ref() is not None]
    del out
    return alive


def test_no_vocab_sized_tensor_is_kept_for_backward():
    V = 500  # larger than every other dim here, so vocab-sized saved tensors are easy to spot
    student = _model(V)
    teacher = _frozen(_model(V, dim=48, seed=1))
    batch = _batch(V, B=2, T=16)
    mask = batch["labels"][:, 1:] != -100
    h = student(batch["tokens"], return_hidden=True).detach().requires_grad_(True)

    def run(ckpt, fused=False, kd_loss=None):
        obj = L.DistillationObjective(
            kd_loss or L.ForwardKLLoss(), teacher=teacher, num_output_chunks=4, checkpoint_chunks=ckpt, fused=fused
        )
        state = obj.teacher.prepare(batch, mask)
        return lambda: obj.from_hidden(student, h, batch["labels"], state)

    def vocab_sized(shapes):
        return [s for s in shapes if s and s[-1] == V and len(s) > 1 and s[0] > 1]  # ignore the [V, D] weight

    assert vocab_sized(_saved_shapes(run(False)))  # without recompute, per-chunk [n, V] logits are kept
    assert not vocab_sized(_saved_shapes(run(True)))  # with it, only hidden-state chunks are
    # fused: each chunk's graph lives only inside forward (its gradient is taken there); nothing vocab-sized survives
    for kd_loss in (L.ForwardKLLoss(), L.JSDLoss(beta=0.3)):
        alive = _saved_alive_after(run(True, fused=True, kd_loss=kd_loss))
        assert not vocab_sized(alive), alive


def test_call_equals_from_hidden():
    V = 64
    student, teacher = _model(V), _frozen(_model(V, dim=48, seed=1))
    batch = _batch(V)
    obj = L.DistillationObjective(L.SkewForwardKLLoss(alpha=0.2), teacher=teacher, temperature=2.0, kd_ratio=0.4)
    a = obj(student, batch)
    ga = torch.autograd.grad(a.loss_sum, _params(student))
    b = _from_hidden(obj, student, batch)
    gb = torch.autograd.grad(b.loss_sum, _params(student))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_teacher_runs_without_gradients():
    V = 64
    student = _model(V)
    teacher = _model(V, dim=48, seed=1)  # deliberately not frozen: the objective must not build its graph
    assert all(p.requires_grad for p in teacher.parameters())
    grad_enabled = {"body": [], "output": []}
    teacher.register_forward_hook(lambda *_: grad_enabled["body"].append(torch.is_grad_enabled()))
    teacher.output.register_forward_hook(lambda *_: grad_enabled["output"].append(torch.is_grad_enabled()))
    obj = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, temperature=2.0, num_output_chunks=2)
    assert isinstance(obj.teacher, L.LiveTeacher) and obj.teacher.model is teacher
    obj(student, _batch(V)).loss_sum.backward()
    assert grad_enabled["body"] == [False]  # once per micro-batch, without a graph
    assert grad_enabled["output"] and not any(grad_enabled["output"])  # per chunk, without a graph
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kd_ratio": 1.5},
        {"kd_ratio": -0.1},
        {"kd_ratio": True},
        {"num_output_chunks": 0},
        {"num_output_chunks": 2.5},
        {"num_output_chunks": True},
        {"temperature": 0.0},
        {"kd_loss": None},
        {"kd_loss": L.ForwardKLLoss},  # the class, not an instance
        {"kd_loss": torch.nn.KLDivLoss(reduction="sum")},
    ],
    ids=repr,
)
def test_bad_settings_raise_config_error(kwargs):
    teacher = _frozen(_model(16))
    kwargs = {"kd_loss": L.ForwardKLLoss(), **kwargs}
    with pytest.raises(ConfigError):
        L.DistillationObjective(teacher=teacher, **kwargs)


@pytest.mark.parametrize("kd_loss", [L.ForwardKLLoss(), L.JSDLoss(beta=0.3), L.ReverseKLLoss()])
@pytest.mark.parametrize("kd_ratio,T", [(0.5, 1.0), (0.3, 2.0), (0.0, 1.0), (1.0, 1.5)])
@pytest.mark.parametrize("tie", [False, True])
def test_fused_equals_the_checkpointed_path(kd_loss, kd_ratio: float, T: float, tie: bool) -> None:
    """The fused path (gradients in forward, teacher logits once) gives the checkpointed path's sums and gradients."""
    V = 64
    student = _model(V, tie=tie)
    teacher = _frozen(_model(V + 16, dim=48, seed=1))  # padded teacher vocabulary
    batch = _batch(V)
    outs = []
    for fused in (False, True):
        obj = L.DistillationObjective(kd_loss, teacher=teacher, kd_ratio=kd_ratio, temperature=T, fused=fused)
        out = obj(student, batch)
        grads = torch.autograd.grad(out.loss_sum, _params(student), allow_unused=True)
        outs.append((out, grads))
    (a, ga), (b, gb) = outs
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.detach().double(), y.detach().double(), rtol=1e-6, atol=1e-6)
    for x, y in zip(ga, gb, strict=True):
        if x is None or y is None:
            assert (x is None or x.abs().max() == 0) and (y is None or y.abs().max() == 0)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_fused_fine_tuning_equals_the_checkpointed_path() -> None:
    V = 64
    student, batch = _model(V), _batch(V)
    results = []
    for fused in (False, True):
        out = L.DistillationObjective(fused=fused, num_output_chunks=3)(student, batch)
        results.append((out.loss_sum.detach(), torch.autograd.grad(out.loss_sum, _params(student))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for x, y in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
