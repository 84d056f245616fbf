"""On-policy KD with an FSDP-sharded student on 2 CPU processes (gloo): each rank generates its share with the sharded
student (every rank decodes the same number of steps), and the run equals the single-device run with the same global
batch; resume from a sharded checkpoint (per-rank sampling RNG) is exact.

Greedy completions make the two runs comparable: the lmbda coin is shared by all ranks (seeded alike), but sampled
completions come from a per-rank generator, so with temperature > 0 they depend on the number of processes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_here = Path(__file__).parent
_h = _load("_kdtune_dist_helpers", _here / "_helpers.py")
_r = _load("_kdtune_dist_recipes", _here / "test_recipes_distributed.py")

pytestmark = pytest.mark.slow
ON_POLICY = ("+on_policy={lmbda: 0.5, max_new_tokens: 6, temperature: 0.0}", "max_steps=4", "save_every_n_steps=2",
             "eval_every_n_steps=2")  # fmt: skip
SAMPLED = ("+on_policy={lmbda: 1.0, max_new_tokens: 6, temperature: 1.0}", "max_steps=2", "save_every_n_steps=1",
           "eval_every_n_steps=null")  # fmt: skip


@pytest.fixture(scope="module")
def runs(dist_tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("on_policy_runs")
    kd = "knowledge_distillation_distributed"
    jobs = [
        _r._job(kd, "kd_distributed", dist_tiny, root / "op", *ON_POLICY),
        _r._job(kd, "kd_distributed", dist_tiny, root / "sampled", *SAMPLED),
        _r._job(kd, "kd_distributed", dist_tiny, root / "sampled_resumed", *SAMPLED, "resume_from_checkpoint=true",
                copy=[str(root / "sampled" / "checkpoints" / "step_1"),
                      str(root / "sampled_resumed" / "checkpoints" / "step_1")]),
    ]  # fmt: skip
    (root / "jobs.json").write_text(json.dumps(jobs))
    _h.torchrun(_r.WORKER, str(root / "jobs.json"))
    out = {
        "root": root,
        **{n: json.loads((root / f"{n}.json").read_text()) for n in ("op", "sampled", "sampled_resumed")},
    }
    out["op_single"] = _r._run_single("knowledge_distillation_single_device", "kd", dist_tiny, root / "op_single",
                                      *ON_POLICY)  # fmt: skip
    return out


def test_on_policy_2proc_equals_single_device(runs: dict) -> None:
    dist, single = runs["op"], runs["op_single"]
    assert len(dist["steps"]) == 4
    _r._assert_same_steps(dist["steps"], single["steps"])
    for ea, eb in zip(dist["evals"], single["evals"]):
        assert abs(ea["val_loss"] - eb["val_loss"]) < _r.TOL
    assert _r._max_weight_diff(runs["root"] / "op" / "final", runs["root"] / "op_single" / "final") < _r.TOL


def test_sampled_on_policy_resume_is_exact(runs: dict) -> None:
    root = runs["root"]
    assert sorted(p.name for p in (root / "sampled" / "checkpoints" / "step_1").glob("components_rank*.pt")) == [
        "components_rank0.pt", "components_rank1.pt"]  # fmt: skip
    resumed, full = runs["sampled_resumed"]["steps"], runs["sampled"]["steps"][1:]
    assert [m["step"] for m in resumed] == [2]
    _r._assert_same_steps(resumed, full)
    assert _r._max_weight_diff(root / "sampled_resumed" / "final", root / "sampled" / "final") < 1e-6
