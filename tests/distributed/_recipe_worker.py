"""Run recipes one after the other under one torchrun launch (saves process start-up): ``_recipe_worker.py jobs.json``.

Each job is ``{"recipe": name, "result": path, "argv": [...], "copy": [src, dst] | null}``: rank 0 first copies the
directory ``src`` to ``dst`` (the others wait for it), then every rank runs ``recipes/<name>.py``'s ``train``, and
rank 0 dumps the RunSummary to ``result``. The jobs share one process group: ``init_distributed`` reuses an existing
group, and the recipes' teardown is deferred to the end (creating a group again in the same torchrun workers can hang
in the rendezvous, a test-harness concern only: a real run is one recipe per launch).
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from kdtune.config import parse_recipe_args
from kdtune.training import distributed as D

REPO = Path(__file__).resolve().parents[2]


def _copy_then_wait(src: Path, dst: Path, rank: int) -> None:
    if rank == 0:
        tmp = dst.with_name(dst.name + ".copying")
        shutil.copytree(src, tmp)
        os.replace(tmp, dst)
    deadline = time.time() + 120
    while not dst.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{dst} never appeared")
        time.sleep(0.05)


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    destroy = D.destroy_distributed
    D.destroy_distributed = lambda: None  # keep the group for the next job (see the module docstring)
    # if a job hangs, print every thread's stack before the test's timeout kills us
    faulthandler.dump_traceback_later(float(os.environ.get("KDTUNE_TEST_HANG_DUMP_S", "240")), exit=False)
    for job in json.loads(Path(sys.argv[1]).read_text()):
        if job.get("copy"):
            src, dst = (Path(p) for p in job["copy"])
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy_then_wait(src, dst, rank)
        name = job["recipe"]
        spec = importlib.util.spec_from_file_location(f"_recipe_{name}", REPO / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        summary = module.train(parse_recipe_args(job["argv"]))
        if rank == 0:
            steps = [
                {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
                for m in summary.steps
            ]
            Path(job["result"]).write_text(json.dumps({"steps": steps, "evals": summary.evals}))
    destroy()


if __name__ == "__main__":
    main()
