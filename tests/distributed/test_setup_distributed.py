"""setup_runtime under 2 gloo processes: rank 0 claims the output_dir and broadcasts the run id; when it refuses (a
fresh run where an earlier run's checkpoints are), every rank raises the same one-line error instead of hanging."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path


def _load_helpers():
    spec = importlib.util.spec_from_file_location("_kdtune_dist_helpers", Path(__file__).parent / "_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_h = _load_helpers()

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from omegaconf import OmegaConf
    from kdtune.errors import KDTuneError
    from kdtune.training import distributed as D, setup_runtime

    root = Path(sys.argv[1])
    env = D.init_distributed("cpu")
    res = {}
    rt = setup_runtime("cpu", "fp32", str(root / "fresh"), 0, cfg=OmegaConf.create({"resume_from_checkpoint": False}),
                       save_config_file=env.is_rank_zero)
    res["run_id"], res["locked"] = rt.run_id, rt.lock is not None
    try:
        setup_runtime("cpu", "fp32", str(root / "used"), 0, cfg=OmegaConf.create({"resume_from_checkpoint": False}))
    except KDTuneError as e:
        res["error"] = f"{type(e).__name__}: {e}"
    (root / f"rank{env.rank}.json").write_text(json.dumps(res))
    D.destroy_distributed()
    """
)


def test_run_id_is_shared_and_a_refusal_reaches_every_rank(tmp_path: Path) -> None:
    step = tmp_path / "used" / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _h.torchrun(script, str(tmp_path), timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["run_id"] and r0["run_id"] == r1["run_id"]
    assert (r0["locked"], r1["locked"]) == (True, False)  # one lock per run, held by rank 0
    assert r0["error"] == r1["error"]
    assert r0["error"].startswith("ConfigError: output_dir ") and "already holds resume checkpoints" in r0["error"]
