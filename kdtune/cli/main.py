"""The ``kdtune`` command: ls, cp, cat, validate, estimate, run, runs, download, export, upload, make-tiny, quickstart.

Every user error (a :class:`kdtune.errors.KDTuneError`) is printed as one line, ``kdtune: error: ...``, with exit
code 1; ``--debug`` or ``KDTUNE_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from kdtune import __version__
from kdtune.errors import ConfigError, KDTuneError

_DESCRIPTION = """\
kdtune: knowledge distillation and fine-tuning of LLMs in native PyTorch.

Recipes are standalone scripts; configs are YAML files with `_component_` entries.
Start with `kdtune ls`, copy a config with `kdtune cp`, then `kdtune run <recipe> --config <config> key=value ...`."""

_EPILOG = """\
examples:
  kdtune download meta-llama/Llama-3.2-1B-Instruct --output-dir /tmp/Llama-3.2-1B-Instruct
  kdtune ls
  kdtune cp llama3_2/kd ./my_kd.yaml
  kdtune validate ./my_kd.yaml
  kdtune estimate --config ./my_kd.yaml batch_size=8        # peak memory per component, before the run
  kdtune make-tiny && kdtune run knowledge_distillation_single_device --config tiny/kd   # offline, CPU, seconds
  kdtune run knowledge_distillation_single_device --config ./my_kd.yaml kd_ratio=0.25 optimizer.lr=1e-4
  kdtune run --nproc_per_node 4 knowledge_distillation_distributed --config llama3_2/kd_distributed
  kdtune export /tmp/kdtune/llama3_2_1B/kd/checkpoints/step_00000400 --output-dir /tmp/kd-step400

Set KDTUNE_DEBUG=1 (or pass --debug) to see tracebacks of user errors."""


def debug_enabled() -> bool:
    """True when ``KDTUNE_DEBUG`` is set to a true value (``--debug`` sets it)."""
    return os.environ.get("KDTUNE_DEBUG", "0").lower() not in ("", "0", "false", "no")


def report_error(e: BaseException) -> int:
    """Print a user error as one line (plus the traceback in debug mode); return exit code 1."""
    if debug_enabled():
        traceback.print_exception(e)
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"kdtune: error: {message}", file=sys.stderr, flush=True)
    return 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdtune",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kdtune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors (same as KDTUNE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("ls", help="list recipes and the configs that belong to them")
    p.add_argument("--all", action="store_true", help="also show each recipe's file and summary")

    p = sub.add_parser(
        "cp",
        help="copy a shipped recipe or config to edit it",
        description="Copy a shipped recipe (e.g. kd_single_device) or config (e.g. llama3_2/kd) to <dest>. "
        "'.py' or '.yaml' is added to <dest> when it has no suffix; a directory <dest> keeps the file name.",
    )
    p.add_argument("name", help="recipe or config name (see `kdtune ls`)")
    p.add_argument("dest", help="destination file or existing directory")
    p.add_argument("-n", "--no-clobber", action="store_true", help="do not overwrite an existing destination")
    p.add_argument("--make-parents", action="store_true", help="create missing parent directories of <dest>")

    p = sub.add_parser("cat", help="print a shipped config or a YAML file")
    p.add_argument("config", help="config name (e.g. llama3_2/kd) or path to a YAML file")
    p.add_argument("--sort", action="store_true", help="print the keys sorted (comments are dropped)")

    p = sub.add_parser(
        "validate",
        help="check a config without building anything",
        description="Check that every _component_ (nested and in lists too) imports and that its arguments bind to "
        "its signature, that interpolations resolve, and (when the recipe declares RECIPE_SETTINGS) that every "
        "top-level key is a setting of the recipe. Every problem is reported with its dotted key.",
    )
    p.add_argument("config", help="config name (e.g. llama3_2/kd) or path to a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides to apply before checking")

    p = sub.add_parser(
        "estimate",
        help="a training run's peak memory per component before it starts (and its step time with --calibrate)",
        description="Replay one optimizer step of the config's recipe on fake tensors (no memory, no weights read) and "
        "print the peak memory per component: weights, gradients, optimizer state, activations with and without "
        "activation checkpointing, the loss chunk, the teacher. --calibrate N runs N real steps on the configured "
        "device and prints the measured step time and peak next to the estimate at the measured batch shapes.",
    )
    p.add_argument("--config", required=True, help="config name (e.g. llama3_2/kd) or path to a YAML file")
    p.add_argument("--calibrate", type=int, default=0, metavar="N", help="also run N real steps and measure them")
    p.add_argument("--seq-len", type=int, default=None, metavar="T", help="tokens per sequence (default: max_seq_len)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")

    sub.add_parser(
        "run",
        help="run a recipe: kdtune run [torchrun options] <recipe> --config <config> [key=value ...]",
        add_help=False,
    ).add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "download",
        help="download a model from the Hugging Face Hub",
        description="Download a model repository with huggingface_hub. The token comes from --hf-token, HF_TOKEN "
        "or a saved `hf auth login`; it is never printed or written. Writes kdtune_source.json (repo id, revision, "
        "commit) next to the files.",
    )
    p.add_argument("repo_id", help="e.g. meta-llama/Llama-3.2-1B-Instruct")
    p.add_argument("--output-dir", help="where to put the files (default: /tmp/<repo name>)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--ignore-patterns", nargs="+", default=None, metavar="P", help="glob patterns of files to skip")
    p.add_argument("--allow-patterns", nargs="+", default=None, metavar="P", help="only download files matching")
    p.add_argument("--hf-token", default=None, help="Hugging Face token (default: HF_TOKEN or the saved login)")
    p.add_argument("--repo-type", default="model", choices=["model", "dataset"], help="repository type")

    p = sub.add_parser(
        "export",
        help="write a run's resume checkpoint as HF model (+ PEFT adapter), like its final/",
        description="Rebuild the model of a resume checkpoint (<run_dir>/checkpoints/step_N, single-device or "
        "distributed) from its config.yaml and write <output-dir>/final (HF format, LoRA merged, chat template, "
        "model card) and, for a LoRA model, <output-dir>/final_adapter (PEFT), exactly as a final/ written at that "
        "step. The base weights of a LoRA model come from the run's checkpointer.checkpoint_dir.",
    )
    p.add_argument("checkpoint", help="e.g. /tmp/run/checkpoints/step_00000400 (or .../checkpoints/400)")
    p.add_argument("--output-dir", required=True, help="where final/ (and final_adapter/) are written")
    p = sub.add_parser(
        "runs",
        help="list a run directory's resume checkpoints (step, loss, config differences) and what resume picks",
        description="For each complete resume checkpoint of <output_dir>: step, epoch, the logged loss and how its "
        "config differs from <output_dir>/config.yaml (each key marked applied or refused on resume); the newest is "
        "the one resume_from_checkpoint=true continues from.",
    )
    p.add_argument("output_dir", help="the output_dir of a run")

    p = sub.add_parser(
        "make-tiny",
        help="write the tiny models, tokenizer and data the configs/tiny/* configs read",
        description="Write student/ and teacher/ (tiny Qwen2-style HF model directories with a matching byte-level BPE "
        "tokenizer) and train.jsonl (chat data) so that e.g. `kdtune run knowledge_distillation_single_device "
        "--config tiny/kd` runs offline on a CPU right after. Deterministic; re-running replaces the files.",
    )
    p.add_argument("--dir", default=None, help="where to write (default: /tmp/kdtune-tiny, where the configs look)")
    p = sub.add_parser(
        "upload",
        help="upload a folder (e.g. a run's final/) to the Hugging Face Hub",
        description="Create the repository if needed and upload every file of <folder> in one commit with "
        "huggingface_hub. The token comes from --hf-token, HF_TOKEN or a saved `hf auth login`; it is never printed "
        "or written.",
    )
    p.add_argument("folder", help="the directory to upload, e.g. /tmp/kdtune/llama3_2_1B/kd/final")
    p.add_argument("repo_id", help="<user or org>/<name>, e.g. me/llama3.2-1b-kd")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    p.add_argument("--repo-type", default="model", choices=["model", "dataset"], help="repository type")
    p.add_argument("--hf-token", default=None, help="Hugging Face token (default: HF_TOKEN or the saved login)")
    p.add_argument("--commit-message", default=None, help="commit message (default: 'Upload <folder> with kdtune')")

    sub.add_parser(
        "quickstart",
        help="run the embedded default task end to end (kdtune quickstart --help)",
        add_help=False,
    ).add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _cmd_ls(args: argparse.Namespace) -> int:
    from kdtune.config import list_configs, list_recipes

    recipes = list_recipes()
    configs = list_configs()
    by_recipe: dict[str, list[str]] = {r.name: [] for r in recipes}
    orphans: list[str] = []
    for c in configs:
        if c.recipe in by_recipe:
            by_recipe[c.recipe].append(c.name)
        else:
            orphans.append(f"{c.name} (recipe: {c.recipe or 'not set'})")
    width = max([len("RECIPE"), *(len(r.name) for r in recipes)]) + 2
    print(f"{'RECIPE':<{width}}{'DISTRIBUTED':<13}CONFIGS")
    for r in recipes:
        names = by_recipe[r.name] or ["-"]
        print(f"{r.name:<{width}}{'yes' if r.distributed else 'no':<13}{names[0]}")
        for n in names[1:]:
            print(f"{'':<{width}}{'':<13}{n}")
        if args.all:
            print(f"{'':<{width}}{'':<13}  file: {r.path}")
            if r.summary:
                print(f"{'':<{width}}{'':<13}  {r.summary}")
    if orphans:
        print("\nconfigs whose recipe is not found:")
        for o in orphans:
            print(f"  {o}")
    if not recipes and not configs:
        print("(no recipes or configs found; searched " + ", ".join(map(str, _roots())) + ")")
    return 0


def _roots() -> list[Path]:
    from kdtune.config import config_roots, recipe_roots

    return [*recipe_roots(), *config_roots()]


def _shipped_source(name: str) -> tuple[Path, str]:
    """A shipped recipe or config by name -> (its file, the suffix to add to a destination without one)."""
    from kdtune.config import list_configs, list_recipes
    from kdtune.config._catalog import _closest

    recipes = list_recipes()
    for r in recipes:
        if r.name == name:
            return r.path, ".py"
    configs = list_configs()
    for c in configs:
        if c.name == name:
            return c.path, ".yaml"
    candidates = [r.name for r in recipes] + [c.name for c in configs]
    raise ConfigError(
        f"'{name}' is neither a shipped recipe nor a shipped config (closest: {_closest(name, candidates)}); "
        "run `kdtune ls` to see them"
    )


def _cmd_cp(args: argparse.Namespace) -> int:
    src, suffix = _shipped_source(args.name)
    dest = Path(args.dest).expanduser()
    if dest.is_dir():
        dest = dest / src.name
    elif not dest.suffix:
        dest = dest.with_suffix(suffix)
    if not dest.parent.exists():
        if not args.make_parents:
            raise ConfigError(f"directory {dest.parent} does not exist; create it or pass --make-parents")
        dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and args.no_clobber:
        print(f"not copied: {dest} already exists (--no-clobber)")
        return 0
    shutil.copyfile(src, dest)
    print(f"copied {args.name} to {dest}")
    return 0


def _cmd_cat(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from kdtune.config import find_config, list_recipes, load_config

    if not args.config.endswith((".yaml", ".yml")) and any(r.name == args.config for r in list_recipes()):
        raise ConfigError(
            f"'{args.config}' is a recipe, not a config; `kdtune cat` prints configs "
            f"(copy the recipe with `kdtune cp {args.config} .` to read it)"
        )
    path = find_config(args.config)
    if args.sort:
        print(OmegaConf.to_yaml(load_config(path), sort_keys=True), end="")
    else:
        load_config(path)  # report YAML errors instead of printing a broken file silently
        print(path.read_text(encoding="utf-8"), end="")
    return 0


def _recipe_settings(cfg: Any) -> tuple[type | None, str, list[str]]:
    """The settings dataclass of the recipe a config names in ``recipe:`` (None without one), the recipe's name, and
    the problems met finding it."""
    from kdtune.config import find_recipe

    recipe_name = cfg.get("recipe") if "recipe" in cfg.keys() else None
    if recipe_name is None:
        return None, "", []
    try:
        recipe = find_recipe(str(recipe_name))
    except ConfigError as e:
        return None, "", [f"recipe: {e}"]
    try:
        return recipe.settings_class(), recipe.name, []
    except ConfigError as e:
        return None, recipe.name, [f"settings of recipe {recipe.name}: {e}"]


def _cmd_validate(args: argparse.Namespace) -> int:
    from kdtune.config import apply_overrides, check_settings, find_config, load_config, validate

    path = find_config(args.config)
    base = load_config(path)
    settings_cls, recipe_name, recipe_problems = _recipe_settings(base)
    cfg = apply_overrides(base, args.overrides, settings=settings_cls)
    problems = validate(cfg) + recipe_problems
    if settings_cls is not None:  # keys, types and values, exactly as the run reads them
        problems.extend(f"settings of recipe {recipe_name}: {p}" for p in check_settings(settings_cls, cfg))
    if problems:
        print(f"kdtune: error: {len(problems)} problem(s) in {path}:", file=sys.stderr)
        for p in problems:
            print(f"  {' '.join(p.split())}", file=sys.stderr)
        return 1
    print(f"config is valid: {path}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from kdtune.config import apply_overrides, find_config, load_config
    from kdtune.estimate import calibrate, estimate_memory, format_report

    base = load_config(find_config(args.config))
    cfg = apply_overrides(base, args.overrides, settings=_recipe_settings(base)[0])
    if args.seq_len is not None and args.seq_len < 2:
        raise ConfigError(f"--seq-len {args.seq_len}: give at least 2 tokens")
    est = estimate_memory(cfg, seq_len=args.seq_len)
    cal = calibrate(cfg, args.calibrate) if args.calibrate else None
    print(format_report(est, cal))
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from kdtune.testing.tiny import DEFAULT_TINY_DIR, TINY_CONFIG_KEYS, make_tiny_assets

    directory = Path(args.dir or DEFAULT_TINY_DIR).expanduser().absolute()
    paths = make_tiny_assets(directory)
    print(f"wrote {paths['student']}, {paths['teacher']} and {paths['data']}")
    print(f"wrote {directory}/{{opt,t5,bart}}/{{student,teacher}}, seq2seq.jsonl and text.jsonl (configs tiny/kd_opt, "
          "tiny/kd_t5, tiny/kd_bart)")  # fmt: skip
    extra = ""
    if directory != Path(DEFAULT_TINY_DIR):
        extra = " " + " ".join(f"{key}={directory / name}" for key, name in TINY_CONFIG_KEYS.items())
        extra += f" output_dir={directory / 'runs' / 'kd'}"
    print(f"run: kdtune run knowledge_distillation_single_device --config tiny/kd{extra}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from kdtune.training.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.output_dir)
    print(f"exported step {result.step} of {result.checkpoint}: " + ", ".join(str(d) for d in result.written))
    return 0


def _cmd_quickstart(argv: list[str]) -> int:
    from kdtune import quickstart

    return int(quickstart.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdtune`` command.

    Args:
        argv: command-line arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    # --debug is accepted anywhere on the command line (no value or override is spelt "--debug")
    if "--debug" in argv:
        os.environ["KDTUNE_DEBUG"] = "1"
        argv = [a for a in argv if a != "--debug"]
    # `run` and `quickstart` take free-form arguments (torchrun options, overrides): hand them over untouched
    i = 0
    try:
        if i < len(argv) and argv[i] == "run":
            from kdtune.cli._run import run_command

            return run_command(argv[i + 1 :])
        if i < len(argv) and argv[i] == "quickstart":
            return _cmd_quickstart(argv[i + 1 :])
        args = parser.parse_args(argv)
        if args.debug:
            os.environ["KDTUNE_DEBUG"] = "1"
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "download":
            from kdtune.cli._download import download_command

            return download_command(args)
        if args.command == "runs":
            from kdtune.cli._runs import runs_command

            return runs_command(args)
        if args.command == "upload":
            from kdtune.cli._upload import upload_command

            return upload_command(args)
        commands = {
            "ls": _cmd_ls,
            "cp": _cmd_cp,
            "cat": _cmd_cat,
            "validate": _cmd_validate,
            "estimate": _cmd_estimate,
            "make-tiny": _cmd_make_tiny,
            "export": _cmd_export,
        }
        return commands[args.command](args)
    except KDTuneError as e:
        return report_error(e)
    except KeyboardInterrupt:
        print("kdtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
