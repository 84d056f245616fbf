"""Every shipped tiny config still produces the recorded per-step losses, grad norms and final weights.

Regenerate ``golden_single.json`` only for a change that is *meant* to change numbers, with
``python tests/golden/_golden.py record``, and say why in the commit message.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest


def _load():
    spec = importlib.util.spec_from_file_location("_kdtune_golden", Path(__file__).with_name("_golden.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


G = _load()
GOLDEN = json.loads(G.GOLDEN_SINGLE.read_text())
EXACT = os.environ.get("KDTUNE_GOLDEN_EXACT") == "1"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return G.make_fixtures(tmp_path_factory.mktemp("golden"))


def test_every_case_has_a_golden_record() -> None:
    assert sorted(GOLDEN) == sorted(G.SINGLE_CASES)


@pytest.mark.parametrize("case", sorted(G.SINGLE_CASES))
def test_tiny_config_matches_golden(case: str, fixtures: dict[str, Path], tmp_path: Path) -> None:
    got = G.run_single(case, fixtures, tmp_path / case)
    G.assert_matches(got, GOLDEN[case], case, exact=EXACT)
