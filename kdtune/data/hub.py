"""Publishing a generated data file as a Hugging Face Hub dataset repository (``huggingface_hub``).

The token is the one ``huggingface_hub`` finds itself (``HF_TOKEN`` or a saved ``hf auth login``); kdtune never takes it
from a config (configs are saved next to the outputs), never prints it, and scrubs it from every error text.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdtune.errors import KDTuneError

__all__ = ["HubUploadError", "push_file_to_hub"]


class HubUploadError(KDTuneError):
    """Uploading to the Hugging Face Hub failed (no or bad token, no write access, no network, bad repo id)."""


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(getattr(constants, "ENDPOINT", "https://huggingface.co")).rstrip("/")


def _current_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no token source at all
        return os.environ.get("HF_TOKEN")


def _translate(e: BaseException, repo_id: str, has_token: bool) -> HubUploadError:
    from huggingface_hub import errors as hf_errors

    endpoint = _endpoint()
    login = "set HF_TOKEN to a token with write access, or run `hf auth login`"
    if isinstance(e, ValueError) and type(e).__name__ == "HFValidationError":
        return HubUploadError(f"push_to_hub: '{repo_id}' is not a valid repo id; write it as <user or org>/<name>")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf_errors.HfHubHTTPError) or status is not None:
        if status == 401:
            what = "the Hugging Face token was rejected" if has_token else "no Hugging Face token was found"
            return HubUploadError(f"push_to_hub: {what} (HTTP 401) at {endpoint}; {login}")
        if status == 403:
            return HubUploadError(
                f"push_to_hub: the token may not write to {repo_id} (HTTP 403); use a token with write access to that "
                f"user or organisation ({login})"
            )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return HubUploadError(f"push_to_hub: upload to {repo_id} failed (HTTP {status}): {first}")
    names = {t.__name__ for t in type(e).__mro__}
    later = "the file is kept locally: upload it later with `hf upload --repo-type dataset <repo_id> <file>`"
    if "OfflineModeIsEnabled" in names:
        return HubUploadError(f"push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it ({later})")
    if names & {"ConnectError", "ConnectionError", "TimeoutException", "ConnectTimeout"}:
        return HubUploadError(f"push_to_hub: cannot reach the Hugging Face Hub at {endpoint}; {later}")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return HubUploadError(f"push_to_hub: upload to {repo_id} failed: {type(e).__name__}: {first}")


def push_file_to_hub(
    path: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    path_in_repo: str | None = None,
    commit_message: str = "Add data generated with kdtune",
) -> str:
    """Create the dataset repo ``repo_id`` if needed and upload ``path`` to it (one commit).

    Args:
        path: the local file (e.g. the JSON-lines file of ``generate_distillation_data``).
        repo_id: ``<user or org>/<name>`` of a dataset repository.
        private: create the repository private (an existing repository keeps its visibility).
        path_in_repo: name in the repository (default: the file's name).
        commit_message: the commit's title.

    Returns:
        The URL of the commit.

    Raises:
        HubUploadError: one line, without the token.
    """
    from huggingface_hub import HfApi

    token = _current_token()
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_file(
            path_or_fileobj=str(path),
            path_in_repo=path_in_repo or Path(path).name,
            repo_id=repo_id,
            repo_type="dataset",
            commit_message=commit_message,
        )
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear line
        err = _translate(e, repo_id, bool(token))
        if token and token in str(err):
            err = HubUploadError(str(err).replace(token, "<token>"))
        raise err from None
    return str(getattr(info, "commit_url", info))
