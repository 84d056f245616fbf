"""Hand-off files of a finished run's ``final/``: the chat template it trained with and a generated model card.

- :func:`write_chat_template`: ``tokenizer_config.json`` ``chat_template`` + ``chat_template.jinja``, so
  ``transformers``' ``apply_chat_template`` reproduces the ids kdtune's ``tokenize_messages`` trained on. A tokenizer
  with a jinja template writes that template; one using a builtin chat format writes the jinja equivalent of it.
- :func:`write_model_card`: ``README.md`` with YAML metadata (base model, datasets, ``library_name: kdtune``, tags,
  the base model's licence) and a body describing the run; it replaces the base model's README. Licence files
  (``LICENSE*``, ``USE_POLICY*``) are left as they are.
- :func:`base_model_id`: the Hub id a checkpoint dir was downloaded from (``kdtune_source.json``).
- :class:`RunCard` + :func:`write_handoff`: what a training recipe's final save writes next to the weights (the card's
  facts in one object; the chat template skipped with a warning when it has no jinja form).
- :func:`command_line`: the command that started this process (``kdtune run ...`` as typed, or ``python ...``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kdtune.errors import DataError

__all__ = [
    "BUILTIN_TEMPLATES",
    "COMMAND_ENV",
    "RunCard",
    "base_model_id",
    "chat_template_of",
    "command_line",
    "write_chat_template",
    "write_handoff",
    "write_model_card",
]

log = logging.getLogger("kdtune")

#: set by ``kdtune run`` to the command as typed, so the recipe process (and every torchrun worker) can record it
COMMAND_ENV = "KDTUNE_COMMAND"

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _chatml_with_system(system: str) -> str:
    return (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
        + system
        + "<|im_end|>\\n' }}{% endif %}"
        + _CHATML
    )


#: jinja equivalents of the builtin chat formats of :mod:`kdtune.data.chat_formats` (same text, same pieces)
BUILTIN_TEMPLATES: dict[str, str] = {
    "llama3": (
        "{{ bos_token if bos_token else '' }}{% for message in messages %}{{ '<|start_header_id|>' + ('ipython' if "
        "message['role'] == 'tool' else message['role']) + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
        "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "chatml": _CHATML,
    "qwen2": _chatml_with_system("You are a helpful assistant."),
    "qwen2_5": _chatml_with_system("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "plain": "{% for message in messages %}{{ message['content'] + eos_token }}{% endfor %}",
    "mistral": (
        "{{ bos_token if bos_token else '' }}{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}"
        "{% set system = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}{% endif %}{% endfor %}"
    ),
}


def chat_template_of(tokenizer: Any) -> str:
    """The jinja chat template that renders conversations as ``tokenizer.tokenize_messages`` formats them.

    Raises:
        DataError: the tokenizer has neither a template nor a builtin format with a jinja equivalent (Meta's Llama 2
            format encodes each answer on its own, which no single rendered string reproduces).
    """
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return str(template)
    fmt = getattr(getattr(tokenizer, "chat_format", None), "name", None)
    if fmt in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[fmt]
    raise DataError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} uses chat format {fmt!r}, which has no jinja "
        "equivalent; load it with the model's own template (chat_template=auto) or a .jinja file"
    )


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_chat_template(tokenizer: Any, out_dir: str | Path) -> Path:
    """Record the chat template the run trained with in ``out_dir`` (a ``final/`` dir with the tokenizer files).

    Sets ``chat_template`` in ``tokenizer_config.json`` (created if missing; other keys kept) and writes
    ``chat_template.jinja`` with the same text.

    Args:
        tokenizer: the run's kdtune tokenizer.
        out_dir: the HF directory.

    Returns:
        The path of ``chat_template.jinja``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = chat_template_of(tokenizer)
    cfg_path = out / "tokenizer_config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(f"{cfg_path}: invalid JSON ({e}); re-save the tokenizer files") from None
    cfg["chat_template"] = template
    for key in ("bos_token", "eos_token"):  # the template refers to them by name
        if key not in cfg:
            tid = tokenizer.bos_id if key == "bos_token" else tokenizer.eos_id
            text = tokenizer.special_token_text(tid) if tid is not None else None
            if text is not None:
                cfg[key] = text
    _write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    jinja = out / "chat_template.jinja"
    _write_text(jinja, template)
    return jinja


def base_model_id(checkpoint_dir: str | Path | None) -> str | None:
    """The Hub repo id recorded by ``kdtune download`` in ``kdtune_source.json``, else None."""
    if checkpoint_dir is None:
        return None
    try:
        info = json.loads((Path(checkpoint_dir) / "kdtune_source.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("repo_id") if isinstance(info, dict) else None


def _front_matter(readme: Path) -> dict[str, Any]:
    """The YAML metadata block of an existing README.md (empty if none or unreadable)."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repo id (``org/name``) rather than a local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_model_card(
    out_dir: str | Path,
    *,
    base_model: str | None,
    teacher: str | None = None,
    datasets: Sequence[str] = (),
    loss: str | None = None,
    kd_ratio: float | None = None,
    temperature: float | None = None,
    steps: int | None = None,
    metrics: Mapping[str, float] | None = None,
    command: Sequence[str] | str | None = None,
    model_name: str | None = None,
    tags: Sequence[str] = (),
    license: str | None = None,
) -> Path:
    """Write ``out_dir/README.md``: YAML metadata the Hub reads, then a description of the run.

    The metadata holds the Hub's own keys (``base_model`` and ``datasets`` only where they are repo ids, not local
    paths, which the Hub would refuse) and a ``kdtune`` block with every fact of the run (base model, teacher,
    datasets, loss, kd_ratio, temperature, steps, metrics, kdtune version, command).

    Replaces a README copied from the base model (its ``license`` / ``license_name`` / ``license_link`` metadata is
    carried over unless ``license`` is given); licence files in ``out_dir`` are not touched.

    Args:
        out_dir: the HF directory (``final/``).
        base_model: Hub id or path of the student's starting checkpoint.
        teacher: Hub id or path of the teacher (None for a fine-tuning run without one).
        datasets: dataset ids or files trained on.
        loss: the KD loss (e.g. ``ForwardKLLoss``) or ``cross_entropy``.
        kd_ratio: weight of the KD term.
        temperature: KD temperature.
        steps: optimizer steps taken.
        metrics: final metrics (e.g. ``{"val_loss": 1.23}``).
        command: the exact command line (a list is shell-quoted).
        model_name: title (default: the directory's parent name).
        tags: extra tags.
        license: licence id; None keeps the base README's.

    Returns:
        The path of ``README.md``.
    """
    import yaml

    from kdtune import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = _front_matter(out / "README.md")
    meta: dict[str, Any] = {}
    if base_model and _is_hub_id(base_model):  # the Hub refuses a README whose base_model is no repo id
        meta["base_model"] = base_model
    hub_datasets = [str(d) for d in datasets if _is_hub_id(str(d))]
    if hub_datasets:
        meta["datasets"] = hub_datasets
    meta["library_name"] = "kdtune"
    if license is not None:
        meta["license"] = license
    else:
        for key in ("license", "license_name", "license_link"):
            if key in old:
                meta[key] = old[key]
    meta["pipeline_tag"] = "text-generation"
    if isinstance(command, Sequence) and not isinstance(command, str):
        command = shlex.join(str(c) for c in command)
    run = {
        "version": __version__,
        "base_model": base_model,
        "teacher": teacher,
        "datasets": [str(d) for d in datasets] or None,
        "loss": loss,
        "kd_ratio": kd_ratio,
        "temperature": temperature,
        "steps": steps,
        "metrics": {str(k): float(v) for k, v in metrics.items()} if metrics else None,
        "command": command,
    }
    meta["kdtune"] = {k: v for k, v in run.items() if v is not None}  # the run's facts, machine-readable
    all_tags = ["kdtune", "knowledge-distillation" if teacher else "fine-tuned", *tags]
    meta["tags"] = list(dict.fromkeys(all_tags))
    title = model_name or (out.parent.name if out.name == "final" else out.name)
    lines = [f"# {title}", ""]
    if teacher:
        lines.append(f"Distilled with kdtune from teacher `{teacher}` into "
                     f"student `{base_model or 'unknown'}`.")  # fmt: skip
    else:
        lines.append(f"Fine-tuned with kdtune from `{base_model or 'unknown'}`.")
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    rows = {
        "base model (student)": base_model,
        "teacher": teacher,
        "datasets": ", ".join(str(d) for d in datasets) or None,
        "loss": loss,
        "kd_ratio": kd_ratio,
        "temperature": temperature,
        "optimizer steps": steps,
        "kdtune version": __version__,
    }
    lines += [f"| {k} | `{_fmt(v)}` |" for k, v in rows.items() if v is not None]
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    if command:
        lines += ["", "## Reproduce", "", "```bash", str(command), "```"]
    lines += [
        "",
        "## Use",
        "",
        "The chat template the model was trained with is in `tokenizer_config.json` and `chat_template.jinja`, so "
        "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` formats prompts as in training.",
    ]
    if any(out.glob("LICENSE*")) or any(out.glob("USE_POLICY*")):
        names = sorted(p.name for p in [*out.glob("LICENSE*"), *out.glob("USE_POLICY*")])
        lines += ["", f"Licence terms of the base model apply: see {', '.join(names)}."]
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(lines) + "\n"
    path = out / "README.md"
    _write_text(path, text)
    return path


def command_line() -> str:
    """The command that started this run: ``kdtune run ...`` as typed (``KDTUNE_COMMAND``), else ``python <argv>``."""
    typed = os.environ.get(COMMAND_ENV)
    if typed:
        return typed
    return shlex.join(["python", *sys.argv])


@dataclass(frozen=True)
class RunCard:
    """The facts of a finished run that its model card records (see :func:`write_model_card` for their meaning).

    Attributes:
        base_model: Hub id (``kdtune_source.json``) or path of the student's starting checkpoint.
        teacher: Hub id or path of the teacher checkpoint, or the cache dir of a cached teacher; None without KD.
        datasets: the training data (Hub ids or local files).
        loss: the divergence's name (``ForwardKLLoss``) or ``cross_entropy``.
        kd_ratio: weight of the KD term (KD runs).
        temperature: KD temperature (KD runs).
        steps: optimizer steps taken.
        metrics: the final metrics (last validation pass, last training loss).
        command: the exact command line.
    """

    base_model: str | None
    teacher: str | None = None
    datasets: tuple[str, ...] = ()
    loss: str | None = None
    kd_ratio: float | None = None
    temperature: float | None = None
    steps: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    command: str | None = None


def write_handoff(out_dir: str | Path, tokenizer: Any | None, card: RunCard | None) -> list[Path]:
    """Write the hand-off files of an HF dir (``final/``): the chat template of ``tokenizer`` and ``card``'s README.

    A tokenizer whose chat format has no jinja equivalent (Meta's Llama 2 format) gets no template: a warning is
    logged and the rest is written. Either argument may be None (nothing of that kind is written).

    Returns:
        The files written.
    """
    written: list[Path] = []
    if tokenizer is not None:
        try:
            written.append(write_chat_template(tokenizer, out_dir))
        except DataError as e:
            log.warning("%s: no chat template written: %s", out_dir, e)
    if card is not None:
        written.append(write_model_card(out_dir, **{f.name: getattr(card, f.name) for f in fields(card)}))
    return written
