"""The keys in which two configs differ (for resume: the checkpoint's config against the new run's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["MISSING_VALUE", "ConfigChange", "config_diff"]

#: stands for "the key is absent" in a ConfigChange
MISSING_VALUE = "<absent>"


@dataclass(frozen=True)
class ConfigChange:
    """One dotted key whose value differs: ``old``/``new`` are plain values or :data:`MISSING_VALUE`."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _walk(a: Any, b: Any, key: str, out: list[ConfigChange]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            child = f"{key}.{k}" if key else str(k)
            if k not in b:
                out.append(ConfigChange(child, a[k], MISSING_VALUE))
            elif k not in a:
                out.append(ConfigChange(child, MISSING_VALUE, b[k]))
            else:
                _walk(a[k], b[k], child, out)
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{key}[{i}]", out)
        return
    same_number = (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    )
    if isinstance(a, bool) != isinstance(b, bool) or ((a != b) if not same_number else (float(a) != float(b))):
        out.append(ConfigChange(key, a, b))


def config_diff(old: Any, new: Any, *, ignore: tuple[str, ...] = ()) -> list[ConfigChange]:
    """Every leaf key whose value differs between ``old`` and ``new`` (interpolations resolved), in ``old``'s order.

    Args:
        old: a config (DictConfig or plain dict), e.g. the one saved in a resume checkpoint.
        new: the other config, e.g. the new run's.
        ignore: dotted keys (and their sub-keys) to leave out, e.g. ``("resume_from_checkpoint",)``.

    Returns:
        The changes; ``1`` and ``1.0`` count as equal, a key present on one side only is reported with
        :data:`MISSING_VALUE` on the other, and lists of different lengths are reported whole.
    """
    out: list[ConfigChange] = []
    _walk(_plain(old), _plain(new), "", out)
    return [c for c in out if not any(c.key == k or c.key.startswith((k + ".", k + "[")) for k in ignore)]
