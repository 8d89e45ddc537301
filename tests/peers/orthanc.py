"""Real DICOMweb peers for the tests: Orthanc with its DICOMweb plugin, and a recording stand-in.

``Orthanc`` runs the Debian ``orthanc`` + ``orthanc-dicomweb`` packages with a configuration of
its own (free HTTP and DICOM ports, own storage folder, ``RemoteAccessAllowed`` false: Orthanc
1.10 has no bind option, so only loopback clients are let in), optionally with HTTP basic
authentication. ``StowRecorder`` is a small STOW-RS server for what Orthanc cannot show: the
exact request headers (bearer tokens) and how many requests arrived. A missing Orthanc skips
locally but fails on CI (``CI`` set).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.peers.base import Peer, missing, serve_http, stop_http
from tests.peers.net import free_port, stop_process

__all__ = ["Orthanc", "StowRecorder", "orthanc_binary", "orthanc_dicomweb_plugin"]

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def orthanc_binary() -> str:
    """Absolute path of the ``Orthanc`` server binary (Debian package ``orthanc``)."""
    for candidate in ORTHANC_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("Orthanc")
    if found:
        return found
    missing("Orthanc not found (install the Debian packages 'orthanc' and 'orthanc-dicomweb')")


def orthanc_dicomweb_plugin() -> str:
    """Path of the DICOMweb plugin (Debian package ``orthanc-dicomweb``)."""
    for candidate in PLUGIN_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    try:
        listed = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    for path in listed:
        if path.endswith(".so") and "DicomWeb" in path:
            return path
    missing("Orthanc's DICOMweb plugin not found (install the Debian package 'orthanc-dicomweb')")


class Orthanc(Peer):
    """Orthanc + DICOMweb on free 127.0.0.1 ports, started and always stopped by ``with``.

    ``users`` (name → password) turns on HTTP basic authentication for the REST API and
    DICOMweb alike. ``dicom_server=False`` leaves Orthanc's DICOM port closed (it stops ≈ 1 s
    sooner: Orthanc waits a second for each server it shuts down). ``dicomweb_url`` is the
    DICOMweb root (``http://127.0.0.1:<port>/dicom-web``).
    """

    def __init__(
        self,
        folder: Path,
        *,
        users: dict[str, str] | None = None,
        aet: str = "ORTHANC",
        dicom_server: bool = True,
        modalities: dict[str, Any] | None = None,
    ) -> None:
        self.folder = folder
        #: ``DicomModalities`` of the configuration: the AEs Orthanc knows (and answers, e.g.
        #: Storage Commitment on a new association to the AE that asked).
        self.modalities = dict(modalities or {})
        self.users = dict(users or {})
        self.aet = aet
        self.dicom_server = dicom_server
        self.http_port = 0
        self.dicom_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items())) if self.users else None

    def _config(self) -> dict[str, Any]:
        storage = self.folder / "storage"
        return {
            "Name": f"dicom-dispatch-test-{self.http_port}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomServerEnabled": self.dicom_server,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "SslEnabled": False,
            "HttpsVerifyPeers": False,
            "TcpNoDelay": True,
            "SaveJobs": False,
            "OverwriteInstances": True,
            "DicomModalities": self.modalities,
            "OrthancPeers": {},
            "Plugins": [orthanc_dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        }

    def __enter__(self) -> Orthanc:
        binary = orthanc_binary()
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1"}
        for _attempt in range(5):
            self.http_port, self.dicom_port = free_port(), free_port()
            config = self.folder / "orthanc.json"
            config.write_text(json.dumps(self._config(), indent=2))
            with self._log.open("ab") as log:
                self._proc = subprocess.Popen(
                    [binary, str(config)], env=env, stdout=log, stderr=subprocess.STDOUT
                )
            if self._wait_ready():
                return self
            self.stop()  # a port was taken meanwhile, or Orthanc is slow: try new ports
        pytest.fail(f"Orthanc did not start; log:\n{self.log()[-2000:]}")

    def _wait_ready(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                try:
                    if client.get("/system").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        stop_process(self._proc)

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def client(self, timeout: float = 30.0) -> httpx.Client:
        """A client for Orthanc's REST API (loopback only, no proxies from the environment)."""
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=timeout, trust_env=False)

    def instances(self) -> dict[str, str]:
        """SOP Instance UID → Orthanc instance id, for every stored instance."""
        with self.client() as client:
            ids = client.get("/instances").raise_for_status().json()
            out = {}
            for orthanc_id in ids:
                tags = client.get(f"/instances/{orthanc_id}/simplified-tags").raise_for_status()
                out[str(tags.json()["SOPInstanceUID"])] = orthanc_id
        return out

    def download(self, folder: Path) -> dict[str, Path]:
        """Every stored instance as ``<folder>/<SOP Instance UID>.dcm`` (Orthanc's own bytes)."""
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        with self.client() as client:
            for uid, orthanc_id in self.instances().items():
                path = folder / f"{uid}.dcm"
                path.write_bytes(
                    client.get(f"/instances/{orthanc_id}/file").raise_for_status().content
                )
                out[uid] = path
        return out


@dataclass
class StowRequest:
    """One STOW-RS request as the recorder received it."""

    path: str
    headers: dict[str, str]
    sop_instance_uids: list[str]
    chunked: bool


@dataclass
class StowRecorder(Peer):
    """A minimal STOW-RS (and QIDO ``/studies``) server on 127.0.0.1 that records every request.

    It parses each multipart body, answers with a DICOM JSON Store Instances Response that
    references every instance it read, and rejects requests without ``Authorization: Bearer
    <token>`` with 401 when ``token`` is set. ``fail_status`` makes every POST answer that status.
    """

    token: str | None = None
    fail_status: int | None = None
    requests: list[StowRequest] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received(self) -> set[str]:
        return {uid for r in self.requests for uid in r.sop_instance_uids}

    def __enter__(self) -> StowRecorder:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _authorized(self) -> bool:
                if recorder.token is None:
                    return True
                return self.headers.get("Authorization") == f"Bearer {recorder.token}"

            def _reply(self, status: int, body: bytes = b"", ctype: str = "") -> None:
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if not self._authorized():
                    self._reply(401)
                elif self.path.split("?")[0].endswith("/studies"):
                    self._reply(200, b"[]", "application/dicom+json")
                else:
                    self._reply(404)

            def do_POST(self) -> None:
                chunked = "chunked" in self.headers.get("Transfer-Encoding", "")
                body = (
                    self._read_chunked()
                    if chunked
                    else self.rfile.read(int(self.headers.get("Content-Length", "0")))
                )
                uids = _multipart_sop_uids(self.headers.get("Content-Type", ""), body)
                recorder.requests.append(
                    StowRequest(self.path, dict(self.headers.items()), uids, chunked)
                )
                if not self._authorized():
                    self._reply(401)
                elif recorder.fail_status is not None:
                    self._reply(recorder.fail_status, b"try later", "text/plain")
                else:
                    self._reply(200, _store_response(uids), "application/dicom+json")

            def _read_chunked(self) -> bytes:
                data = bytearray()
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    chunk = self.rfile.read(size + 2)
                    if size == 0:
                        return bytes(data)
                    data += chunk[:-2]

        self._server = serve_http(Handler, "stow-recorder")
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        stop_http(self._server)


def _multipart_sop_uids(content_type: str, body: bytes) -> list[str]:
    from pydicom import dcmread

    boundary = ""
    for param in content_type.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        return []
    uids = []
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        _, _, payload = part.partition(b"\r\n\r\n")
        payload = payload.removesuffix(b"\r\n")
        ds = dcmread(io.BytesIO(payload), stop_before_pixels=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def _store_response(uids: list[str]) -> bytes:
    items = [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids]
    return json.dumps({"00081199": {"vr": "SQ", "Value": items}}).encode()
