"""``kdtune download <repo_id>``: fetch a Hub repository with ``huggingface_hub.snapshot_download``.

The token comes from ``--hf-token``, else ``HF_TOKEN`` or a saved login (``huggingface_hub`` reads those itself). It is
never printed or written: error texts are scrubbed of it. Next to the files, ``kdtune_source.json`` records the repo
id, the requested revision and the commit, so later saves can name their base model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from kdtune.errors import KDTuneError
from kdtune.fsio import make_dirs, output_error, remove_empty_dirs

SOURCE_FILE = "kdtune_source.json"


class DownloadError(KDTuneError):
    """Downloading from the Hugging Face Hub failed (gated, not found, no network, ...)."""


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(getattr(constants, "ENDPOINT", "https://huggingface.co")).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _is_connection_error(e: BaseException) -> bool:
    names = {t.__name__ for t in type(e).__mro__}
    return bool(
        names & {"ConnectError", "ConnectionError", "TimeoutException", "ConnectTimeout", "OfflineModeIsEnabled"}
    )


def _translate(e: BaseException, repo_id: str, revision: str | None, has_token: bool) -> DownloadError:
    """One clear line for each way a download fails."""
    from huggingface_hub import errors as hf_errors

    endpoint = _endpoint()
    login = "pass --hf-token, set HF_TOKEN, or run `hf auth login`"
    if isinstance(e, hf_errors.GatedRepoError):
        return DownloadError(
            f"{repo_id} is a gated repo and this token has no access: accept its terms at {endpoint}/{repo_id}, "
            f"then authenticate ({login}) with a token that may read gated repos"
        )
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return DownloadError(
            f"revision '{revision}' not found in {repo_id}: check the branch, tag or commit at {endpoint}/{repo_id}"
        )
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        auth = "" if has_token else f"; if it is private or gated, authenticate first ({login})"
        return DownloadError(
            f"repository {repo_id} not found at {endpoint} (HTTP {_status(e)}): check the id (<org>/<name>){auth}"
        )
    if isinstance(e, hf_errors.HfHubHTTPError):
        status = _status(e)
        if status == 401:
            return DownloadError(
                f"the Hugging Face token was rejected (HTTP 401) for {repo_id}: create a new token at "
                f"{endpoint}/settings/tokens and {login}"
            )
        if status == 403:
            return DownloadError(
                f"access to {repo_id} denied (HTTP 403): the token lacks permission (fine-grained tokens need read "
                f"access to this repo); accept the repo's terms at {endpoint}/{repo_id} and {login}"
            )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return DownloadError(f"download of {repo_id} failed (HTTP {status}): {first}")
    if isinstance(e, hf_errors.LocalEntryNotFoundError) or _is_connection_error(e):
        if _offline():
            return DownloadError(
                f"HF_HUB_OFFLINE is set and {repo_id} is not in the local cache or output directory: unset "
                "HF_HUB_OFFLINE to download it, or point the config's checkpoint_dir at an existing copy"
            )
        return DownloadError(
            f"cannot reach the Hugging Face Hub at {endpoint} and {repo_id} is not cached: check the network or "
            "proxy (HTTPS_PROXY); to use files already downloaded set HF_HUB_OFFLINE=1, or point the config's "
            "checkpoint_dir at an existing copy"
        )
    if isinstance(e, ValueError) and type(e).__name__ == "HFValidationError":
        return DownloadError(f"'{repo_id}' is not a valid repo id: write it as <org>/<name>, e.g. Qwen/Qwen2-0.5B")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DownloadError(f"download of {repo_id} failed: {type(e).__name__}: {first}")


def _scrub(e: DownloadError, token: str | None) -> DownloadError:
    if token and token in str(e):
        return DownloadError(str(e).replace(token, "<token>"))
    return e


def write_source(output_dir: Path, info: dict[str, Any]) -> Path:
    """Write ``kdtune_source.json`` into ``output_dir`` atomically; return its path."""
    from kdtune.fsio import atomic_write_file

    return atomic_write_file(output_dir / SOURCE_FILE, json.dumps(info, indent=2) + "\n", error=DownloadError)


def download(
    repo_id: str,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    token: str | None = None,
    repo_type: str = "model",
) -> Path:
    """Download a Hub repository into ``output_dir`` and record where it came from.

    Args:
        repo_id: ``<org>/<name>``.
        output_dir: destination directory (default ``/tmp/<name>``).
        revision: branch, tag or commit (default: the repo's default branch).
        allow_patterns: only files matching these globs.
        ignore_patterns: skip files matching these globs.
        token: Hub token; None uses ``HF_TOKEN`` or the saved login.
        repo_type: ``"model"`` or ``"dataset"``.

    Returns:
        The directory holding the files (and ``kdtune_source.json``).

    Raises:
        DownloadError: gated repo, bad token, repo or revision not found, no network (one line, token never shown).
    """
    from huggingface_hub import HfApi, snapshot_download

    out = Path(output_dir if output_dir is not None else f"/tmp/{repo_id.rstrip('/').split('/')[-1]}").expanduser()
    has_token = bool(token or os.environ.get("HF_TOKEN"))
    commit: str | None = None
    created: list[Path] = []  # directories this call creates: removed again if the download fails
    try:
        if not _offline():
            try:
                info = HfApi(endpoint=_endpoint()).repo_info(
                    repo_id, revision=revision, repo_type=repo_type, token=token
                )
                commit = info.sha
            except Exception as e:  # noqa: BLE001 - a connection failure falls back to a local copy below
                if not _is_connection_error(e):
                    raise
        created = make_dirs(out, error=DownloadError, key="--output-dir")
        path = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=commit or revision,
            local_dir=str(out),
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            token=token,
        )
    except KDTuneError:
        remove_empty_dirs(created, ignore=(".cache",))
        raise
    except BaseException as e:
        remove_empty_dirs(created, ignore=(".cache",))  # no empty output directory is left behind
        if not isinstance(e, Exception):
            raise
        translated = output_error(e, out, error=DownloadError)
        raise (translated or _scrub(_translate(e, repo_id, revision, has_token), token)) from None
    path = Path(path)
    info = {"repo_id": repo_id, "repo_type": repo_type, "revision": revision or "main", "commit": commit}
    if commit is None:  # offline, served from the existing directory: keep the commit recorded when it was downloaded
        try:
            previous = json.loads((path / SOURCE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
        if isinstance(previous, dict) and all(previous.get(k) == info[k] for k in ("repo_id", "repo_type", "revision")):
            info["commit"] = previous.get("commit")
    write_source(path, info)
    return path


def download_command(args: argparse.Namespace) -> int:
    """``kdtune download``: download, then print where the files went."""
    path = download(
        args.repo_id,
        args.output_dir,
        revision=args.revision,
        allow_patterns=args.allow_patterns,
        ignore_patterns=args.ignore_patterns,
        token=args.hf_token,
        repo_type=args.repo_type,
    )
    files = [p for p in path.rglob("*") if p.is_file() and ".cache" not in p.relative_to(path).parts]
    files = [p for p in files if p.name != SOURCE_FILE]
    print(f"downloaded {args.repo_id} ({len(files)} files) to {path}")
    print(f"use it in a config with: checkpoint_dir: {path}")
    return 0
