"""What each ``torchrun`` worker of ``kdtune run`` executes: ``python -m kdtune.cli._worker <recipe.py> [args]``."""

from __future__ import annotations

import sys

from kdtune.cli._run import run_recipe_file


def main(argv: list[str] | None = None) -> int:
    """Run the recipe file ``argv[0]`` with the remaining arguments; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m kdtune.cli._worker <recipe.py> --config <config> [overrides]", file=sys.stderr)
        return 2
    return run_recipe_file(argv[0], argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
