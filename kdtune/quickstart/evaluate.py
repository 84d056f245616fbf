"""Scoring for the quickstart: exact match of greedy answers, and held-out loss."""

from __future__ import annotations


def normalize_answer(text: str) -> str:
    """Answers are compared after trimming surrounding whitespace and collapsing inner runs of it."""
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction is exactly the answer (up to whitespace, see :func:`normalize_answer`)."""
    return normalize_answer(prediction) == normalize_answer(answer)


def accuracy(predictions: list[str], answers: list[str]) -> float:
    """Fraction of exact matches; raises if the lists differ in length (a silent zip would hide a bug)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(exact_match(p, a) for p, a in zip(predictions, answers)) / len(answers)


def evaluate_checkpoint(
    checkpoint_dir: str,
    examples: list,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> dict:
    """Greedy-generate an answer for every example with the KV cache and score it; also the held-out loss.

    Args:
        checkpoint_dir: an HF-format model directory with its tokenizer files (a recipe's ``final/`` output).
        examples: :class:`kdtune.quickstart.tasks.TaskExample` items.
        batch_size: prompts decoded together (left-padded).
        max_new_tokens: generation budget; every quickstart answer is shorter.

    Returns:
        ``{"accuracy", "loss", "per_task": {task: accuracy}, "samples": [(prompt, answer, prediction), ...]}`` where
        ``loss`` is the mean cross-entropy per answer token (the tokens a recipe trains on).
    """
    import torch
    import torch.nn.functional as F

    from kdtune.data import Message, load_hf_tokenizer, mask_messages
    from kdtune.models import load_hf_model
    from kdtune.models.generation import generate

    tokenizer = load_hf_tokenizer(checkpoint_dir)
    model = load_hf_model(checkpoint_dir, dtype=torch.float32, device="cpu")
    model.eval()

    predictions: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [
            tokenizer.tokenize_messages([Message("user", ex.prompt)], add_eos=False, add_generation_prompt=True)[0]
            for ex in chunk
        ]
        with torch.no_grad():
            outputs = generate(
                model, prompts, max_new_tokens=max_new_tokens, eos_ids=list(tokenizer.stop_ids), pad_id=tokenizer.pad_id
            )
        predictions += [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]

    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            messages = mask_messages([Message("user", ex.prompt), Message("assistant", ex.answer)])
            ids, mask = tokenizer.tokenize_messages(messages)
            tokens = torch.tensor([ids])
            labels = torch.tensor([[-100 if m else t for t, m in zip(ids, mask)]])
            logits = model(tokens)  # [1, T, V]
            loss = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")
            total_loss += float(loss)
            total_tokens += int((labels[0, 1:] != -100).sum())

    answers = [ex.answer for ex in examples]
    per_task: dict[str, list[bool]] = {}
    for ex, pred in zip(examples, predictions):
        per_task.setdefault(ex.task, []).append(exact_match(pred, ex.answer))
    return {
        "accuracy": accuracy(predictions, answers),
        "loss": total_loss / max(total_tokens, 1),
        "per_task": {task: sum(hits) / len(hits) for task, hits in sorted(per_task.items())},
        "samples": [(ex.prompt, ex.answer, pred) for ex, pred in list(zip(examples, predictions))[:8]],
    }
