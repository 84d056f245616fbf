"""A non-editable install ships recipes and configs inside the package, and `kdtune` finds them from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _copy_source(dest: Path) -> None:
    """The files a build reads, copied so the build never writes into the shared checkout."""
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("kdtune", "recipes", "configs"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)


def test_wheel_ships_recipes_and_configs(tmp_path: Path) -> None:
    src, wheels, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    src.mkdir()
    _copy_source(src)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("kdtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    recipes = sorted(p.name for p in (REPO / "recipes").glob("*.py"))
    configs = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    assert recipes and configs
    for name in recipes:
        assert f"kdtune/_recipes/{name}" in names
    for name in configs:
        assert f"kdtune/_configs/{name}" in names
    assert "kdtune/cli/main.py" in names and "kdtune/config/_overrides.py" in names
    top_level = {n.split("/", 1)[0] for n in names}
    # nothing but the package and its metadata: no generic top-level `recipes`/`configs`/`tests` package
    assert all(t == "kdtune" or t.endswith(".dist-info") for t in top_level), top_level

    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDTUNE_")}
    env["PYTHONPATH"] = str(site)
    ls = subprocess.run(
        [sys.executable, "-m", "kdtune", "ls", "--all"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the checkout
        timeout=120,
    )
    assert ls.returncode == 0, ls.stderr
    for name in recipes:
        if not name.startswith("_"):
            assert f"file: {site / 'kdtune' / '_recipes' / name}" in ls.stdout, ls.stdout
    cat = subprocess.run(
        [sys.executable, "-m", "kdtune", "cat", configs[0].removesuffix(".yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert cat.returncode == 0 and cat.stdout == (REPO / "configs" / configs[0]).read_text(), cat.stderr
