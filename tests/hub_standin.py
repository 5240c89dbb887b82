"""A Hugging Face Hub stand-in over HTTP, for the download path: one model folder served as one repo, with the
routes `huggingface_hub` calls to download a snapshot (the repo's commit, its file tree, each file)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@contextmanager
def hub_serving(repo_id: str, folder: Path, gated: bool = False) -> Iterator[str]:
    """Serve `folder` as `repo_id`; yields the endpoint (HF_ENDPOINT). `gated`: a repo whose terms this caller
    has not accepted (its description answers, its files and auth-check do not)."""
    files = {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: object) -> None:
            pass

        def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _file(self) -> None:
            name = self.path.split("/resolve/", 1)[1].split("/", 1)[1].split("?")[0]
            if name not in files:
                self._answer(404, headers={"X-Error-Code": "EntryNotFound"})
                return
            data = files[name]
            etag = f'"{hashlib.sha1(data).hexdigest()}"'
            self._answer(200, data, {"X-Repo-Commit": COMMIT, "ETag": etag})

        def do_HEAD(self) -> None:
            if "/resolve/" in self.path:
                self._file()
            else:
                self._answer(404)

        def do_GET(self) -> None:
            if gated and (self.path.startswith(f"/api/models/{repo_id}/auth-check") or "/resolve/" in self.path):
                if self.headers.get("authorization"):  # a token whose owner has not accepted the terms
                    self._answer(403, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"})
                else:  # no token at all: the Hub answers 401, with no code to say why
                    self._answer(401, b'{"error": "Invalid username or password."}')
            elif self.path.startswith(f"/api/models/{repo_id}/revision/"):
                info = {"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
                if gated:
                    info["gated"] = "manual"
                self._answer(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            elif self.path.startswith(f"/api/models/{repo_id}/tree/"):
                tree = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()
                ]
                self._answer(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            elif "/resolve/" in self.path:
                self._file()
            else:
                self._answer(404, headers={"X-Error-Code": "RepoNotFound"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
