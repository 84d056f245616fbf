"""Run a recipe's ``train`` under torchrun and let rank 0 dump its RunSummary: ``<recipe> <result.json> --config ...``."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from kdtune.config import parse_recipe_args

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    name, result = sys.argv[1], Path(sys.argv[2])
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.train(parse_recipe_args(sys.argv[3:]))
    if int(os.environ.get("RANK", "0")) == 0:
        clean = [
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()} for m in summary.steps
        ]
        result.write_text(json.dumps({"steps": clean, "evals": summary.evals}))


if __name__ == "__main__":
    main()
