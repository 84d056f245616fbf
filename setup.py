"""Package list for setuptools: every ``kdtune`` package, plus the top-level ``recipes/`` and ``configs/`` directories
shipped *inside* the package as ``kdtune._recipes`` and ``kdtune._configs`` (so no generic top-level ``recipes``
package is ever installed). Everything else lives in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["kdtune", "kdtune.*"]), "kdtune._recipes", "kdtune._configs"],
    package_dir={"kdtune._recipes": "recipes", "kdtune._configs": "configs"},
    package_data={"kdtune._recipes": ["*.py"], "kdtune._configs": ["*.yaml", "**/*.yaml", "**/*.yml"]},
)
