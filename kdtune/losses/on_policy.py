"""On-policy distillation (GKD, Agarwal et al. 2024) and sequence-level KD, as the source of a batch's completions.

:class:`OnPolicy` is a part of :class:`~kdtune.losses.DistillationObjective`: before a *training* micro-batch is scored,
with probability ``lmbda`` its completions are replaced by the current student's own samples (``seq_kd=True``:
otherwise by the teacher's samples). The prompt of each example is its tokens before its first trained label; the
completion is generated with the KV cache (:func:`kdtune.models.generation.generate`, model in eval mode, no
gradient), and the new batch trains on the completion tokens only (the prompt is masked). The objective then scores it
exactly like a dataset batch: the teacher runs on the new tokens and the divergence (mixed with the cross-entropy by
``kd_ratio``, as always) is taken on the student's log-probabilities of the sampled tokens, which are constants.
``kd_ratio=1`` is the GKD loss; with ``kd_ratio < 1`` the cross-entropy also trains on the student's own samples
(self-training), which reinforces its mistakes.

Randomness: the lmbda coin comes from a dedicated CPU generator seeded with ``seed`` (the same on every rank, so all
ranks of a sharded model generate together); sampling uses a dedicated generator on the model's device seeded by
``(seed, rank)``. Both are in :meth:`OnPolicy.state_dict`, which the resume checkpoints save, so resume is exact. With
``lmbda=0`` and ``seq_kd=False`` nothing is drawn and the batch is untouched: supervised KD exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.models.generation import generate

__all__ = ["OnPolicy", "completion_batch", "prompts_of"]

# keys of a collated batch on-policy sampling cannot rebuild (packed sequences, encoder-decoder inputs)
_UNSUPPORTED_KEYS = ("input_pos", "document_ids", "encoder_tokens", "encoder_padding_mask")


def prompts_of(tokens: Tensor, labels: Tensor, ignore_index: int = -100) -> list[list[int] | None]:
    """Each row's prompt: its tokens before its first trained label; None for a row without any trained label.

    Args:
        tokens: ``[B, T]`` input ids.
        labels: ``[B, T]`` labels aligned with ``tokens`` (``ignore_index`` where not trained).
        ignore_index: the label of untrained positions.
    """
    trained = labels != ignore_index  # [B, T]
    prompts: list[list[int] | None] = []
    for row, mask in zip(tokens.tolist(), trained.tolist()):
        first = mask.index(True) if True in mask else None
        prompts.append(row[:first] if first else None)  # a label at position 0 has no prompt to condition on
    return prompts


def completion_batch(
    prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int, ignore_index: int = -100
) -> dict[str, Tensor]:
    """``tokens``/``labels`` ``[B, T]`` of prompt + completion rows, right-padded; only completions are trained."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(rows), width), int(ignore_index), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, : len(p) + len(c)] = torch.tensor(rows[i], dtype=torch.long)
        if c:
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(list(c), dtype=torch.long)
    return {"tokens": tokens, "labels": labels}


def _cut_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class OnPolicy:
    """Samples a training batch's completions from the student (probability ``lmbda``) or the teacher (``seq_kd``).

    Args:
        lmbda: probability in [0, 1] that a micro-batch's completions are the current student's samples.
        max_new_tokens: the longest sampled completion (>= 1); completions end at a stop token or there.
        temperature: sampling temperature (0 = greedy).
        top_k: sample among the ``top_k`` most likely tokens only; None = all.
        seq_kd: the micro-batches not sampled from the student use the teacher's samples instead of the dataset's
            completions (sequence-level KD, Kim & Rush 2016).
        pad_id: the tokenizer's padding id.
        eos_ids: the tokenizer's stop ids.
        seed: seeds the lmbda coin (all ranks) and the sampling generator (per rank).
        ignore_index: the label of untrained positions.
    """

    def __init__(
        self,
        lmbda: float = 0.0,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        seq_kd: bool = False,
        *,
        pad_id: int = 0,
        eos_ids: Sequence[int] = (),
        seed: int = 0,
        ignore_index: int = -100,
    ) -> None:
        if isinstance(lmbda, bool) or not isinstance(lmbda, int | float) or not 0.0 <= float(lmbda) <= 1.0:
            raise ConfigError(f"on_policy.lmbda={lmbda!r} is invalid: it is a probability, give a number in [0, 1]")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"on_policy.max_new_tokens={max_new_tokens!r} is invalid: give an integer >= 1")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
            raise ConfigError(f"on_policy.temperature={temperature!r} is invalid: give a number >= 0 (0 = greedy)")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ConfigError(f"on_policy.top_k={top_k!r} is invalid: give an integer >= 1, or null for all tokens")
        self.lmbda = float(lmbda)
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_k = top_k
        self.seq_kd = bool(seq_kd)
        self.pad_id = int(pad_id)
        self.eos_ids = [int(i) for i in eos_ids]
        self.seed = int(seed)
        self.ignore_index = int(ignore_index)
        self.coin = torch.Generator().manual_seed(self.seed)
        self._sampler: torch.Generator | None = None
        self._pending_sampler_state: Tensor | None = None

    @property
    def active(self) -> bool:
        """False when no batch is ever changed (``lmbda=0`` without ``seq_kd``): supervised KD."""
        return self.lmbda > 0.0 or self.seq_kd

    def sampler(self, device: torch.device) -> torch.Generator:
        """The sampling generator on ``device``, seeded by (seed, rank) at first use (or restored from a checkpoint)."""
        if self._sampler is None or self._sampler.device != torch.device(device):
            rank, _ = _world()
            gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + 7919 * (rank + 1))
            if self._pending_sampler_state is not None:
                gen.set_state(self._pending_sampler_state)
                self._pending_sampler_state = None
            self._sampler = gen
        return self._sampler

    def draw(self) -> bool:
        """The lmbda coin: True when the next micro-batch's completions come from the student."""
        if self.lmbda <= 0.0:
            return False
        if self.lmbda >= 1.0:
            return True
        return bool(torch.rand((), generator=self.coin).item() < self.lmbda)

    def complete(self, model: nn.Module, prompts: Sequence[list[int]]) -> list[list[int]]:
        """``model``'s sampled completions of ``prompts`` (the KV-cache generation used for training).

        With several processes every rank runs ``max_new_tokens`` decoding steps (a sharded model's forward is a
        collective), and each completion is cut after its first stop token: the same tokens as stopping early.
        """
        device = next(iter(model.parameters())).device
        _, world = _world()
        sync = world > 1
        was_training = model.training
        with torch.no_grad():
            out = generate(
                model, list(prompts), self.max_new_tokens, eos_ids=None if sync else self.eos_ids,
                pad_id=self.pad_id, temperature=self.temperature, top_k=self.top_k, generator=self.sampler(device),
            )  # fmt: skip
        model.train(was_training)
        if sync and self.eos_ids:
            eos = set(self.eos_ids)
            out = [_cut_after_eos(ids, eos) for ids in out]
        return out

    def __call__(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None) -> dict[str, Any]:
        """The micro-batch to train on: ``batch`` itself, or its prompts with sampled completions."""
        if not self.active:
            return batch
        from_student = self.draw()
        if not from_student and not self.seq_kd:
            return batch
        model = student if from_student else teacher
        if model is None:
            raise ConfigError("on_policy.seq_kd=true needs a live teacher model (teacher_model), not teacher_logits")
        unsupported = [k for k in _UNSUPPORTED_KEYS if k in batch]
        if unsupported:
            raise ConfigError(
                f"on_policy sampling cannot rebuild batches with {', '.join(unsupported)} (packed or encoder-decoder "
                "data); set packed=false and use a decoder-only model, or set on_policy.lmbda=0 and seq_kd=false"
            )
        tokens, labels = batch["tokens"], batch["labels"]
        prompts = prompts_of(tokens, labels, self.ignore_index)
        keep = [i for i, p in enumerate(prompts) if p is not None]
        completions: list[list[int]] = [[] for _ in prompts]
        if keep:
            for i, c in zip(keep, self.complete(model, [prompts[i] for i in keep])):
                completions[i] = c
        # rows without a trained label stay as they are (nothing trained in them)
        rows = [p if p is not None else tokens[i].tolist() for i, p in enumerate(prompts)]
        out = completion_batch(rows, completions, self.pad_id, self.ignore_index)
        return {k: v.to(tokens.device) for k, v in out.items()}

    def state_dict(self) -> dict[str, Any]:
        """The coin's and the sampler's generator states (CPU byte tensors; the sampler's is None before first use)."""
        sampler = self._sampler.get_state() if self._sampler is not None else self._pending_sampler_state
        return {"coin": self.coin.get_state(), "sampler": sampler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s generator states."""
        self.coin.set_state(state["coin"])
        self._sampler = None
        self._pending_sampler_state = state.get("sampler")

    def __repr__(self) -> str:
        return (
            f"OnPolicy(lmbda={self.lmbda}, max_new_tokens={self.max_new_tokens}, temperature={self.temperature}, "
            f"top_k={self.top_k}, seq_kd={self.seq_kd})"
        )
