"""``kdtune run [torchrun options] <recipe> --config <config> [overrides...]``.

A single-device recipe runs in this process (``runpy.run_path(..., run_name="__main__")``). A recipe that declares
``RECIPE_DISTRIBUTED = True``, or any torchrun option, launches through ``torch.distributed.run`` (in this process, as
``torchrun`` itself does); each worker runs :mod:`kdtune.cli._worker`, which executes the recipe the same way and
prints user errors as one line.
"""

from __future__ import annotations

import difflib
import logging
import os
import runpy
import sys
import textwrap
from pathlib import Path

from kdtune.errors import ConfigError, KDTuneError

RUN_USAGE = """\
usage: kdtune run [torchrun options] <recipe name | path/to/recipe.py> --config <name | path.yaml> [overrides ...]

Runs a recipe with a config. Single-device recipes run in this process; distributed recipes, or any torchrun
option, launch through torch.distributed.run (add --nnodes/--node-rank/--rdzv-endpoint for multi-node).

overrides:
  key=value                set an existing key: kd_ratio=0.25 optimizer.lr=1e-3 seed=null
  a.b=[x,y]  a.b={k: v}    lists and mappings; quote values to keep them strings: tag='007'
  +new.key=value           add a key that is not in the config (a missing key is an error otherwise)
  ~key                     delete a key
  optimizer=torch.optim.SGD  swap a component and keep its other arguments
  out=${output_dir}/x      interpolations resolve against the final config

options:
  --debug                  show tracebacks of user errors (same as KDTUNE_DEBUG=1)
  -h, --help               show this help

torchrun options (also spelt with underscores, e.g. --nproc_per_node; see `python -m torch.distributed.run --help`):
  {torchrun}
"""

# torchrun options that would change what is executed: kdtune decides that itself
_UNSUPPORTED = {"-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path"}
_RENDEZVOUS = {
    "--nnodes",
    "--rdzv-endpoint",
    "--rdzv_endpoint",
    "--rdzv-backend",
    "--rdzv_backend",
    "--standalone",
    "--master-addr",
    "--master_addr",
    "--master-port",
    "--master_port",
}


def torchrun_options() -> dict[str, bool]:
    """Every ``torch.distributed.run`` option string -> whether it takes a value."""
    from torch.distributed.run import get_args_parser

    out: dict[str, bool] = {}
    for action in get_args_parser()._actions:
        for opt in action.option_strings:
            if opt not in ("-h", "--help"):
                out[opt] = action.nargs != 0
    return out


def split_run_args(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """``[torchrun options] <recipe> [recipe args]`` -> (torchrun args, recipe, recipe args).

    Raises:
        ConfigError: unknown or unsupported option, an option missing its value, or no recipe.
    """
    # importing torch.distributed.run costs seconds: only when there are options to check
    known = torchrun_options() if argv and argv[0].startswith("-") and argv[0] != "--debug" else {}
    torchrun: list[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg == "--debug":
            os.environ["KDTUNE_DEBUG"] = "1"
            i += 1
            continue
        if not known:
            known = torchrun_options()
        if name in _UNSUPPORTED:
            raise ConfigError(f"torchrun option {name} is not supported by `kdtune run`; it runs the recipe itself")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
            raise ConfigError(
                f"unknown option '{name}' before the recipe (closest torchrun options: "
                f"{', '.join(close) if close else 'none'}); see `kdtune run --help`"
            )
        torchrun.append(arg)
        if known[name] and "=" not in arg:
            if i + 1 >= len(argv):
                raise ConfigError(f"torchrun option {name} needs a value, e.g. {name} 2")
            torchrun.append(argv[i + 1])
            i += 1
        i += 1
    if i >= len(argv):
        raise ConfigError("missing recipe: `kdtune run <recipe> --config <config> [key=value ...]` (see `kdtune ls`)")
    return torchrun, argv[i], argv[i + 1 :]


def run_recipe_file(path: str | os.PathLike[str], recipe_argv: list[str]) -> int:
    """Execute a recipe script as ``__main__`` with ``sys.argv = [path, *recipe_argv]``; return its exit code.

    User errors (:class:`KDTuneError`) are printed as one line (traceback only in debug mode) and give exit code 1.
    """
    from kdtune.cli.main import report_error

    path = str(path)
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [path, *recipe_argv]
    sys.path.insert(0, str(Path(path).resolve().parent))  # like `python recipe.py`
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    except KDTuneError as e:
        return report_error(e)
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path
    return 0


def _launch_distributed(torchrun: list[str], recipe: Path, recipe_argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    opts = list(torchrun)
    if not any(a.split("=", 1)[0] in _RENDEZVOUS for a in opts):
        opts.append("--standalone")  # single node: pick a free port instead of a fixed 29500
    args = get_args_parser().parse_args([*opts, "--module", "kdtune.cli._worker", str(recipe), *recipe_argv])
    from kdtune.cli.main import debug_enabled

    if not debug_enabled():
        # the summary below names the failed rank and exit code; torch's own log line repeats it
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        failures = e.failures
        first_rank = min(failures) if failures else None
        code = failures[first_rank].exitcode if first_rank is not None else 1
        print(
            f"kdtune: error: the recipe failed on {len(failures)} process(es) (first: global rank {first_rank}, "
            f"exit code {code}); see the messages above",
            file=sys.stderr,
        )
        return 1
    return 0


def run_command(argv: list[str]) -> int:
    """``kdtune run``: resolve recipe and config, check the overrides, run in-process or through torchrun."""
    from kdtune.config import apply_overrides, check_resolvable, find_config, find_recipe, load_config
    from kdtune.config._args import split_recipe_args

    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        opts = sorted(o for o in torchrun_options() if o.startswith("--") and "_" not in o and o not in _UNSUPPORTED)
        listing = textwrap.fill(" ".join(opts), width=110, subsequent_indent="  ", break_on_hyphens=False)
        print(RUN_USAGE.replace("{torchrun}", listing))
        return 0
    torchrun, recipe_name, rest = split_run_args(argv)
    recipe = find_recipe(recipe_name)
    config, overrides = split_recipe_args(rest)
    config_path = find_config(config).resolve()
    # check the overrides here, once, before any process is started
    cfg = apply_overrides(load_config(config_path), overrides)
    problems = [p for p in check_resolvable(cfg) if "interpolation" in p]
    if problems:
        raise ConfigError(problems[0])
    named = cfg.get("recipe") if "recipe" in cfg.keys() else None
    if named is not None and str(named) != recipe.name:
        print(
            f"kdtune: warning: config {config_path.name} names recipe '{named}', running '{recipe.name}'",
            file=sys.stderr,
        )
    recipe_argv = ["--config", str(config_path), *overrides]
    if recipe.distributed or torchrun:
        if not recipe.distributed:
            print(
                f"kdtune: warning: recipe '{recipe.name}' is single-device (RECIPE_DISTRIBUTED = False); each torchrun "
                "process runs its own independent copy",
                file=sys.stderr,
            )
        return _launch_distributed(torchrun, recipe.path, recipe_argv)
    return run_recipe_file(recipe.path, recipe_argv)
