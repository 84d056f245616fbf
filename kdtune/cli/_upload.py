"""``kdtune upload <dir> <repo_id>``: push a folder (a run's ``final/``, an adapter, a dataset) to the Hugging Face Hub.

The repository is created if needed (``create_repo(exist_ok=True)``), an optional branch too, then the folder is sent
as one commit with ``upload_folder``. The token comes from ``--hf-token``, else ``HF_TOKEN`` or a saved login
(``huggingface_hub`` reads those itself); it is never printed or written: error texts are scrubbed of it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kdtune.cli._download import _endpoint, _is_connection_error, _status
from kdtune.errors import KDTuneError

__all__ = ["UploadError", "upload", "upload_command", "uploaded_files"]

#: never uploaded: resume checkpoints and caches (the folder's own .gitignore-like list)
IGNORE_PATTERNS = [".cache/**", "**/.cache/**", "*.tmp-*", "**/*.tmp-*"]


class UploadError(KDTuneError):
    """Uploading to the Hugging Face Hub failed (no token, no permission, no network, ...)."""


def uploaded_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that an upload sends (not under ``.cache/``, no ``*.tmp-*`` leftovers)."""
    return [
        p
        for p in folder.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(folder).parts and ".tmp-" not in p.name
    ]


def _login_hint() -> str:
    return "pass --hf-token, set HF_TOKEN, or run `hf auth login` with a token that has write access"


def _translate(e: BaseException, repo_id: str, repo_type: str) -> UploadError:
    """One clear line for each way an upload fails."""
    from huggingface_hub import errors as hf_errors

    endpoint = _endpoint()
    kind = "dataset " if repo_type == "dataset" else ""
    if type(e).__name__ == "LocalTokenNotFoundError" or (
        isinstance(e, OSError | ValueError) and "token" in str(e).lower() and "not found" in str(e).lower()
    ):
        return UploadError(f"uploading to {kind}{repo_id} needs a Hugging Face token: {_login_hint()}")
    if isinstance(e, hf_errors.HfHubHTTPError):
        status = _status(e)
        if status == 401:
            return UploadError(
                f"the Hugging Face token was rejected (HTTP 401) by {endpoint} for {kind}{repo_id}: create a token "
                f"with write access at {endpoint}/settings/tokens and {_login_hint().split(' with ')[0]}"
            )
        if status == 403:
            return UploadError(
                f"no write access to {kind}{repo_id} (HTTP 403): the token may only read, or the namespace "
                f"'{repo_id.split('/')[0]}' is not yours; use a write token of a member of that namespace"
            )
        if status == 404:
            return UploadError(f"{kind}repository {repo_id} not found at {endpoint} (HTTP 404) and was not created")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return UploadError(f"upload to {kind}{repo_id} failed (HTTP {status}): {first}")
    if _is_connection_error(e):
        return UploadError(
            f"cannot reach the Hugging Face Hub at {endpoint}: check the network or proxy (HTTPS_PROXY) and retry; "
            "nothing was uploaded"
        )
    if isinstance(e, ValueError) and type(e).__name__ == "HFValidationError":
        return UploadError(f"'{repo_id}' is not a valid repo id: write it as <org or user>/<name>")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UploadError(f"upload to {kind}{repo_id} failed: {type(e).__name__}: {first}")


def upload(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    repo_type: str = "model",
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload every file of ``folder`` to it in one commit.

    Args:
        folder: the directory to upload (e.g. ``<run>/final``).
        repo_id: ``<org or user>/<name>``.
        private: create the repository as private (an existing repository keeps its visibility).
        revision: branch to commit to (created from the default branch if missing); None = the default branch.
        repo_type: ``"model"`` or ``"dataset"``.
        token: Hub token; None uses ``HF_TOKEN`` or the saved login.
        commit_message: default ``"Upload <folder name> with kdtune"``.

    Returns:
        The commit URL.

    Raises:
        UploadError: not a directory, no token, token rejected (401), no write access (403), no network (one line,
            token never shown).
    """
    from huggingface_hub import HfApi, get_token

    src = Path(folder).expanduser()
    if not src.is_dir():
        raise UploadError(f"{str(src)!r} is not a directory; pass the folder to upload (e.g. <output_dir>/final)")
    if not uploaded_files(src):
        raise UploadError(f"{str(src)!r} holds no files; nothing to upload")
    if token is None and get_token() is None:
        raise UploadError(f"uploading to {repo_id} needs a Hugging Face token: {_login_hint()}")
    api = HfApi(endpoint=_endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(src),
            repo_id=repo_id,
            repo_type=repo_type,
            revision=revision,
            commit_message=commit_message or f"Upload {src.name} with kdtune",
            ignore_patterns=IGNORE_PATTERNS,
        )
    except KDTuneError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear line
        err = _translate(e, repo_id, repo_type)
        secret = token or os.environ.get("HF_TOKEN")
        if secret and secret in str(err):
            err = UploadError(str(err).replace(secret, "<token>"))
        raise err from None
    return str(getattr(info, "commit_url", info))


def upload_command(args: argparse.Namespace) -> int:
    """``kdtune upload``: upload, then print where the files went."""
    url = upload(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        repo_type=args.repo_type,
        token=args.hf_token,
        commit_message=args.commit_message,
    )
    files = len(uploaded_files(Path(args.folder).expanduser()))
    kind = "dataset " if args.repo_type == "dataset" else ""
    print(
        f"uploaded {files} files from {args.folder} to {kind}{args.repo_id}"
        + (f"@{args.revision}" if args.revision else "")
    )
    print(f"commit: {url}")
    return 0
