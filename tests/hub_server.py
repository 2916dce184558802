"""A small Hub-compatible HTTP server for tests: the endpoints huggingface_hub 2.x calls to create a repository,
upload files in one commit, read repository info and download files. In memory, loopback only, one thread per request.

Set ``HF_ENDPOINT`` to :attr:`HubServer.url`. ``fail_next_commit`` makes the next commit answer 500.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import yaml


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: dict[str, list[str]] = field(default_factory=lambda: {"main": ["0" * 40]})
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"0" * 40: {}})

    def files_at(self, revision: str) -> tuple[dict[str, bytes] | None, str | None]:
        """(files, commit oid) at a branch name or a commit oid."""
        if revision in self.branches:
            return self.branches[revision], self.commits[revision][-1]
        if revision in self.snapshots:
            return self.snapshots[revision], revision
        return None, None


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.fail_next_commit = False
        self.requests: list[str] = []
        self.validated_yaml: list[dict] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
                body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str):
                self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

            def _route(self):
                path = unquote(self.path.split("?")[0])
                hub.requests.append(f"{self.command} {path}")
                return path

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                path = self._route()
                if path == "/api/whoami-v2":
                    return self._send(200, {"name": "tester", "type": "user", "orgs": [], "auth": {}})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
                if m:
                    repo = hub.repos.get(m.group(1))
                    if repo is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    files, oid = repo.files_at(m.group(2) or "main")
                    if files is None:
                        return self._error(404, "RevisionNotFound", "Revision not found")
                    card = files.get("README.md", b"").decode()
                    card_data = yaml.safe_load(card.split("---")[1]) if card.startswith("---") else {}
                    return self._send(
                        200,
                        {
                            "id": m.group(1),
                            "modelId": m.group(1),
                            "sha": oid,
                            "private": repo.private,
                            "siblings": [{"rfilename": name} for name in sorted(files)],
                            "cardData": card_data,
                            "tags": (card_data or {}).get("tags", []),
                        },
                    )
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    repo = hub.repos.get(m.group(1))
                    if repo is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    files, oid = repo.files_at(m.group(2))
                    if files is None:
                        return self._error(404, "RevisionNotFound", "Revision not found")
                    if m.group(3) not in files:
                        return self._error(404, "EntryNotFound", "Entry not found")
                    data = files[m.group(3)]
                    etag = hashlib.sha256(data).hexdigest()
                    headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"'}
                    return self._send(200, headers=headers, raw=data)
                return self._error(404, "NotFound", f"no route for GET {path}")

            def do_DELETE(self):
                self.do_POST()

            def do_POST(self):
                path = self._route()
                body = self._body()
                if path == "/api/repos/create":
                    spec = json.loads(body)
                    repo_id = f"{spec.get('organization') or 'tester'}/{spec['name']}"
                    if repo_id in hub.repos:  # like the Hub, a 409 still names the repository's URL
                        body409 = {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                        return self._send(409, body409, {"X-Error-Code": "RepoExists"})
                    hub.repos[repo_id] = Repo(private=bool(spec.get("private")))
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if path == "/api/repos/delete":
                    spec = json.loads(body)
                    repo_id = f"{spec.get('organization') or 'tester'}/{spec['name']}"
                    if hub.repos.pop(repo_id, None) is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    return self._send(200, {})
                if path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    try:
                        data = yaml.safe_load(content.split("---")[1])
                    except (yaml.YAMLError, IndexError) as err:
                        return self._send(400, {"error": f"invalid YAML: {err}"})
                    hub.validated_yaml.append(data)
                    return self._send(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
                if m:
                    repo = hub.repos[m.group(1)]
                    repo.branches.setdefault(m.group(2), dict(repo.branches["main"]))
                    repo.commits.setdefault(m.group(2), list(repo.commits["main"]))
                    return self._send(200, {})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
                if m:
                    files = json.loads(body)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]
                    return self._send(200, {"files": modes})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
                if m:
                    repo = hub.repos.get(m.group(1))
                    if repo is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    if hub.fail_next_commit:
                        hub.fail_next_commit = False
                        return self._error(500, "InternalError", "storage failure (injected by the test)")
                    branch = m.group(2)
                    staged = dict(repo.branches.setdefault(branch, {}))
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        value = item["value"]
                        if item["key"] == "file":
                            staged[value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] == "deletedFile":
                            staged.pop(value["path"], None)
                        elif item["key"] != "header":
                            return self._error(400, "BadRequest", f"unsupported operation {item['key']}")
                    repo.branches[branch] = staged  # all or nothing
                    oid = hashlib.sha1(body).hexdigest()
                    repo.commits.setdefault(branch, []).append(oid)
                    repo.snapshots[oid] = staged
                    url = f"{hub.url}/{m.group(1)}/commit/{oid}"
                    return self._send(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})
                return self._error(404, "NotFound", f"no route for POST {path}")

        return Handler
