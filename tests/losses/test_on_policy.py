"""On-policy distillation (OnPolicy inside DistillationObjective) vs references written here: the model's own
KV-cache generation, and the divergence on the sampled tokens computed from full logits."""

import pytest
import torch
import torch.nn.functional as F

import kdtune.losses as L
from kdtune.errors import ConfigError
from kdtune.losses.on_policy import completion_batch, prompts_of
from kdtune.models.generation import generate
from kdtune.models.llama import llama

VOCAB, PAD, EOS = 50, 0, 7


def _model(dim: int, seed: int):
    torch.manual_seed(seed)
    m = llama(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=dim, intermediate_dim=64,
              max_seq_len=64)  # fmt: skip
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


def _batch():
    # rows: prompt of 3 / 5 / 4 tokens, then the dataset's completion; row 1 is right-padded
    tokens = torch.tensor(
        [[5, 9, 11, 20, 21, 22, 7], [5, 12, 13, 14, 15, 30, 7], [5, 16, 17, 18, 31, PAD, PAD]], dtype=torch.long
    )
    labels = tokens.clone()
    labels[0, :3] = labels[1, :5] = labels[2, :4] = -100
    labels[2, 5:] = -100
    return {"tokens": tokens, "labels": labels}


def _prompts():
    return [[5, 9, 11], [5, 12, 13, 14, 15], [5, 16, 17, 18]]


def _op(**kw):
    args = dict(lmbda=1.0, max_new_tokens=6, temperature=1.0, pad_id=PAD, eos_ids=[EOS], seed=3)
    return L.OnPolicy(**{**args, **kw})


def test_prompts_and_completion_batch():
    assert prompts_of(_batch()["tokens"], _batch()["labels"]) == _prompts()
    out = completion_batch([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=PAD)
    assert out["tokens"].tolist() == [[1, 2, 4, 5, 6], [3, 7, PAD, PAD, PAD]]
    assert out["labels"].tolist() == [[-100, -100, 4, 5, 6], [-100, 7, -100, -100, -100]]


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 5)])
def test_training_completions_are_the_models_own_generation(temperature, top_k):
    """The batch trained on holds exactly what generate() gives with the same generator state (greedy or seeded)."""
    student = _model(32, 0).train()
    op = _op(temperature=temperature, top_k=top_k)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(op.sampler(torch.device("cpu")).get_state())
    global_rng = torch.get_rng_state()
    out = op(_batch(), student, None)
    assert torch.equal(torch.get_rng_state(), global_rng)  # a dedicated generator: dropout's stream is untouched
    assert student.training  # train mode restored after eval-mode generation
    want = generate(student, _prompts(), 6, eos_ids=[EOS], pad_id=PAD, temperature=temperature, top_k=top_k,
                    generator=gen)  # fmt: skip
    ref = completion_batch(_prompts(), want, PAD)
    assert torch.equal(out["tokens"], ref["tokens"]) and torch.equal(out["labels"], ref["labels"])


def test_seq_kd_takes_the_teachers_completions():
    student, teacher = _model(32, 0).train(), _model(64, 1).eval()
    op = _op(lmbda=0.0, seq_kd=True, temperature=0.0)
    out = op(_batch(), student, teacher)
    want = generate(teacher, _prompts(), 6, eos_ids=[EOS], pad_id=PAD)
    assert torch.equal(out["tokens"], completion_batch(_prompts(), want, PAD)["tokens"])


def test_lmbda_coin_is_seeded_and_has_the_right_rate():
    a, b = _op(lmbda=0.3), _op(lmbda=0.3)
    draws = [a.draw() for _ in range(2000)]
    assert draws == [b.draw() for _ in range(2000)]
    assert 0.25 < sum(draws) / len(draws) < 0.35


def _reference_kd_sum(student, teacher, batch):
    """Forward KL(teacher || student) summed over the completion positions, from full logits (T = 1)."""
    s_logp = F.log_softmax(student(batch["tokens"]).float(), -1)[:, :-1]
    with torch.no_grad():
        t_logp = F.log_softmax(teacher(batch["tokens"]).float(), -1)[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)[mask].sum()


def test_gradients_flow_only_through_the_students_log_probs_of_its_samples():
    student, teacher = _model(32, 0).train(), _model(64, 1).eval().requires_grad_(False)
    op = _op(temperature=1.0)
    objective = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=1.0, num_output_chunks=3,
                                        on_policy=op)  # fmt: skip
    state = op.state_dict()
    out = objective(student, _batch())
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    # the same samples, again: reference loss on the sampled batch from full logits
    op.load_state_dict(state)
    sampled = op(_batch(), student, None)
    labels = sampled["labels"]
    prompt_lens = [len(p) for p in _prompts()]
    for i, n in enumerate(prompt_lens):
        assert (labels[i, :n] == -100).all() and labels[i, n] != -100  # prompt masked, completion trained
    assert not sampled["tokens"].requires_grad and sampled["tokens"].dtype == torch.long  # sampled ids: constants
    assert int(out.num_tokens) == int((labels[:, 1:] != -100).sum())
    student.zero_grad()
    ref = _reference_kd_sum(student, teacher, sampled)
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lmbda_zero_is_supervised_kd_bit_for_bit():
    teacher = _model(64, 1).eval().requires_grad_(False)
    results = []
    for on_policy in (None, _op(lmbda=0.0)):
        student = _model(32, 0).train()
        objective = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=0.5, on_policy=on_policy)
        out = objective(student, _batch())
        out.loss_sum.backward()
        results.append((out, [p.grad.clone() for p in student.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.equal(a.loss_sum, b.loss_sum) and torch.equal(a.kd_loss_sum, b.kd_loss_sum)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_evaluation_uses_the_dataset_completions():
    """In eval mode / without gradients the objective scores the batch as given (validation stays comparable)."""
    student, teacher = _model(32, 0), _model(64, 1).eval().requires_grad_(False)
    plain = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher)
    on_policy = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, on_policy=_op())
    with torch.no_grad():
        student.eval()
        assert torch.equal(plain(student, _batch()).loss_sum, on_policy(student, _batch()).loss_sum)


def test_cached_teacher_or_no_teacher_is_refused(tmp_path):
    class FakeCache:
        def prepare(self, batch, mask):
            return ()

        def log_probs(self, state, student_logits, temperature):
            return student_logits, student_logits

    with pytest.raises(ConfigError, match="live teacher.*FakeCache"):
        L.DistillationObjective(L.ForwardKLLoss(), teacher=FakeCache(), on_policy=_op(lmbda=0.5))
    with pytest.raises(ConfigError, match="live teacher"):
        L.DistillationObjective(L.ForwardKLLoss(), teacher=FakeCache(), on_policy=_op(lmbda=0.0, seq_kd=True))
    L.DistillationObjective(L.ForwardKLLoss(), teacher=FakeCache(), on_policy=_op(lmbda=0.0))  # inactive: fine


@pytest.mark.parametrize(
    "kw, match",
    [({"lmbda": 1.5}, "lmbda"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"),
     ({"top_k": 0}, "top_k")],
)  # fmt: skip
def test_invalid_settings_are_one_line_errors(kw, match):
    with pytest.raises(ConfigError, match=f"on_policy.{match}"):
        _op(**kw)


def test_packed_batches_are_refused():
    student, teacher = _model(32, 0).train(), _model(64, 1).eval().requires_grad_(False)
    batch = {**_batch(), "input_pos": torch.zeros(3, 7, dtype=torch.long)}
    with pytest.raises(ConfigError, match="packed"):
        _op()(batch, student, teacher)


def test_state_dict_round_trip_continues_the_same_streams():
    student = _model(32, 0).train()
    a = _op(lmbda=0.5)
    a(_batch(), student, None)
    state = a.state_dict()
    first = [a(_batch(), student, None)["tokens"].tolist() for _ in range(3)]
    b = _op(lmbda=0.5)
    b.load_state_dict(state)
    assert [b(_batch(), student, None)["tokens"].tolist() for _ in range(3)] == first
