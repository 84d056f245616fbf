#!/usr/bin/env bash
# The README's first command: install kdtune (fast, idempotent) and run the offline quickstart on this CPU.
#   bash scripts/quickstart.sh                          # teacher -> SFT student -> KD student, 3 seeds, table + plot
#   bash scripts/quickstart.sh --output-dir /tmp/qs     # extra arguments go to `kdtune quickstart`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd -P)"
PY="${PYTHON:-python3}"

# torch first, pinned: torch==2.13.0 is the CPU wheel here; an open range would pull a multi-GB CUDA build.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "scripts/quickstart.sh: installing torch==2.13.0" >&2
    "$PY" -m pip install "torch==2.13.0"
fi
if ! (cd / && "$PY" - "$ROOT" >/dev/null 2>&1 <<'PYEOF'
import os, sys
import kdtune, matplotlib  # noqa: F401
assert os.path.realpath(os.path.dirname(kdtune.__file__)) == os.path.join(os.path.realpath(sys.argv[1]), "kdtune")
PYEOF
); then
    echo "scripts/quickstart.sh: installing kdtune (editable) with the quickstart extra" >&2
    "$PY" -m pip install -e ".[quickstart]"
fi

# No network is needed from here on: the data, tokenizer and models are generated locally.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$PY" -m kdtune quickstart "$@"
