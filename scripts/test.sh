#!/usr/bin/env bash
# Install what is missing (fast and idempotent), then run the test suite on 2 workers.
#   bash scripts/test.sh                 # the whole suite
#   bash scripts/test.sh tests/config -x # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd -P)"
PY="${PYTHON:-python3}"

# 1. torch first, pinned: here torch==2.13.0 is a local CPU wheel; an open range would pull a multi-GB CUDA build.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "scripts/test.sh: installing torch==2.13.0" >&2
    "$PY" -m pip install "torch==2.13.0"
fi

# 2. kdtune as an editable install of THIS checkout, with the dev extras (pytest, xdist, ruff, reference libraries).
#    Checked from another directory so the current directory on sys.path cannot fake it.
if ! (cd / && "$PY" - "$ROOT" >/dev/null 2>&1 <<'PYEOF'
import importlib.util, os, sys
# find_spec locates without importing (importing transformers/peft would cost seconds on every run)
missing = [m for m in ("torch", "pytest", "xdist", "ruff", "transformers", "tokenizers", "peft", "matplotlib", "lm_eval") if importlib.util.find_spec(m) is None]
spec = importlib.util.find_spec("kdtune")
here = os.path.join(os.path.realpath(sys.argv[1]), "kdtune", "__init__.py")
sys.exit(1 if missing or spec is None or os.path.realpath(spec.origin or "") != here else 0)
PYEOF
); then
    echo "scripts/test.sh: installing kdtune (editable) with the dev extras" >&2
    "$PY" -m pip install -e ".[dev]"
fi

exec "$PY" -m pytest -n 2 -q "$@"
