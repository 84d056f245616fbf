"""``python -m kdtune``: the same as the ``kdtune`` command."""

from kdtune.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
