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
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

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


_NPROC = {"--nproc-per-node", "--nproc_per_node"}
#: the words torchrun accepts for --nproc-per-node besides a positive integer
_NPROC_WORDS = ("auto", "cpu", "gpu", "xpu")


def check_nproc_per_node(value: str, option: str = "--nproc_per_node") -> int | str:
    """The value of ``--nproc_per_node``: a positive integer or one of torchrun's words (auto, cpu, gpu, xpu).

    Raises:
        ConfigError: zero, negative or anything else, naming the option and the value.
    """
    text = str(value).strip()
    if text in _NPROC_WORDS:
        return text
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise ConfigError(
            f"{option} {value!r}: expected the number of processes per node, a positive integer (e.g. {option} 2) "
            f"or one of {', '.join(_NPROC_WORDS)}"
        )
    return n


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
        value = arg.split("=", 1)[1] if "=" in arg else None
        if known[name] and "=" not in arg:
            if i + 1 >= len(argv):
                raise ConfigError(f"torchrun option {name} needs a value, e.g. {name} 2")
            value = argv[i + 1]
            torchrun.append(value)
            i += 1
        if name in _NPROC and value is not None:
            check_nproc_per_node(value, name)
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


def _settings_class(recipe: Any) -> type | None:
    """The recipe's settings dataclass, or None (none declared, or it does not import: the recipe then reports its own
    import problem when it runs)."""
    try:
        return recipe.settings_class()
    except ConfigError:
        return None


def check_recipe_settings(recipe: Any, cfg: Any, config: str, *, named: str | None) -> None:
    """Read the config with the recipe's settings (``RECIPE_SETTINGS``) before any process starts.

    A problem is raised as the recipe would raise it; when the config's ``recipe:`` key names another recipe, the
    error says which recipe the config belongs to and the command that runs it.

    Raises:
        ConfigError: the first problem of the settings.
    """
    from kdtune.config import check_settings

    settings_cls = _settings_class(recipe)
    if settings_cls is None:
        return
    problems = check_settings(settings_cls, cfg)
    if not problems:
        return
    if named is not None and named != recipe.name:
        raise ConfigError(
            f"config {config} belongs to recipe '{named}' (its recipe: key), not '{recipe.name}': {problems[0]}; "
            f"run it with `kdtune run {named} --config {config}`"
        )
    raise ConfigError(problems[0])


def run_command(argv: list[str]) -> int:
    """``kdtune run``: resolve recipe and config, check the overrides, run in-process or through torchrun."""
    from kdtune.config import apply_overrides, check_resolvable, find_config, find_recipe, load_config
    from kdtune.config._args import split_recipe_args
    from kdtune.config._overrides import explicit_adds

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
    base, settings_cls = load_config(config_path), _settings_class(recipe)
    cfg = apply_overrides(base, overrides, settings=settings_cls)
    problems = [p for p in check_resolvable(cfg) if "interpolation" in p]
    if problems:
        raise ConfigError(problems[0])
    named = cfg.get("recipe") if "recipe" in cfg.keys() else None
    check_recipe_settings(recipe, cfg, config, named=None if named is None else str(named))
    if named is not None and str(named) != recipe.name:
        print(
            f"kdtune: warning: config {config_path.name} names recipe '{named}', running '{recipe.name}'",
            file=sys.stderr,
        )
    recipe_argv = ["--config", str(config_path), *explicit_adds(base, overrides, settings_cls)]
    # the command as typed, for the model card of final/ (inherited by torchrun workers; restored after the run)
    from kdtune.handoff import COMMAND_ENV

    previous = os.environ.get(COMMAND_ENV)
    os.environ[COMMAND_ENV] = shlex.join(["kdtune", "run", *argv])
    try:
        return _launch(recipe, torchrun, recipe_argv)
    finally:
        if previous is None:
            os.environ.pop(COMMAND_ENV, None)
        else:
            os.environ[COMMAND_ENV] = previous


def _launch(recipe: Any, torchrun: list[str], recipe_argv: list[str]) -> int:
    """Run ``recipe`` in this process, or through torchrun when it is distributed or torchrun options were given."""
    if recipe.distributed or torchrun:
        if not recipe.distributed:
            print(
                f"kdtune: warning: recipe '{recipe.name}' is single-device (RECIPE_DISTRIBUTED = False); each torchrun "
                "process runs its own independent copy",
                file=sys.stderr,
            )
        return _launch_distributed(torchrun, recipe.path, recipe_argv)
    return run_recipe_file(recipe.path, recipe_argv)
