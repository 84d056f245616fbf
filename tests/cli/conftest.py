"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1, speaking enough of its API for ``snapshot_download`` and
(``create_repo`` + ``upload_folder``, files sent inline as "regular" uploads) for uploads."""

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

    def _write_access(self, repo: str) -> bool:
        """Writes need GOOD_TOKEN (NO_ACCESS_TOKEN is a read-only token); send 401/403 and return False otherwise."""
        token = self._token()
        if token is None:
            self._error(401, "", "Invalid username or password.")
            return False
        if token != GOOD_TOKEN:
            self._error(403, "", f"You don't have the rights to create or write to {repo}")
            return False
        return True

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        path = unquote(urlparse(self.path).path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, path, self._token()))
        token = self._token()
        if token is not None and token not in (GOOD_TOKEN, NO_ACCESS_TOKEN):
            return self._error(401, "", "Invalid credentials in Authorization header")
        if path == "/api/repos/create":
            req = json.loads(body)
            kind = req.get("type") or "model"
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if not self._write_access(repo):
                return None
            url = f"http://{self.headers['Host']}/{'' if kind == 'model' else kind + 's/'}{repo}"
            if repo in REPOS or (kind, repo) in self.server.created:  # the Hub's 409 names the existing repo
                body = json.dumps({"error": "You already created this model repo", "url": url}).encode()
                return self._send(409, body, {"Content-Type": "application/json", "X-Error-Message": "exists"})
            private = req.get("visibility", "private" if req.get("private") else "public") == "private"
            self.server.created[(kind, repo)] = {"private": private}
            self.server.uploads[(kind, repo)] = {"private": private, "files": {}}
            return self._send(200, json.dumps({"url": url}).encode(), {"Content-Type": "application/json"})
        if path == "/api/validate-yaml":  # the Hub checks a README.md's YAML front matter before a commit
            return self._send(200, json.dumps({"warnings": []}).encode(), {"Content-Type": "application/json"})
        m = re.fullmatch(r"/api/(model|dataset)s/([^/]+/[^/]+)/branch/(.+)", path)
        if m:
            kind, repo, branch = m.groups()
            if not self._write_access(repo):
                return None
            self.server.created.setdefault((kind, repo), {}).setdefault("branches", []).append(branch)
            return self._send(200, b"{}", {"Content-Type": "application/json"})
        m = re.fullmatch(r"/api/(model|dataset)s/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
        if m:
            kind, repo, op, revision = m.groups()
            if repo not in REPOS and (kind, repo) not in self.server.created:
                return self._error(404, "RepoNotFound", "Repository not found")
            if not self._write_access(repo):
                return None
            if op == "preupload":
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in json.loads(body)["files"]
                ]
                return self._send(200, json.dumps({"files": files}).encode(), {"Content-Type": "application/json"})
            files = {}
            upload = self.server.uploads.setdefault((kind, repo), {"private": False, "files": {}})
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "header":
                    upload["summary"] = item["value"]["summary"]
            upload["files"].update(files)
            self.server.commits.append({"repo": repo, "type": kind, "revision": revision, "files": files})
            sha = hashlib.sha1(body).hexdigest()
            info = {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{sha}", "commitOid": sha}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        self._error(404, "", "not found")

    def do_HEAD(self) -> None:  # noqa: N802 - http.server API
        self._handle(head=True)


class _HubServer(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[tuple[str, str, str | None]]
    created: dict[tuple[str, str], dict]  # (repo type, repo id) -> {"private": bool}
    commits: list[dict]  # {"repo", "type", "revision", "files": {path: bytes}}
    uploads: dict[tuple[str, str], dict]  # (repo type, repo id) -> {"private", "files": {path: bytes}, "summary"}


@pytest.fixture
def fake_hub():
    """Yield the base URL of a running fake Hub (a str); ``.requests`` logs (method, path, token), ``.created`` and
    ``.commits`` record uploads, and ``.files``,
    ``.good_token``, ``.no_access_token``, ``.sha_main``, ``.sha_v1`` describe what it serves."""
    server = _HubServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    server.created = {}
    server.commits = []
    server.uploads = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    class _Hub(str):
        requests = server.requests
        created = server.created
        commits = server.commits
        uploads = server.uploads
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
