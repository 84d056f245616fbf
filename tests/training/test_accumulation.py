"""Token-normalised accumulation: batch 8 × accum 1 == batch 2 × accum 4 (and a simulated 2-rank run)."""

import math

import pytest
import torch

import kdtune.losses as L
from kdtune.errors import ConfigError
from kdtune.losses import DistillationObjective, ObjectiveOutput
from kdtune.models.llama import llama
from kdtune.training import StepAccumulator, scale_grads, setup_teacher

V = 64


def _models():
    torch.manual_seed(0)
    student = llama(
        vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64, max_seq_len=32
    )
    teacher = llama(
        vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=48, intermediate_dim=64, max_seq_len=32
    )
    return student, setup_teacher(teacher)


def _data():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (8, 12), generator=g)
    labels = tokens.clone()
    # very different numbers of valid tokens per example, so per-micro-batch averaging would be wrong
    for i in range(8):
        labels[i, : 2 + i] = -100
    return tokens, labels


def _step(student, teacher, tokens, labels, micro, kd_ratio=0.5, all_reduce=None, factor=1.0):
    student.zero_grad(set_to_none=True)
    acc = StepAccumulator(student, all_reduce=all_reduce, grad_average_factor=factor)
    objective = DistillationObjective(
        L.ForwardKLLoss(), teacher=teacher, kd_ratio=kd_ratio, temperature=2.0, num_output_chunks=3
    )
    for i in range(0, tokens.shape[0], micro):
        acc.backward(objective(student, {"tokens": tokens[i : i + micro], "labels": labels[i : i + micro]}))
    return acc, [p.grad.clone() for p in student.parameters()]


def _finish(student, teacher, tokens, labels, micro, **kw):
    acc, _ = _step(student, teacher, tokens, labels, micro, **kw)
    metrics = acc.finish()
    return metrics, [p.grad.clone() for p in student.parameters()]


def test_batch8_accum1_equals_batch2_accum4():
    student, teacher = _models()
    tokens, labels = _data()
    m8, g8 = _finish(student, teacher, tokens, labels, 8)
    m2, g2 = _finish(student, teacher, tokens, labels, 2)
    assert m8.num_tokens == m2.num_tokens == int((labels[:, 1:] != -100).sum())
    assert (m8.num_micro_batches, m2.num_micro_batches) == (1, 4)
    assert m2.loss == pytest.approx(m8.loss, rel=1e-6)
    assert m2.class_loss == pytest.approx(m8.class_loss, rel=1e-6)
    assert m2.kd_loss == pytest.approx(m8.kd_loss, rel=1e-6)
    assert m8.loss == pytest.approx(0.5 * m8.class_loss + 0.5 * m8.kd_loss, rel=1e-6)
    for a, b in zip(g8, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_naive_per_micro_batch_mean_would_differ():
    # guards the test above: with these uneven masks, averaging per-micro-batch means gives different gradients
    student, teacher = _models()
    tokens, labels = _data()
    _, g8 = _finish(student, teacher, tokens, labels, 8)
    naive = [torch.zeros_like(g) for g in g8]
    for i in range(0, 8, 2):
        _, g = _finish(student, teacher, tokens[i : i + 2], labels[i : i + 2], 2)
        naive = [n + x / 4 for n, x in zip(naive, g)]
    rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(naive, g8))
    assert rel > 1e-2


def test_simulated_two_ranks_with_all_reduce_and_averaging():
    student, teacher = _models()
    tokens, labels = _data()
    _, g_single = _finish(student, teacher, tokens, labels, 2)

    # rank r gets rows r::2 and accumulates 2 micro-batches of 2; the "all-reduce" sums both ranks' counters and the
    # data-parallel wrapper averages the gradients (mean over 2 ranks), hence grad_average_factor=2.
    parts = [(tokens[r::2], labels[r::2]) for r in range(2)]
    accs, grads = [], []
    for r in range(2):
        acc, g = _step(student, teacher, *parts[r], 2, factor=2.0)
        accs.append(acc)
        grads.append(g)
    snap = [(a._tokens.clone(), a._sums.clone()) for a in accs]

    def reducer(x):
        idx = 0 if x.dtype == torch.int64 else 1
        return snap[0][idx] + snap[1][idx]

    finished = []
    for r in range(2):
        student.zero_grad(set_to_none=True)
        for p, g in zip(student.parameters(), grads[r]):
            p.grad = g.clone()
        accs[r]._all_reduce = reducer
        metrics = accs[r].finish()
        finished.append([p.grad.clone() for p in student.parameters()])
    averaged = [(a + b) / 2 for a, b in zip(*finished)]  # what DDP / FSDP do
    for a, b in zip(averaged, g_single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert metrics.num_tokens == int((labels[:, 1:] != -100).sum())


def test_objective_mix_and_kd_ratio_checks():
    _, teacher = _models()

    def mix(ratio):
        return DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=ratio).mix

    c, k = torch.tensor(2.0), torch.tensor(6.0)
    assert mix(0.25)(c, k).item() == pytest.approx(0.75 * 2 + 0.25 * 6)
    nan = torch.tensor(float("nan"))
    assert mix(0.0)(c, nan).item() == 2.0  # unused term dropped, not multiplied by 0
    assert mix(1.0)(nan, k).item() == 6.0
    assert DistillationObjective().mix(c, nan).item() == 2.0  # fine-tuning: cross-entropy only
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ConfigError, match="kd_ratio"):
            DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=bad)


def test_scale_grads_and_empty_step():
    lin = torch.nn.Linear(3, 2)
    lin(torch.ones(1, 3)).sum().backward()
    before = lin.weight.grad.clone()
    scale_grads(lin, 0.5)
    torch.testing.assert_close(lin.weight.grad, before * 0.5)
    acc = StepAccumulator(lin)
    acc.add(ObjectiveOutput(torch.zeros(()), torch.zeros(()), None, torch.tensor(0)))
    m = acc.finish()
    assert m.num_tokens == 0 and m.loss == 0.0 and math.isnan(m.kd_loss)
    with pytest.raises(RuntimeError):
        acc.finish()
