"""Outputs follow the umask; a full disk, an unwritable path or a file in the way is one line naming the path, the
partial output is removed and nothing earlier is damaged."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import kdtune.models  # noqa: F401
from kdtune import fsio
from kdtune.config import save_config
from kdtune.errors import CheckpointError, ConfigError
from kdtune.fsio import (
    TMP_MARKER,
    atomic_directory,
    atomic_write_file,
    current_umask,
    make_dirs,
    os_error_reason,
    prepare_output_dir,
    remove_empty_dirs,
)
from kdtune.models import _safetensors_io as sio
from kdtune.models import hf_model
from kdtune.models.checkpointer import HFCheckpointer, save_hf
from kdtune.testing.models import make_tiny_hf_checkpoint
from kdtune.testing.tokenizers import write_bpe_tokenizer


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> int:
        os.umask(mask)
        return mask

    yield set_mask
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if TMP_MARKER in p.name or ".old-" in p.name)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_final_weights_and_tokenizer_files_follow_the_umask(tmp_path: Path, umask, mask: int) -> None:
    umask(mask)
    assert current_umask() == mask
    src = make_tiny_hf_checkpoint(tmp_path / "src", "qwen2", seed=0)
    write_bpe_tokenizer(src, vocab_size=300)  # the source's tokenizer files, copied into final/
    model = hf_model(str(src))
    HFCheckpointer(str(src), str(tmp_path / "run")).load_into(model)
    out = save_hf(model, tmp_path / "run" / "final", source_dir=src)
    got = modes(out)
    assert "model.safetensors" in got and "tokenizer.json" in got and "vocab.json" in got
    assert got == {name: 0o666 & ~mask for name in got}, {k: oct(v) for k, v in got.items()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert {name: m for name, m in modes(src).items() if name != "model.safetensors"} == {
        name: 0o666 & ~mask for name in modes(src) if name != "model.safetensors"
    }
    cfg_path = save_config(OmegaConf.create({"a": 1}), tmp_path / "run" / "config.yaml")
    assert stat.S_IMODE(cfg_path.stat().st_mode) == 0o666 & ~mask


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_save_keeps_the_previous_output(tmp_path: Path, monkeypatch) -> None:
    src = make_tiny_hf_checkpoint(tmp_path / "src", "llama", seed=0)
    model = hf_model(str(src))
    HFCheckpointer(str(src), str(tmp_path)).load_into(model)
    final = tmp_path / "run" / "final"
    save_hf(model, final)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
    with pytest.raises(CheckpointError) as e:
        save_hf(model, final, max_shard_size=2000)
    assert (
        str(e.value)
        == f"cannot write {final}: no space left on the device: free some space or choose another output_dir"
    )
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before  # nothing earlier damaged
    assert leftovers(tmp_path / "run") == []  # the partial output is removed


def test_rust_writer_errors_carry_the_errno(tmp_path: Path) -> None:
    class SafetensorError(Exception):
        pass

    err = SafetensorError("Error while serializing: IoError(Os { code: 28 }) No space left on device (os error 28)")
    assert os_error_reason(err) == fsio._REASONS[errno.ENOSPC]
    assert os_error_reason(ValueError("bad value")) is None
    with pytest.raises(CheckpointError, match=r"^cannot write .*out: no space left"):
        with atomic_directory(tmp_path / "out"):
            raise err
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_file_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write_file(path, "old\n")

    def writer(f):
        f.write(b"partial")
        _enospc()

    with pytest.raises(ConfigError, match=rf"^cannot write {path}: no space left on the device"):
        atomic_write_file(path, writer, error=ConfigError)
    assert path.read_text() == "old\n" and leftovers(tmp_path) == []
    with pytest.raises(ZeroDivisionError):  # other errors propagate unchanged, still cleaned up
        atomic_write_file(path, lambda f: 1 / 0)
    assert path.read_text() == "old\n" and leftovers(tmp_path) == []


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("mine")
    with pytest.raises(CheckpointError, match=r"is a file; choose a directory path"):
        with atomic_directory(blocker):
            pass
    with pytest.raises(
        CheckpointError, match=rf"^cannot create {blocker / 'final'}: {blocker} is a file, not a directory"
    ):
        with atomic_directory(blocker / "final" / "x"):
            pass
    with pytest.raises(ConfigError, match=rf"^cannot write {blocker / 'c.yaml'}: {blocker} is a file, not a directory"):
        save_config(OmegaConf.create({"a": 1}), blocker / "c.yaml")
    assert blocker.read_text() == "mine"


def test_prepare_output_dir(tmp_path: Path, monkeypatch) -> None:
    for empty in ("", "  ", None):
        with pytest.raises(ConfigError, match=r"^output_dir is empty; set output_dir=<directory>"):
            prepare_output_dir(empty)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=rf"^output_dir '{tmp_path / 'f'}' is a file, not a directory"):
        prepare_output_dir(tmp_path / "f")
    with pytest.raises(
        ConfigError, match=rf"^cannot create output_dir '{tmp_path / 'f' / 'run'}': {tmp_path / 'f'} is a file"
    ):
        prepare_output_dir(tmp_path / "f" / "run")
    assert prepare_output_dir(tmp_path / "a" / "run") == tmp_path / "a" / "run"
    assert list((tmp_path / "a" / "run").iterdir()) == []  # the write probe is gone

    def denied(self, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", denied)  # (root ignores mode bits, so the refusal is simulated)
    with pytest.raises(ConfigError, match=r"output_dir '.*run' is not writable: permission denied"):
        prepare_output_dir(tmp_path / "a" / "run")


def test_make_dirs_and_remove_empty_dirs(tmp_path: Path) -> None:
    created = make_dirs(tmp_path / "x" / "y" / "z")
    assert created == [tmp_path / "x", tmp_path / "x" / "y", tmp_path / "x" / "y" / "z"]
    (tmp_path / "x" / "y" / "z" / ".cache" / "hf").mkdir(parents=True)
    (tmp_path / "x" / "y" / "z" / ".cache" / "hf" / "lock").write_text("")
    remove_empty_dirs(created, ignore=(".cache",))
    assert not (tmp_path / "x").exists()
    created = make_dirs(tmp_path / "p" / "q")
    (tmp_path / "p" / "q" / "model.safetensors").write_text("partial download, kept for resume")
    remove_empty_dirs(created, ignore=(".cache",))
    assert (tmp_path / "p" / "q" / "model.safetensors").is_file()


def test_write_json_atomic_is_the_shared_writer(tmp_path: Path) -> None:
    sio.write_json_atomic(tmp_path / "i.json", {"a": 1})
    assert (tmp_path / "i.json").read_text() == '{\n  "a": 1\n}\n'
    assert sio.atomic_directory is atomic_directory
