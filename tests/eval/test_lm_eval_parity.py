"""kdtune's lm-eval model scores and generates like lm-eval's own ``hf`` model on the same tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

MAX_LEN = 48  # small, so few-shot contexts and long texts are left-truncated / windowed


def _evaluate(lm, task_dir: Path, tasks: list[str], **kwargs):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(
        model=lm, tasks=tasks, task_manager=tm, log_samples=True, bootstrap_iters=0, limit=None, **kwargs
    )


def _models(model_dir: Path, batch_size: int):
    import torch
    from lm_eval.models.huggingface import HFLM

    from kdtune.eval.lm import KDTuneLM

    torch.manual_seed(0)
    ours = KDTuneLM.from_pretrained(model_dir, device="cpu", dtype="fp32", max_seq_len=MAX_LEN, batch_size=batch_size)
    ref = HFLM(
        pretrained=str(model_dir), tokenizer=str(model_dir), max_length=MAX_LEN, batch_size=batch_size,
        device="cpu", dtype="float32",
    )  # fmt: skip
    return ours, ref


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_scores_and_generations_match_hf_backend(eval_models, task_dir, family) -> None:
    ours, ref = _models(eval_models[family], batch_size=3)
    tasks = ["kd_mc", "kd_ppl", "kd_gen"]
    a = _evaluate(ours, task_dir, tasks, num_fewshot=2)
    b = _evaluate(ref, task_dir, tasks, num_fewshot=2)
    for task in tasks:
        sa, sb = a["samples"][task], b["samples"][task]
        assert len(sa) == len(sb) == 12
        for x, y in zip(sa, sb, strict=True):
            assert x["arguments"] == y["arguments"]
            for ra, rb in zip(x["resps"], y["resps"], strict=True):
                if task == "kd_gen":
                    assert ra == rb  # identical generations
                elif task == "kd_mc":
                    assert ra[0][0] == pytest.approx(rb[0][0], abs=1e-4) and ra[0][1] == rb[0][1]
                else:
                    assert ra[0] == pytest.approx(rb[0], abs=1e-4)
        for metric, value in a["results"][task].items():
            if isinstance(value, float):
                assert value == pytest.approx(b["results"][task][metric], rel=1e-4, abs=1e-4), (task, metric)
    # the fixture really truncates: some few-shot contexts are longer than MAX_LEN tokens
    longest = max(len(ours.tok_encode(s["arguments"][0][0])) for s in a["samples"]["kd_mc"])
    assert longest > MAX_LEN


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_generate_until_stop_sequences_match_hf_backend(eval_models, family) -> None:
    """Batch size 1 for the reference: batched, lm-eval's hf model can end a row before its own stop sequence appears
    (its stopping criteria act on the whole batch), while kdtune ends each row at its own stop; so kdtune batched must
    equal kdtune unbatched, and kdtune must equal hf row by row."""
    from lm_eval.api.instance import Instance

    ours, ref = _models(eval_models[family], batch_size=1)
    batched, _ = _models(eval_models[family], batch_size=3)

    def requests(until: list[str], n: int = 12) -> list[Instance]:
        prompts = ["Say red cat", "reverse: one two three", "big dog", "green bird and a slow cat please", "x"]
        return [
            Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": n, "do_sample": False}), i)
            for i, p in enumerate(prompts)
        ]

    free = ours.generate_until(requests([]), disable_tqdm=True)
    assert free == ref.generate_until(requests([]), disable_tqdm=True)
    assert free == batched.generate_until(requests([]), disable_tqdm=True)
    # stop sequences taken from inside the model's own outputs, so they are really hit mid-text
    stops = sorted({t[3:5] for t in free if len(t) >= 5 and t[3:5].strip()})
    assert stops
    got = ours.generate_until(requests(stops), disable_tqdm=True)
    assert got == ref.generate_until(requests(stops), disable_tqdm=True)
    assert got == batched.generate_until(requests(stops), disable_tqdm=True)
    assert sum(len(g) < len(f) for g, f in zip(got, free)) >= 1  # a stop sequence cut at least one output
    # a request's own max_gen_toks
    short = ours.generate_until(requests([], n=3), disable_tqdm=True)
    assert short == ref.generate_until(requests([], n=3), disable_tqdm=True)
    assert short == batched.generate_until(requests([], n=3), disable_tqdm=True)
