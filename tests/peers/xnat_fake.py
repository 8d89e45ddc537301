"""A stand-in XNAT on 127.0.0.1 that implements exactly the endpoints pyxnat and mercure use.

No XNAT server can run here (it needs Tomcat, PostgreSQL and a large web application), so this
small HTTP server answers the calls an XNAT target makes, checking HTTP basic auth on each:

* ``GET /data/auth``: the connection test (200 with valid credentials, else 401);
* ``GET /data/JSESSION``: the session pyxnat opens on ``disconnect()`` (a session id, and the
  ``JSESSIONID`` cookie);
* ``DELETE /data/JSESSION``: the session closed by ``disconnect()``;
* ``POST /data/services/import``: the Image Session Import service; the body (a zip) is written to
  a file and, with the query parameters, the content type and the user, kept in ``uploads``.
  The session ``PROJECT_ID``/``SUBJECT_ID``/``EXPT_LABEL`` is archived with the zip's files, by
  XNAT's documented ``overwrite`` values: ``none`` (the default: "do not overwrite existing xml
  or files"; the fake leaves the session as it is and answers 409, a status XNAT's page does not
  name), ``append`` (files added, none replaced) and ``delete`` (the existing files replaced;
  counted in ``deleted``);
* ``GET /data/projects/{p}/subjects/{s}/experiments/{label}``: the session (200, XNAT's JSON
  ``items`` form with its ``data_fields``) or 404 (Image Session Experiments API);
* ``GET /data/projects/{p}/subjects/{s}/experiments/{label}/scans/ALL/files?format=zip``: every
  file of the session as one zip (Image Session Scans API), 404 without the session.

Everything else is 404. ``import_status`` makes the import answer with another status (e.g.
500) to simulate a failing XNAT. ``requests`` lists ``(method, path)`` of every request.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.peers.base import Peer, serve_http, stop_http

__all__ = ["XnatFake", "XnatUpload"]

_CHUNK = 1024 * 1024


@dataclass
class XnatUpload:
    """One ``POST /data/services/import`` as received."""

    params: dict[str, str]
    content_type: str
    user: str
    zip_path: Path

    def members(self) -> dict[str, bytes]:
        """Name -> content of every file in the uploaded zip."""
        with zipfile.ZipFile(self.zip_path) as archive:
            return {name: archive.read(name) for name in archive.namelist()}


@dataclass
class XnatFake(Peer):
    """The fake XNAT, started and always stopped by ``with``; ``url`` is its base URL."""

    folder: Path
    user: str = "xnat-user"
    password: str = "xnat-password"
    import_status: int = 200
    uploads: list[XnatUpload] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    #: (project, subject, label) -> file name -> bytes: the archived sessions.
    sessions: dict[tuple[str, str, str], dict[str, bytes]] = field(default_factory=dict)
    #: Files of existing sessions an ``overwrite=delete`` import replaced.
    deleted: int = 0
    port: int = 0
    _received: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> XnatFake:
        self.folder.mkdir(parents=True, exist_ok=True)
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = serve_http(Handler, "xnat-fake")
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        stop_http(self._server)

    def authorized(self, header: str | None) -> str | None:
        """The user name if ``header`` is valid basic auth for this fake, else None."""
        if not header or not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return None
        ok = secrets.compare_digest(user, self.user) and secrets.compare_digest(
            password, self.password
        )
        return user if ok else None

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def store(self, upload: XnatUpload) -> None:
        with self._lock:
            self.uploads.append(upload)

    def archive(self, upload: XnatUpload) -> int:
        """Archive an accepted upload into its session by ``overwrite``; the HTTP status."""
        p = upload.params
        key = (p.get("PROJECT_ID", ""), p.get("SUBJECT_ID", ""), p.get("EXPT_LABEL", ""))
        mode = p.get("overwrite", "none")
        files = upload.members()
        with self._lock:
            existing = self.sessions.get(key)
            if existing is None:
                self.sessions[key] = files
            elif mode == "delete":
                self.deleted += len(existing)
                self.sessions[key] = files
            elif mode == "append":
                self.sessions[key] = {**files, **existing}
            else:
                return 409
        return 200

    def session_zip(self, key: tuple[str, str, str]) -> bytes | None:
        with self._lock:
            files = self.sessions.get(key)
            if files is None:
                return None
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as zf:
                for name, data in files.items():
                    zf.writestr(f"{key[2]}/scans/1/resources/DICOM/files/{name}", data)
            return buffer.getvalue()

    def next_zip(self) -> Path:
        with self._lock:
            self._received += 1
            return self.folder / f"upload-{self._received}.zip"


class _Handler(BaseHTTPRequestHandler):
    owner: XnatFake
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _drain(self) -> None:
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)

    def _begin(self) -> tuple[str, dict[str, str], str | None]:
        parts = urlsplit(self.path)
        self.owner.record(self.command, parts.path)
        user = self.owner.authorized(self.headers.get("Authorization"))
        return parts.path.rstrip("/"), dict(parse_qsl(parts.query)), user

    def _unauthorized(self) -> None:
        self._drain()
        body = b"<html><body><h1>401 Unauthorized</h1>Login failed</body></html>"
        self._reply(401, body, {"WWW-Authenticate": 'Basic realm="XNAT"'})

    def do_GET(self) -> None:
        path, params, user = self._begin()
        session = _session_key(path)
        if session is not None and user is not None:
            self._session(session, params)
        elif session is None and path not in ("/data/auth", "/data/JSESSION"):
            self._reply(404, b"not found")
        elif user is None:
            self._unauthorized()
        elif path == "/data/auth":
            self._reply(200, b"")
        else:
            session = secrets.token_hex(16).upper()
            self._reply(200, session.encode(), {"Set-Cookie": f"JSESSIONID={session}; Path=/"})

    def _session(self, session: tuple[tuple[str, str, str], str], params: dict[str, str]) -> None:
        key, rest = session
        if rest == "":
            if key not in self.owner.sessions:
                self._reply(404, b"not found")
                return
            fields = {"project": key[0], "subject_ID": key[1], "label": key[2]}
            body = json.dumps({"items": [{"data_fields": fields, "children": []}]})
            self._reply(200, body.encode(), {"Content-Type": "application/json"})
        elif rest == "/scans/ALL/files" and params.get("format") == "zip":
            data = self.owner.session_zip(key)
            if data is None:
                self._reply(404, b"not found")
            else:
                self._reply(200, data, {"Content-Type": "application/zip"})
        else:
            self._reply(404, b"not found")

    def do_DELETE(self) -> None:
        path, _params, user = self._begin()
        self._drain()
        if path != "/data/JSESSION":
            self._reply(404, b"not found")
        elif user is None:
            self._unauthorized()
        else:
            self._reply(200, b"")

    def do_POST(self) -> None:
        path, params, user = self._begin()
        if path != "/data/services/import":
            self._drain()
            self._reply(404, b"not found")
            return
        if user is None:
            self._unauthorized()
            return
        target = self.owner.next_zip()
        remaining = int(self.headers.get("Content-Length") or 0)
        with target.open("wb") as out:
            while remaining > 0:
                chunk = self.rfile.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                out.write(chunk)
                remaining -= len(chunk)
        if self.owner.import_status != 200:
            self._reply(self.owner.import_status, b"The import failed: simulated error")
            return
        upload = XnatUpload(params, self.headers.get("Content-Type", ""), user, target)
        if self.owner.archive(upload) != 200:
            self._reply(409, b"The session already exists (overwrite=none)")
            return
        self.owner.store(upload)
        label = params.get("EXPT_LABEL", "session")
        project = params.get("PROJECT_ID", "project")
        self._reply(200, f"/data/archive/projects/{project}/experiments/{label}\r\n".encode())


def _session_key(path: str) -> tuple[tuple[str, str, str], str] | None:
    """``((project, subject, label), rest)`` of a session URI, or None."""
    parts = path.split("/")
    # "", "data", "projects", p, "subjects", s, "experiments", label, *rest
    if len(parts) < 8 or parts[1:3] != ["data", "projects"]:
        return None
    if parts[4] != "subjects" or parts[6] != "experiments":
        return None
    key = (unquote(parts[3]), unquote(parts[5]), unquote(parts[7]))
    rest = "/".join(parts[8:])
    return key, f"/{rest}" if rest else ""
