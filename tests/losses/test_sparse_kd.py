"""Sparse (top-k) KD losses: k = V equals the dense losses of kdtune.losses.functional (values and gradients, 1e-6);
k < V equals float64 formulas written here for both tail modes; stability with a peaked teacher and bf16 storage."""

import math

import numpy as np
import pytest
import torch

import kdtune.losses.functional as F
from kdtune.errors import ConfigError
from kdtune.losses import sparse as S

V = 37
N = 9


def _dense(fn):
    """The dense loss sum of a divergence on full-vocabulary logits: T² · Σ fn(log_softmax(s/T), log_softmax(t/T))."""

    def loss(s, t, *, temperature=1.0, scale_by_temperature_squared=True, **kw):
        total = fn(F.log_probs(s, temperature), F.log_probs(t, temperature), **kw).sum()
        return total * temperature**2 if scale_by_temperature_squared and temperature != 1.0 else total

    return loss


# name -> (sparse divergence name, dense reducing function, kwargs)
CASES = {
    "forward_kl": ("forward_kl", _dense(F.forward_kl), {}),
    "reverse_kl": ("reverse_kl", _dense(F.reverse_kl), {}),
    "symmetric_kl": ("symmetric_kl", _dense(F.symmetric_kl), {}),
    "jsd_0.5": ("jsd", _dense(F.generalized_jsd), {"beta": 0.5}),
    "jsd_0.1_unnormalized": ("jsd", _dense(F.generalized_jsd), {"beta": 0.1, "normalize": False}),
    "jsd_0": ("jsd", _dense(F.generalized_jsd), {"beta": 0.0}),
    "jsd_1": ("jsd", _dense(F.generalized_jsd), {"beta": 1.0}),
    "skew_forward_kl": ("skew_forward_kl", _dense(F.skew_forward_kl), {"alpha": 0.1}),
    "skew_reverse_kl": ("skew_reverse_kl", _dense(F.skew_reverse_kl), {"alpha": 0.2}),
    "tvd": ("tvd", _dense(F.total_variation), {}),
}


def _logits(seed: int, scale: float = 3.0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, V, generator=g) * scale).to(dtype), (torch.randn(N, V, generator=g) * scale).to(dtype)


def _teacher_topk(t_logits: torch.Tensor, k: int, T: float, shuffle: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(t_logits / T, -1)
    vals, ids = logp.topk(k, -1)
    if shuffle:  # the support's order must not matter
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(7))
        vals, ids = vals[:, perm], ids[:, perm]
    return ids.to(torch.int32), vals


@pytest.mark.parametrize("tail", S.TAIL_MODES)
@pytest.mark.parametrize("T,t2", [(1.0, True), (2.0, True), (2.0, False), (0.7, True)])
@pytest.mark.parametrize("case", list(CASES))
def test_k_equals_v_is_the_dense_loss(case: str, T: float, t2: bool, tail: str) -> None:
    name, dense, kw = CASES[case]
    s, t = _logits(0)
    ids, t_logp = _teacher_topk(t, V, T, shuffle=True)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    sparse = S.sparse_kd_loss_sum(
        s1, ids, t_logp, name, tail=tail, temperature=T, scale_by_temperature_squared=t2, **kw
    )
    ref = dense(s2, t, temperature=T, scale_by_temperature_squared=t2, **kw)
    torch.testing.assert_close(sparse, ref, atol=1e-6, rtol=1e-6)
    sparse.backward()
    ref.backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ float64 formulas for k < V
def _softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ref_supports(s: np.ndarray, t: np.ndarray, k: int, T: float, tail: str) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of both models on the support, float64, from the definitions (no log-space tricks)."""
    ps, pt = _softmax64(s / T), _softmax64(t / T)
    out_s, out_t = [], []
    for i in range(s.shape[0]):
        top = np.argsort(-pt[i], kind="stable")[:k]
        qs, qt = ps[i, top], pt[i, top]
        if tail == "bucket":
            qs = np.append(qs, 1.0 - qs.sum())
            qt = np.append(qt, 1.0 - qt.sum())
        else:
            qs, qt = qs / qs.sum(), qt / qt.sum()
        out_s.append(qs)
        out_t.append(qt)
    return np.stack(out_s), np.stack(out_t)


def _kl64(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


def _ref_divergence(case: str, ps: np.ndarray, pt: np.ndarray) -> np.ndarray:
    _, _, kw = CASES[case]
    if case == "forward_kl":
        return _kl64(pt, ps)
    if case == "reverse_kl":
        return _kl64(ps, pt)
    if case == "symmetric_kl":
        return _kl64(pt, ps) + _kl64(ps, pt)
    if case.startswith("jsd"):
        b = kw["beta"]
        if b == 0.0:
            return _kl64(pt, ps)
        if b == 1.0:
            return _kl64(ps, pt)
        m = b * pt + (1 - b) * ps
        j = b * _kl64(pt, m) + (1 - b) * _kl64(ps, m)
        return j / (b * (1 - b)) if kw.get("normalize", True) else j
    if case == "skew_forward_kl":
        a = kw["alpha"]
        return _kl64(pt, a * pt + (1 - a) * ps)
    if case == "skew_reverse_kl":
        a = kw["alpha"]
        return _kl64(ps, a * ps + (1 - a) * pt)
    if case == "tvd":
        return 0.5 * np.abs(pt - ps).sum(-1)
    raise AssertionError(case)


@pytest.mark.parametrize("tail", S.TAIL_MODES)
@pytest.mark.parametrize("k,T", [(1, 1.0), (5, 1.0), (8, 2.0), (36, 1.5)])
@pytest.mark.parametrize("case", list(CASES))
def test_k_below_v_matches_float64_formula(case: str, k: int, T: float, tail: str) -> None:
    name, _, kw = CASES[case]
    s, t = _logits(1, dtype=torch.float64)
    ids, t_logp = _teacher_topk(t.float(), k, T)  # what a cache stores: fp32 log-probs
    got = S.sparse_kd_loss_sum(s.float(), ids, t_logp, name, tail=tail, temperature=T, **kw)
    ps, pt = _ref_supports(s.numpy(), t.numpy(), k, T, tail)
    want = float(_ref_divergence(case, ps, pt).sum()) * T * T
    assert math.isclose(float(got), want, rel_tol=2e-5, abs_tol=2e-6), (float(got), want)


@pytest.mark.parametrize("tail", S.TAIL_MODES)
@pytest.mark.parametrize("case", ["forward_kl", "reverse_kl", "jsd_0.5", "skew_forward_kl", "tvd"])
def test_k_below_v_gradients_match_finite_differences(case: str, tail: str) -> None:
    name, _, kw = CASES[case]
    s, t = _logits(2, dtype=torch.float64)
    ids, t_logp = _teacher_topk(t, 6, 1.3)
    s = s.requires_grad_(True)
    fn = lambda x: S.sparse_kd_loss_sum(x, ids, t_logp, name, tail=tail, temperature=1.3, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-6)


def test_bucket_supports_sum_to_one_and_the_tail_is_the_rest() -> None:
    s, t = _logits(3)
    ids, t_logp = _teacher_topk(t, 4, 1.0)
    s_sup, t_sup = S.sparse_support(torch.log_softmax(s, -1), ids, t_logp, "bucket")
    assert s_sup.shape == t_sup.shape == (N, 5)
    torch.testing.assert_close(s_sup.exp().sum(-1), torch.ones(N), atol=1e-6, rtol=0)
    torch.testing.assert_close(t_sup.exp().sum(-1), torch.ones(N), atol=1e-6, rtol=0)
    p_t = torch.softmax(t.double(), -1)
    rest = 1 - p_t.gather(-1, ids.long()).sum(-1)
    torch.testing.assert_close(t_sup[:, -1].double().exp(), rest, atol=1e-6, rtol=1e-4)


def test_log1mexp_is_stable_at_both_ends() -> None:
    x = torch.tensor([-1e-20, -1e-8, -0.1, -math.log(2), -1.0, -20.0, -100.0], dtype=torch.float64)
    want = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(S.log1mexp(x), want, rtol=1e-12, atol=1e-16)
    assert S.log1mexp(torch.tensor(-1e-30, dtype=torch.float64)).item() == pytest.approx(math.log(1e-30), rel=1e-12)
    assert S.log1mexp(torch.tensor(-100.0, dtype=torch.float64)).item() == pytest.approx(-math.exp(-100.0), rel=1e-12)
    x32 = x.float().requires_grad_(True)
    S.log1mexp(x32).sum().backward()
    assert torch.isfinite(x32.grad).all()


@pytest.mark.parametrize("case", ["forward_kl", "reverse_kl", "jsd_0.5", "symmetric_kl"])
def test_peaked_teacher_and_bf16_values_stay_finite(case: str) -> None:
    """A teacher whose top-k holds all the mass (tail underflows), stored in bf16 (Σ p_t may round above 1)."""
    name, _, kw = CASES[case]
    s, t = _logits(4)
    t = t.clone()
    t[:, 0] = 200.0  # p_t(token 0) = 1 to float precision
    ids, t_logp = _teacher_topk(t, 3, 1.0)
    t_logp_bf16 = (t_logp + 0.004).to(torch.bfloat16)  # pushes Σ p_t above 1
    for tail in S.TAIL_MODES:
        x = s.clone().requires_grad_(True)
        loss = S.sparse_kd_loss_sum(x, ids, t_logp_bf16, name, tail=tail, **kw)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), (tail, loss)


def test_errors() -> None:
    s, t = _logits(5)
    ids, t_logp = _teacher_topk(t, 3, 1.0)
    with pytest.raises(ConfigError, match="tail"):
        S.sparse_kd_loss_sum(s, ids, t_logp, tail="drop")
    with pytest.raises(ConfigError, match="divergence"):
        S.sparse_kd_loss_sum(s, ids, t_logp, "kl")
    with pytest.raises(ConfigError, match="temperature"):
        S.sparse_kd_loss_sum(s, ids, t_logp, temperature=0.0)
    with pytest.raises(ValueError):
        S.sparse_support(torch.log_softmax(s, -1), ids, t_logp[:, :2])
