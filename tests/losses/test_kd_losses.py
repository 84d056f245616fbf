"""KD divergences (``per_token`` on tempered log-probabilities) vs float64 formulas written here, values and gradients."""

import math

import pytest
import torch

import kdtune.losses as L
from kdtune.errors import ConfigError
from kdtune.losses import functional as KF

V = 37


def _probs(logits: torch.Tensor, T: float) -> torch.Tensor:
    z = logits / T
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


# Reference per-token divergences from the textbook definitions, in probability space, on raw logits.
def ref_forward(s, t, T, **_):
    return _kl(_probs(t, T), _probs(s, T))


def ref_reverse(s, t, T, **_):
    return _kl(_probs(s, T), _probs(t, T))


def ref_symmetric(s, t, T, **_):
    ps, pt = _probs(s, T), _probs(t, T)
    return _kl(pt, ps) + _kl(ps, pt)


def ref_jsd(s, t, T, beta=0.5, normalize=True):
    ps, pt = _probs(s, T), _probs(t, T)
    if beta == 0:
        return _kl(pt, ps)
    if beta == 1:
        return _kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    j = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    return j / (beta * (1 - beta)) if normalize else j


def ref_skew_fwd(s, t, T, alpha=0.1):
    ps, pt = _probs(s, T), _probs(t, T)
    return _kl(pt, alpha * pt + (1 - alpha) * ps)


def ref_skew_rev(s, t, T, alpha=0.1):
    ps, pt = _probs(s, T), _probs(t, T)
    return _kl(ps, alpha * ps + (1 - alpha) * pt)


def ref_tvd(s, t, T, **_):
    return 0.5 * (_probs(t, T) - _probs(s, T)).abs().sum(-1)


CASES = [
    (L.ForwardKLLoss, KF.forward_kl, ref_forward, {}),
    (L.ReverseKLLoss, KF.reverse_kl, ref_reverse, {}),
    (L.SymmetricKLLoss, KF.symmetric_kl, ref_symmetric, {}),
    (L.JSDLoss, KF.generalized_jsd, ref_jsd, {"beta": 0.5}),
    (L.JSDLoss, KF.generalized_jsd, ref_jsd, {"beta": 0.1}),
    (L.JSDLoss, KF.generalized_jsd, ref_jsd, {"beta": 0.9, "normalize": False}),
    (L.JSDLoss, KF.generalized_jsd, ref_jsd, {"beta": 0.0}),
    (L.JSDLoss, KF.generalized_jsd, ref_jsd, {"beta": 1.0}),
    (L.SkewForwardKLLoss, KF.skew_forward_kl, ref_skew_fwd, {"alpha": 0.1}),
    (L.SkewForwardKLLoss, KF.skew_forward_kl, ref_skew_fwd, {"alpha": 0.0}),
    (L.SkewReverseKLLoss, KF.skew_reverse_kl, ref_skew_rev, {"alpha": 0.3}),
    (L.SkewReverseKLLoss, KF.skew_reverse_kl, ref_skew_rev, {"alpha": 0.0}),
    (L.TVDLoss, KF.total_variation, ref_tvd, {}),
]
IDS = [f"{c[0].__name__}{c[3]}" for c in CASES]


def _data(dtype=torch.float64, n=10):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(n, V, generator=g) * 2).to(dtype)
    t = (torch.randn(n, V, generator=g) * 2).to(dtype)
    return s, t


def _per_token(cls, kw, s, t, T):
    """The divergence as the objective computes it: on tempered log-probabilities of both sides."""
    return cls(**kw).per_token(KF.log_probs(s, T), KF.log_probs(t, T))


@pytest.mark.parametrize("cls,fn,ref,kw", CASES, ids=IDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_value_and_grad_vs_float64_formula(cls, fn, ref, kw, T):
    s, t = _data()
    s1, t1 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    s2, t2 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    got = _per_token(cls, kw, s1, t1, T)
    want = ref(s2, t2, T, **kw)
    assert got.shape == (s.shape[0],) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    w = torch.linspace(0.5, 1.5, s.shape[0], dtype=torch.float64)  # a non-uniform upstream gradient
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-9, atol=1e-12)
    # the functional form is exactly the class's computation
    fn_kw = {"beta": kw.get("beta", 0.5), "normalize": kw.get("normalize", True)} if cls is L.JSDLoss else kw
    torch.testing.assert_close(fn(KF.log_probs(s, T), KF.log_probs(t, T), **fn_kw), got.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("cls,fn,ref,kw", CASES, ids=IDS)
def test_fp32_and_bf16_logits_upcast_in_log_probs(cls, fn, ref, kw):
    s, t = _data()
    want = ref(s, t, 2.0, **kw)
    s32, t32 = KF.log_probs(s.float(), 2.0), KF.log_probs(t.float(), 2.0)
    assert s32.dtype == t32.dtype == torch.float32
    got32 = cls(**kw).per_token(s32, t32)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=2e-5, atol=1e-5)
    sb, tb = s.bfloat16(), t.bfloat16()
    sb_lp, tb_lp = KF.log_probs(sb, 2.0), KF.log_probs(tb, 2.0)
    assert sb_lp.dtype == tb_lp.dtype == torch.float32  # computed in fp32 from bf16 logits
    gotb = cls(**kw).per_token(sb_lp, tb_lp)
    assert gotb.dtype == torch.float32
    torch.testing.assert_close(gotb.double(), ref(sb.double(), tb.double(), 2.0, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,fn,ref,kw", CASES, ids=IDS)
def test_identical_distributions_give_zero(cls, fn, ref, kw):
    s, _ = _data(torch.float32)
    s = s.requires_grad_(True)
    out = _per_token(cls, kw, s, s.detach().clone(), 1.7)
    assert out.abs().max().item() < 1e-5
    out.sum().backward()
    assert s.grad.abs().max().item() < 1e-5


def test_log_probs_temperature_and_dtypes():
    s, _ = _data()
    T = 3.0
    torch.testing.assert_close(KF.log_probs(s, T), torch.log_softmax(s / T, dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(KF.log_probs(s), torch.log_softmax(s, dim=-1), rtol=0, atol=0)
    assert KF.log_probs(s, T).dtype == torch.float64  # fp64 stays fp64
    assert KF.log_probs(s.half(), T).dtype == torch.float32
    assert KF.check_temperature(2) == 2.0 and isinstance(KF.check_temperature(2), float)


def test_scaled_forward_kl_gradient_is_t_times_prob_difference():
    # T² · KL(p_t‖p_s) at temperature T has gradient T (p_s − p_t) w.r.t. the student logits (Hinton et al. 2015)
    s, t = _data()
    T = 3.0
    s1 = s.clone().requires_grad_(True)
    (T**2 * _per_token(L.ForwardKLLoss, {}, s1, t, T).sum()).backward()
    torch.testing.assert_close(s1.grad, T * (_probs(s, T) - _probs(t, T)))


def test_forward_kl_is_true_kl_not_cross_entropy():
    # torchtune's variant returns -Σ p_t log p_s (a cross-entropy, > 0 for identical inputs); ours is a KL.
    s, t = _data()
    pt = _probs(t, 1.0)
    ce = -(pt * torch.log(_probs(s, 1.0))).sum(-1)
    ent = -(pt * torch.log(pt)).sum(-1)
    torch.testing.assert_close(_per_token(L.ForwardKLLoss, {}, s, t, 1.0), ce - ent)
    assert (ce > 0.1).all()  # ... so the identical-distribution zero above really distinguishes the two


def test_jsd_limits_are_forward_and_reverse_kl():
    s, t = _data()
    fwd = _per_token(L.ForwardKLLoss, {}, s, t, 1.0)
    rev = _per_token(L.ReverseKLLoss, {}, s, t, 1.0)
    torch.testing.assert_close(_per_token(L.JSDLoss, {"beta": 0.0}, s, t, 1.0), fwd)
    torch.testing.assert_close(_per_token(L.JSDLoss, {"beta": 1.0}, s, t, 1.0), rev)
    # the normalised family is continuous at the end points
    torch.testing.assert_close(_per_token(L.JSDLoss, {"beta": 1e-6}, s, t, 1.0), fwd, rtol=1e-4, atol=0)
    torch.testing.assert_close(_per_token(L.JSDLoss, {"beta": 1 - 1e-6}, s, t, 1.0), rev, rtol=1e-4, atol=0)
    # unnormalised β = 0.5 is the classic Jensen-Shannon divergence ≤ log 2 per token
    per = _per_token(L.JSDLoss, {"beta": 0.5, "normalize": False}, s, t, 1.0)
    assert (per <= math.log(2) + 1e-12).all() and (per > 0).all()


def test_skew_alpha_zero_is_plain_kl():
    s, t = _data()
    torch.testing.assert_close(
        _per_token(L.SkewForwardKLLoss, {"alpha": 0.0}, s, t, 1.0), _per_token(L.ForwardKLLoss, {}, s, t, 1.0)
    )
    torch.testing.assert_close(
        _per_token(L.SkewReverseKLLoss, {"alpha": 0.0}, s, t, 1.0), _per_token(L.ReverseKLLoss, {}, s, t, 1.0)
    )


# Divergences that stay finite when the teacher puts zero mass on some tokens (reverse / symmetric KL and
# skew reverse KL at α = 0 are genuinely infinite there).
FINITE_WITH_ZERO_TEACHER_MASS = [
    (L.ForwardKLLoss, {}),
    (L.JSDLoss, {"beta": 0.5}),
    (L.JSDLoss, {"beta": 0.0}),
    (L.JSDLoss, {"beta": 0.9, "normalize": False}),
    (L.SkewForwardKLLoss, {"alpha": 0.1}),
    (L.SkewReverseKLLoss, {"alpha": 0.3}),
    (L.TVDLoss, {}),
]


@pytest.mark.parametrize(
    "cls,kw", FINITE_WITH_ZERO_TEACHER_MASS, ids=[f"{c.__name__}{k}" for c, k in FINITE_WITH_ZERO_TEACHER_MASS]
)
def test_teacher_with_minus_inf_logits_is_finite(cls, kw):
    s, t = _data()
    t[..., -3:] = float("-inf")  # e.g. a teacher that masks some tokens
    s1 = s.clone().requires_grad_(True)
    out = _per_token(cls, kw, s1, t, 2.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s1.grad).all()
    tt = t.clone()
    tt[..., -3:] = -1e4  # same distribution with finite logits
    torch.testing.assert_close(out.detach(), _per_token(cls, kw, s, tt, 2.0))


@pytest.mark.parametrize(
    "make",
    [
        lambda: L.JSDLoss(beta=1.5),
        lambda: L.JSDLoss(beta=-0.1),
        lambda: L.SkewForwardKLLoss(alpha=1.0),
        lambda: L.SkewReverseKLLoss(alpha=1.0),
        lambda: L.SkewForwardKLLoss(alpha=-0.5),
        lambda: KF.check_temperature(0.0),
        lambda: KF.check_temperature(-1.0),
        lambda: KF.check_temperature(float("nan")),
        lambda: KF.check_temperature(True),
    ],
)
def test_bad_settings_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize("method", ["forward", "__call__", "loss_sum"])
def test_divergence_subclass_defining_a_method_kdtune_never_calls_is_refused(method):
    def per_token(self, student_logp, teacher_logp):
        return KF.forward_kl(student_logp, teacher_logp)

    def extra(self, *args, **kwargs):
        return torch.zeros(())

    with pytest.raises(TypeError, match=f"defines {method}"):
        type("BadLoss", (L.Divergence,), {"per_token": per_token, method: extra})
    # a class statement is refused the same way
    with pytest.raises(TypeError, match="never calls"):

        class _Bad(L.Divergence):
            def per_token(self, student_logp, teacher_logp):
                return KF.forward_kl(student_logp, teacher_logp)

            def forward(self, student_logits, teacher_logits, labels):
                return torch.zeros(())


def test_a_divergence_subclass_needs_only_per_token():
    class HellingerLoss(L.Divergence):
        def per_token(self, student_logp, teacher_logp):
            return 1 - (0.5 * (student_logp + teacher_logp)).exp().sum(-1)

    s, t = _data()
    ps, pt = _probs(s, 2.0), _probs(t, 2.0)
    torch.testing.assert_close(_per_token(HellingerLoss, {}, s, t, 2.0), 1 - (ps * pt).sqrt().sum(-1))
    with pytest.raises(NotImplementedError):
        L.Divergence().per_token(KF.log_probs(s), KF.log_probs(t))
    assert repr(L.JSDLoss(beta=0.3)) == "JSDLoss(beta=0.3, normalize=True)"


def test_forward_kl_with_chunked_output_loss_is_forward_kl():
    # torchtune's name, kept for migrated configs; chunking is the objective's num_output_chunks
    assert L.ForwardKLWithChunkedOutputLoss is L.ForwardKLLoss
