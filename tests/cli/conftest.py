"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1, speaking enough of its API for ``snapshot_download``."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest

GOOD_TOKEN = "hf_goodTOKEN1234567890abcdef"
NO_ACCESS_TOKEN = "hf_validButNoGatedAccess0987654321"
SHA_MAIN = "a" * 40
SHA_V1 = "b" * 40

FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}\n',
    "model.safetensors": bytes(range(256)) * 4,
    "tokenizer.json": b'{"version": "1.0"}\n',
    "README.md": b"# tiny\n",
    "original/consolidated.pth": b"\x00" * 64,
}

REPOS = {
    "kd-org/tiny-llama": {"gated": False, "refs": {"main": SHA_MAIN, "v1": SHA_V1}},
    "kd-org/gated-llama": {"gated": True, "refs": {"main": SHA_MAIN}},
}


class _Handler(BaseHTTPRequestHandler):
    server: _HubServer

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str = "", head: bool = False) -> None:
        body = json.dumps({"error": message or code}).encode()
        headers = {"X-Error-Code": code, "Content-Type": "application/json"}
        if message:
            headers["X-Error-Message"] = message
        self._send(status, body, headers, head)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _handle(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.server.requests.append((self.command, path, self._token()))
        token = self._token()
        if token is not None and token not in (GOOD_TOKEN, NO_ACCESS_TOKEN):
            return self._error(401, "", "Invalid credentials in Authorization header", head)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m:
            repo, rev = m.group(1), m.group(2) or "main"
            if repo not in REPOS:
                return self._error(404, "RepoNotFound", "Repository not found", head)
            sha = REPOS[repo]["refs"].get(rev, rev if rev in REPOS[repo]["refs"].values() else None)
            if sha is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, head)
            info = {
                "id": repo,
                "modelId": repo,
                "sha": sha,
                "private": False,
                "gated": "manual" if REPOS[repo]["gated"] else False,
                "siblings": [{"rfilename": f} for f in FILES],
            }
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if m:
            repo = m.group(1)
            if repo not in REPOS:
                return self._error(404, "RepoNotFound", "Repository not found", head)
            prefix = (m.group(3) or "").strip("/")
            entries = [
                {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
                for name, data in FILES.items()
                if not prefix or name.startswith(prefix + "/")
            ]
            if not prefix:
                entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": "original"})
            return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo, rev, name = m.groups()
            if repo not in REPOS:
                return self._error(404, "RepoNotFound", "Repository not found", head)
            if REPOS[repo]["gated"] and token != GOOD_TOKEN:
                status = 401 if token is None else 403
                return self._error(status, "GatedRepo", "Access to this repo is restricted", head)
            if name not in FILES:
                return self._error(404, "EntryNotFound", "Entry not found", head)
            data = FILES[name]
            headers = {
                "X-Repo-Commit": REPOS[repo]["refs"].get(rev, rev),
                "ETag": '"' + hashlib.sha1(data).hexdigest() + '"',
                "Content-Type": "application/octet-stream",
            }
            return self._send(200, data, headers, head)
        self._error(404, "", "not found", head)

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self._handle(head=False)

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        """Uploads: create a repo, ask the upload mode (always "regular": content inline), commit (NDJSON)."""
        path = unquote(urlparse(self.path).path)
        token = self._token()
        self.server.requests.append((self.command, path, token))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if token is None:
            return self._error(401, "", "You must be authenticated to access this resource")
        if token not in (GOOD_TOKEN, NO_ACCESS_TOKEN):
            return self._error(401, "", "Invalid credentials in Authorization header")
        if token != GOOD_TOKEN:
            return self._error(403, "", "You don't have the rights to create or write to this repository")
        uploads = self.server.uploads
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            key = (req.get("type") or "model", repo)
            prefix = "" if key[0] == "model" else f"{key[0]}s/"
            url = f"http://{self.headers['Host']}/{prefix}{repo}"
            if key in uploads:  # the Hub's answer names the existing repo
                body = json.dumps({"error": "You already created this repo", "url": url}).encode()
                return self._send(409, body, {"Content-Type": "application/json"})
            uploads[key] = {"private": req.get("visibility") == "private" or bool(req.get("private")), "files": {}}
            return self._send(
                200, json.dumps({"url": url, "name": repo}).encode(), {"Content-Type": "application/json"}
            )
        m = re.fullmatch(r"/api/(model|dataset|space)s/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
        if not m or (m.group(1), m.group(2)) not in uploads:
            return self._error(404, "RepoNotFound", "Repository not found")
        repo = uploads[(m.group(1), m.group(2))]
        if m.group(3) == "preupload":
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in json.loads(body)["files"]
            ]
            return self._send(200, json.dumps({"files": files}).encode(), {"Content-Type": "application/json"})
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                repo["summary"] = item["value"]["summary"]
            elif item["key"] == "file":
                repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        url = f"http://{self.headers['Host']}/{m.group(1)}s/{m.group(2)}/commit/{SHA_MAIN}"
        answer = {"commitUrl": url, "commitOid": SHA_MAIN}
        return self._send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

    def do_HEAD(self) -> None:  # noqa: N802 - http.server API
        self._handle(head=True)


class _HubServer(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[tuple[str, str, str | None]]
    uploads: dict[tuple[str, str], dict]


@pytest.fixture
def fake_hub():
    """Yield the base URL of a running fake Hub (a str); ``.requests`` logs (method, path, token), ``.uploads`` holds
    the repos created and files committed through it, and ``.files``,
    ``.good_token``, ``.no_access_token``, ``.sha_main``, ``.sha_v1`` describe what it serves."""
    server = _HubServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    server.uploads = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    class _Hub(str):
        requests = server.requests
        uploads = server.uploads  # (repo_type, repo_id) -> {"private", "files": {path: bytes}, "summary"}
        files = FILES
        good_token = GOOD_TOKEN
        no_access_token = NO_ACCESS_TOKEN
        sha_main = SHA_MAIN
        sha_v1 = SHA_V1

    yield _Hub(f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
