"""KD losses vs float64 formulas written here (values and gradients), masking, chunking, temperature convention."""

import math

import pytest
import torch

import kdtune.losses as L
from kdtune.errors import ConfigError

V = 37


def _probs(logits: torch.Tensor, T: float) -> torch.Tensor:
    z = logits / T
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


# Reference per-token divergences from the textbook definitions, in probability space.
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
    (L.ForwardKLLoss, L.forward_kl, ref_forward, {}),
    (L.ReverseKLLoss, L.reverse_kl, ref_reverse, {}),
    (L.SymmetricKLLoss, L.symmetric_kl, ref_symmetric, {}),
    (L.JSDLoss, L.generalized_jsd, ref_jsd, {"beta": 0.5}),
    (L.JSDLoss, L.generalized_jsd, ref_jsd, {"beta": 0.1}),
    (L.JSDLoss, L.generalized_jsd, ref_jsd, {"beta": 0.9, "normalize": False}),
    (L.JSDLoss, L.generalized_jsd, ref_jsd, {"beta": 0.0}),
    (L.JSDLoss, L.generalized_jsd, ref_jsd, {"beta": 1.0}),
    (L.SkewForwardKLLoss, L.skew_forward_kl, ref_skew_fwd, {"alpha": 0.1}),
    (L.SkewReverseKLLoss, L.skew_reverse_kl, ref_skew_rev, {"alpha": 0.3}),
    (L.TVDLoss, L.total_variation, ref_tvd, {}),
]
IDS = [f"{c[0].__name__}{c[3]}" for c in CASES]


def _data(dtype=torch.float64, B=2, T=5):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    t = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[1, -1] = -100
    return s, t, labels


def _ref_sum(ref, s, t, labels, T, kw, scale_t2=True):
    per = ref(s, t, T, **kw)
    mask = labels != -100
    return per[mask].sum() * (T**2 if scale_t2 else 1.0)


@pytest.mark.parametrize("cls,fn,ref,kw", CASES, ids=IDS)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_value_and_grad_vs_float64_formula(cls, fn, ref, kw, T):
    s, t, labels = _data()
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    t1 = t.clone().requires_grad_(True)
    t2 = t.clone().requires_grad_(True)
    got = fn(s1, t1, labels, temperature=T, **kw)
    want = _ref_sum(ref, s2, t2, labels, T, kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-9, atol=1e-12)
    # the module wrapper: mean over valid tokens
    mod = cls(temperature=T, **kw)
    n = (labels != -100).sum()
    torch.testing.assert_close(mod(s, t, labels), want.detach() / n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        cls(temperature=T, reduction="sum", **kw)(s, t, labels), want.detach(), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("cls,fn,ref,kw", CASES, ids=IDS)
def test_fp32_and_bf16_inputs_upcast(cls, fn, ref, kw):
    s, t, labels = _data()
    want = _ref_sum(ref, s, t, labels, 2.0, kw)
    got32 = fn(s.float(), t.float(), labels, temperature=2.0, **kw)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=2e-5, atol=1e-5)
    sb, tb = s.bfloat16(), t.bfloat16()
    gotb = fn(sb, tb, labels, temperature=2.0, **kw)
    assert gotb.dtype == torch.float32  # computed in fp32 from bf16 logits
    torch.testing.assert_close(
        gotb.double(), _ref_sum(ref, sb.double(), tb.double(), labels, 2.0, kw), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("cls,fn,ref,kw", CASES, ids=IDS)
def test_identical_distributions_give_zero(cls, fn, ref, kw):
    s, _, labels = _data(torch.float32)
    s = s.requires_grad_(True)
    out = fn(s, s.detach().clone(), labels, temperature=1.7, **kw)
    assert abs(out.item()) < 1e-5
    out.backward()
    assert s.grad.abs().max().item() < 1e-5


@pytest.mark.parametrize("cls,fn,ref,kw", CASES, ids=IDS)
def test_all_masked_is_zero_without_nan(cls, fn, ref, kw):
    s, t, labels = _data(torch.float32)
    s = s.requires_grad_(True)
    labels = torch.full_like(labels, -100)
    for loss in (cls(**kw)(s, t, labels), cls(num_output_chunks=3, **kw)(s, t, labels), fn(s, t, labels, **kw)):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all() and grad.abs().max() == 0


@pytest.mark.parametrize("cls,fn,ref,kw", CASES, ids=IDS)
def test_chunked_equals_unchunked(cls, fn, ref, kw):
    s, t, labels = _data(torch.float64, B=2, T=9)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    whole = cls(temperature=2.0, **kw)(s1, t, labels)
    chunked = cls(temperature=2.0, num_output_chunks=4, **kw)(s2, t, labels)
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-14)
    whole.backward()
    chunked.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-12, atol=1e-14)
    # lists of chunks (torchtune convention) give the same value
    s_list, t_list = list(s.chunk(3, dim=1)), list(t.chunk(3, dim=1))
    torch.testing.assert_close(
        cls(temperature=2.0, **kw)(s_list, t_list, labels), whole.detach(), rtol=1e-12, atol=1e-14
    )


def test_forward_kl_with_chunked_output_loss_torchtune_name():
    s, t, labels = _data(torch.float32, T=16)
    loss = L.ForwardKLWithChunkedOutputLoss(num_output_chunks=8)
    assert loss.num_output_chunks == 8
    torch.testing.assert_close(
        loss(list(s.chunk(8, dim=1)), list(t.chunk(8, dim=1)), labels), L.ForwardKLLoss()(s, t, labels)
    )


def test_forward_kl_is_true_kl_not_cross_entropy():
    # torchtune's variant returns -Σ p_t log p_s (a cross-entropy, > 0 for identical inputs); ours is a KL.
    s, t, labels = _data()
    pt = _probs(t, 1.0)
    ce = -(pt * torch.log(_probs(s, 1.0))).sum(-1)
    ent = -(pt * torch.log(pt)).sum(-1)
    mask = labels != -100
    torch.testing.assert_close(L.forward_kl(s, t, labels), (ce - ent)[mask].sum())


def test_temperature_convention():
    s, t, labels = _data()
    T = 3.0
    raw = L.forward_kl(s, t, labels, temperature=T, scale_by_temperature_squared=False)
    scaled = L.forward_kl(s, t, labels, temperature=T)
    # logits are divided by T ...
    torch.testing.assert_close(raw, L.forward_kl(s / T, t / T, labels))
    # ... and the T² factor is on by default
    torch.testing.assert_close(scaled, raw * T**2)
    # gradient of the scaled loss w.r.t. the student logits is T (p_s - p_t) per valid token
    s1 = s.clone().requires_grad_(True)
    L.forward_kl(s1, t, labels, temperature=T).backward()
    expect = T * (_probs(s, T) - _probs(t, T)) * (labels != -100).unsqueeze(-1)
    torch.testing.assert_close(s1.grad, expect)
    assert L.ForwardKLLoss(temperature=T).scale == pytest.approx(T**2)
    assert L.ForwardKLLoss(temperature=T, scale_by_temperature_squared=False).scale == 1.0


def test_jsd_limits_are_forward_and_reverse_kl():
    s, t, labels = _data()
    fwd, rev = L.forward_kl(s, t, labels), L.reverse_kl(s, t, labels)
    torch.testing.assert_close(L.generalized_jsd(s, t, labels, beta=0.0), fwd)
    torch.testing.assert_close(L.generalized_jsd(s, t, labels, beta=1.0), rev)
    # the normalised family is continuous at the end points
    torch.testing.assert_close(L.generalized_jsd(s, t, labels, beta=1e-6), fwd, rtol=1e-4, atol=0)
    torch.testing.assert_close(L.generalized_jsd(s, t, labels, beta=1 - 1e-6), rev, rtol=1e-4, atol=0)
    # unnormalised β = 0.5 is the classic Jensen-Shannon divergence ≤ log 2 per token
    per = L.generalized_jsd_per_token(s, t, beta=0.5, normalize=False)
    assert (per <= math.log(2) + 1e-12).all()


def test_skew_alpha_zero_is_plain_kl():
    s, t, labels = _data()
    torch.testing.assert_close(L.skew_forward_kl(s, t, labels, alpha=0.0), L.forward_kl(s, t, labels))
    torch.testing.assert_close(L.skew_reverse_kl(s, t, labels, alpha=0.0), L.reverse_kl(s, t, labels))


def test_masked_positions_with_inf_logits_do_not_leak():
    s, t, labels = _data(torch.float32)
    s[0, 0] = float("nan")  # an ignored position
    assert labels[0, 0] == -100
    assert torch.isfinite(L.forward_kl(s, t, labels))


def test_teacher_with_minus_inf_logits_is_finite():
    s, t, labels = _data()
    t[..., -3:] = float("-inf")  # e.g. a teacher that masks some tokens
    s1 = s.clone().requires_grad_(True)
    out = L.forward_kl(s1, t, labels)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s1.grad).all()
    tt = t.clone()
    tt[..., -3:] = -1e4  # same distribution with finite logits
    torch.testing.assert_close(out.detach(), L.forward_kl(s, tt, labels))


def test_cross_entropy_sum_and_modules():
    s, _, labels = _data()
    ref = torch.nn.functional.cross_entropy(s.reshape(-1, V), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(L.cross_entropy_sum(s, labels), ref)
    n = (labels != -100).sum()
    torch.testing.assert_close(L.CrossEntropyLoss()(s, labels), ref / n)
    torch.testing.assert_close(L.CEWithChunkedOutputLoss(num_output_chunks=2)(list(s.chunk(2, dim=1)), labels), ref / n)
    assert L.CrossEntropyLoss()(s, torch.full_like(labels, -100)).item() == 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: L.ForwardKLLoss(temperature=0.0),
        lambda: L.ForwardKLLoss(reduction="avg"),
        lambda: L.JSDLoss(beta=1.5),
        lambda: L.SkewForwardKLLoss(alpha=1.0),
        lambda: L.ForwardKLWithChunkedOutputLoss(num_output_chunks=0),
    ],
)
def test_bad_settings_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_shape_mismatch_is_explained():
    s, t, labels = _data()
    with pytest.raises(ValueError, match="slice a padded teacher"):
        L.ForwardKLLoss()(s, torch.cat([t, t[..., :3]], dim=-1), labels)
