"""The command line every recipe's ``main()`` parses: ``--config <name or path> [overrides...]``."""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

from kdtune.config._loader import check_resolvable, load_config
from kdtune.config._loader import print_config as _print_config
from kdtune.config._overrides import apply_overrides
from kdtune.errors import ConfigError

USAGE = (
    "usage: <recipe> --config <name | path.yaml> [key=value ...] [+new.key=value ...] [~key ...]\n"
    "  key=value   set a key of the config or a setting of the recipe (optimizer.lr=1e-3, seed=null,\n"
    "              lora_attn_modules=[q_proj,v_proj], group_by_length=true)\n"
    "  +key=value  add any other key (e.g. a component argument: +dataset.lazy=false); ~key deletes one\n"
    "  optimizer=torch.optim.SGD swaps a component and keeps its other arguments"
)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a ``torchrun`` launch (read from ``RANK``)."""
    return os.environ.get("RANK", "0") in ("", "0")


def split_recipe_args(argv: list[str]) -> tuple[str, list[str]]:
    """Split ``--config X`` (or ``--config=X``) from the overrides.

    Raises:
        ConfigError: ``--config`` is missing or given twice, or an unknown ``--option`` is passed.
    """
    config: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") or arg.startswith("--config="):
            if config is not None:
                raise ConfigError("--config is given twice; pass exactly one config name or YAML path")
            if "=" in arg:
                config = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                config = argv[i + 1]
                i += 1
            else:
                raise ConfigError("--config needs a value: a shipped config name (see `kdtune ls`) or a YAML path")
        elif arg.startswith("--"):
            raise ConfigError(f"unknown option '{arg}'; recipes take --config <name|path> and key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    if not config:
        raise ConfigError("missing --config: pass a shipped config name (see `kdtune ls`) or a path to a YAML file")
    return config, overrides


def parse_recipe_args(
    argv: list[str] | None = None, *, print_config: bool = True, settings: type | None = None
) -> DictConfig:
    """Parse a recipe's command line into its config.

    Args:
        argv: ``["--config", "llama3_2/kd", "optimizer.lr=1e-3", ...]``; defaults to ``sys.argv[1:]``.
            ``-h``/``--help`` prints the usage and exits.
        print_config: print the resolved config (on the main process only).
        settings: the recipe's settings dataclass: ``key=value`` may then set any of its settings, also one the
            config leaves at its default (see :func:`kdtune.config.apply_overrides`).

    Returns:
        The loaded config with the overrides applied.

    Raises:
        ConfigError: missing ``--config``, unknown config, a bad override, an interpolation that does not resolve.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        raise SystemExit(0)
    config, overrides = split_recipe_args(argv)
    cfg = apply_overrides(load_config(config), overrides, settings=settings)
    bad = [p for p in check_resolvable(cfg) if "interpolation" in p]
    if bad:
        raise ConfigError(bad[0])
    if print_config and is_main_process():
        _print_config(cfg)
    return cfg
