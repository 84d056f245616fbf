"""Teacher freezing / fingerprint, and teacher-student vocabulary checks."""

import pytest
import torch

import kdtune.losses as L
from kdtune.errors import ConfigError
from kdtune.models.llama import llama
from kdtune.training import assert_frozen, check_vocab_compatibility, param_fingerprint, setup_teacher


def _tiny(vocab=64, dim=32):
    return llama(
        vocab_size=vocab, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=dim, intermediate_dim=64, max_seq_len=32
    )


def test_teacher_weights_bit_identical_after_training_steps():
    torch.manual_seed(0)
    student, teacher = _tiny(), setup_teacher(_tiny(dim=48))
    teacher.train()  # a stray .train() is reported
    with pytest.raises(RuntimeError, match="train mode"):
        assert_frozen(teacher)
    setup_teacher(teacher)
    fp = param_fingerprint(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (2, 10))
    for _ in range(3):
        objective = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=0.5, num_output_chunks=2)
        objective(student, {"tokens": tokens, "labels": tokens}).loss_sum.backward()
        opt.step()
        opt.zero_grad()
    assert_frozen(teacher, fp, opt)
    assert param_fingerprint(teacher) == fp


def test_assert_frozen_detects_problems():
    t = setup_teacher(_tiny())
    fp = param_fingerprint(t)
    assert all(not p.requires_grad for p in t.parameters()) and not t.training
    with torch.no_grad():
        next(t.parameters()).add_(1e-3)
    with pytest.raises(RuntimeError, match="weights changed"):
        assert_frozen(t, fp)
    opt = torch.optim.SGD(t.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="optimizer"):
        assert_frozen(t, optimizer=opt)
    next(t.parameters()).requires_grad_(True)
    with pytest.raises(RuntimeError, match="gradients"):
        assert_frozen(t)


class _Tok:
    def __init__(self, vocab_size, shift=0, eos=2):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id, self.shift = vocab_size, 1, eos, 0, shift

    def encode(self, text, add_bos=True, add_eos=True):
        return [(ord(c) + self.shift) % self.vocab_size for c in text]


def test_vocab_equal_and_padded_both_ways():
    assert check_vocab_compatibility(151936, 151936) == 151936
    assert check_vocab_compatibility(151936, 152064) == 151936  # Qwen2.5-3B student, 14B teacher (padded)
    assert check_vocab_compatibility(152064, 151936) == 151936  # padded student
    tok = _Tok(151665)
    assert check_vocab_compatibility(151936, 152064, tok, _Tok(151665)) == 151936


def test_vocab_incompatible_is_refused_clearly():
    with pytest.raises(ConfigError, match="differ by more than padding"):
        check_vocab_compatibility(32000, 128256)  # Llama-2 student, Llama-3 teacher
    with pytest.raises(ConfigError, match="encode"):
        check_vocab_compatibility(1000, 1000, _Tok(900), _Tok(900, shift=1))
    with pytest.raises(ConfigError, match="eos_id"):
        check_vocab_compatibility(1000, 1000, _Tok(900), _Tok(900, eos=3))
    with pytest.raises(ConfigError, match="tokenizer has 1200 tokens"):
        check_vocab_compatibility(1000, 1280, _Tok(1200), _Tok(1200))
    # with identical tokenizers a large padding is fine (the tokenizer proves ids fit)
    assert check_vocab_compatibility(1000, 2048, _Tok(1000), _Tok(1000)) == 1000


def test_vocab_check_with_real_tokenizers(tmp_path):
    from kdtune.data import load_hf_tokenizer
    from kdtune.testing.tokenizers import write_bpe_tokenizer, write_sentencepiece_tokenizer

    for name, style in (("qwen_a", "qwen2"), ("qwen_b", "qwen2"), ("gpt2", "gpt2")):
        (tmp_path / name).mkdir()
        write_bpe_tokenizer(tmp_path / name, style=style)
    (tmp_path / "sp").mkdir()
    write_sentencepiece_tokenizer(tmp_path / "sp", style="llama2")
    qa, qb, g, sp = (load_hf_tokenizer(tmp_path / n) for n in ("qwen_a", "qwen_b", "gpt2", "sp"))
    # same tokenizer, teacher padded larger (the Qwen2.5 case) -> KD over the student's vocab
    assert check_vocab_compatibility(576, 640, qa, qb) == 576
    for other in (g, sp):
        with pytest.raises(ConfigError, match="tokenizers are incompatible"):
            check_vocab_compatibility(1024, 1024, qa, other)
