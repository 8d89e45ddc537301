"""mercure's DICOMweb target: STOW-RS to a DICOMweb server, or into a folder for ``file://`` URLs.

Fixes over mercure (architecture §4.1): a case is sent in bounded batches streamed from the files
(``blocks._stow``), never read whole into memory as one request; every request has timeouts;
``test_connection`` reports refused credentials as such (mercure's check read ``errno`` of a
requests ``HTTPError``, which is ``None``, so a 401 passed). HTTP and connection errors are
translated in one place (:meth:`DicomWebTarget._translate`) into the project's error tree with a
one-line reason naming the target and the URL (user info and query stripped), never a secret.

``file://`` URLs use dicomweb-client's ``DICOMfileClient`` as mercure does: the instances are
written as ``<folder>/studies/<study>/series/<series>/instances/<sop>`` and indexed in the
folder's ``.dicom-file-client.db``.

Query/retrieve: :meth:`DicomWebTarget.service_url` gives the QIDO-RS and WADO-RS base URLs and
:meth:`DicomWebTarget.get_client` the authenticated HTTP client that ``find`` and ``retrieve``
(``blocks._dicomweb_qr``) use.

Over 400 lines because the fields, the authenticated client and the one error boundary that
every DICOMweb request goes through belong to the block; the protocols are in ``blocks._stow``
and ``blocks._dicomweb_qr``.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import sqlite3
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import Field, SecretStr, field_validator

from blocks import _stow
from blocks.base import (
    CaseOrigin,
    QueryTarget,
    RetrieveRequest,
    SendContext,
    SendResult,
    ca_bundle_verify,
    dicom_files,
)
from blocks.errors import (
    PermanentTargetError,
    TargetError,
    TransientTargetError,
    one_line,
    public_url,
    url_credentials,
    without_userinfo,
)

if TYPE_CHECKING:
    from dicomweb_client import DICOMfileClient

    from blocks.qr import Level, RetrieveResult

__all__ = ["DicomWebTarget", "public_url"]

DEFAULT_STOW_BATCH_FILES = 50
DEFAULT_STOW_BATCH_BYTES = 64 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 300.0
#: HTTP statuses worth a retry: request timeout, too many requests, and server-side trouble.
_TRANSIENT_STATUSES = {408, 425, 429, 500, 502, 503, 504, 507}
_ACCEPT_JSON = "application/dicom+json, application/json;q=0.9, application/dicom+xml;q=0.5"
Service = Literal["qido", "wado", "stow"]


class DicomWebTarget(QueryTarget):
    """A DICOMweb server that receives cases by STOW-RS (and, later, answers QIDO-RS/WADO-RS).

    Field names are mercure's, so a mercure.json target imports one to one. Authentication is
    HTTP basic when ``http_user`` and ``http_password`` are both set, else a bearer token when
    ``access_token`` is set, else none. A ``file://`` URL stores into a local folder.
    """

    _block_type_name = "DICOMweb Target"
    _block_type_slug = "dicomweb-target"
    _description = "A DICOMweb server that receives cases by STOW-RS (mercure's DICOMweb target)."
    target_type: ClassVar[str] = "dicomweb"
    _example_document = "dicomweb-pacs"

    url: str = Field(
        description="Base URL (e.g. https://pacs/dicom-web), or file:///folder for a local folder."
    )
    qido_url_prefix: str | None = Field(
        default=None, description="Path appended to url for QIDO-RS (empty: none)."
    )
    wado_url_prefix: str | None = Field(
        default=None, description="Path appended to url for WADO-RS (empty: none)."
    )
    stow_url_prefix: str | None = Field(
        default=None, description="Path appended to url for STOW-RS (empty: none)."
    )
    access_token: SecretStr | None = Field(
        default=None, description="Bearer token (used when no HTTP user and password are set)."
    )
    http_user: str | None = Field(default=None, description="HTTP basic authentication user.")
    http_password: SecretStr | None = Field(
        default=None, description="HTTP basic authentication password."
    )
    stow_batch_files: int = Field(
        default=DEFAULT_STOW_BATCH_FILES,
        ge=1,
        description="At most this many instances per STOW-RS request.",
    )
    stow_batch_bytes: int = Field(
        default=DEFAULT_STOW_BATCH_BYTES,
        ge=1,
        description="At most this many bytes per STOW-RS request (a larger file goes alone).",
    )
    connect_timeout: float = Field(
        default=DEFAULT_CONNECT_TIMEOUT, gt=0, description="TCP/TLS connect timeout, seconds."
    )
    read_timeout: float = Field(
        default=DEFAULT_READ_TIMEOUT,
        gt=0,
        description="Longest wait for the server to accept data or answer a request, seconds.",
    )
    ca_bundle: str = Field(
        default="",
        description="CA certificates file (PEM) an https server's certificate must chain to "
        "(empty: the HTTP client's default CA bundle). Certificates are always verified.",
    )

    @field_validator("qido_url_prefix", "wado_url_prefix", "stow_url_prefix", "http_user")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        """mercure's form turns empty strings into ``None``; do the same for imported JSON."""
        return value or None

    @field_validator("access_token", "http_password", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: Any) -> Any:
        if value == "" or (isinstance(value, SecretStr) and not value.get_secret_value()):
            return None
        return value

    # -- addresses and clients (the only place secrets are unwrapped) -------------------------

    @property
    def is_file_url(self) -> bool:
        return self.url.strip().lower().startswith("file://")

    def service_url(self, service: Service) -> str:
        """Base URL of a DICOMweb service: ``url`` + ``/<prefix>`` (dicomweb-client's rule)."""
        prefix = {
            "qido": self.qido_url_prefix,
            "wado": self.wado_url_prefix,
            "stow": self.stow_url_prefix,
        }[service]
        base = without_userinfo(self.url.strip()).rstrip("/")
        return f"{base}/{prefix.strip('/')}" if prefix and prefix.strip("/") else base

    def _auth(self) -> tuple[httpx.Auth | None, dict[str, str]]:
        if self.http_user and self.http_password is not None:
            return httpx.BasicAuth(self.http_user, self.http_password.get_secret_value()), {}
        in_url = url_credentials(self.url.strip())  # sent as this header, never in a URL
        if in_url is not None:
            return httpx.BasicAuth(*in_url), {}
        if self.access_token is not None:
            return None, {"Authorization": f"Bearer {self.access_token.get_secret_value()}"}
        return None, {}

    def get_client(self) -> httpx.Client:
        """An HTTP client with this target's credentials, timeouts and ``TCP_NODELAY``."""
        auth, headers = self._auth()
        transport = httpx.HTTPTransport(
            verify=_httpx_verify(self.ca_bundle, f"DICOMweb target {public_url(self.url)}"),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        return httpx.Client(
            auth=auth,
            headers=headers,
            timeout=httpx.Timeout(
                connect=self.connect_timeout,
                read=self.read_timeout,
                write=self.read_timeout,
                pool=self.connect_timeout,
            ),
            transport=transport,
            follow_redirects=False,
        )

    def folder(self) -> Path:
        """The local folder of a ``file://`` URL."""
        return Path(unquote(urlsplit(self.url.strip()).path))

    def get_file_client(self) -> DICOMfileClient:
        """dicomweb-client's file client for a ``file://`` URL (mercure's settings).

        The index lives in the folder; if it cannot be written there, it is kept in memory.
        """
        from dicomweb_client import DICOMfileClient

        url = self.url.strip()
        try:
            return DICOMfileClient(url, in_memory=False, update_db=True)
        except sqlite3.OperationalError:
            return DICOMfileClient(url, in_memory=True, update_db=True)

    # -- the one translation boundary ---------------------------------------------------------

    def _where(self, url: str | None = None) -> str:
        return f"target {self.target_name or 'dicomweb'} ({public_url(url or self.url)})"

    @contextmanager
    def _translate(self, action: str, url: str | None = None) -> Iterator[None]:
        """Turn HTTP, socket, file and dicomweb-client errors into a ``TargetError``."""
        where = self._where(url)
        try:
            yield
        except TargetError:
            raise
        except httpx.HTTPStatusError as exc:
            raise _status_error(where, action, exc.response) from None
        except httpx.TimeoutException as exc:
            phase = type(exc).__name__.replace("Timeout", "").lower() or "request"
            limit = self.connect_timeout if phase in ("connect", "pool") else self.read_timeout
            raise TransientTargetError(
                f"{where}: {action}: timed out ({phase}) after {limit:g} s"
            ) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise PermanentTargetError(f"{where}: invalid URL: {exc}") from None
        except httpx.TransportError as exc:
            kind = "connection failed" if isinstance(exc, httpx.ConnectError) else "network error"
            raise TransientTargetError(f"{where}: {action}: {kind}: {one_line(exc, 200)}") from None
        except _stow.CaseFileError as exc:
            raise PermanentTargetError(f"{where}: {exc}") from None
        except OSError as exc:
            transient = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise (TransientTargetError if transient else PermanentTargetError)(
                f"{where}: {action}: {exc.strerror or exc}"
            ) from None
        except Exception as exc:  # dicomweb-client and pydicom raise plain exceptions
            raise PermanentTargetError(
                f"{where}: {action}: {type(exc).__name__}: {one_line(exc, 200)}"
            ) from None

    # -- send ---------------------------------------------------------------------------------

    def send(self, context: SendContext) -> SendResult:
        """STOW-RS every ``*.dcm`` of the case (recursive), in batches; all must be referenced."""
        files = dicom_files(context.case_dir)
        if not files:
            raise PermanentTargetError(f"{self._where()}: the case has no *.dcm files")
        with self._translate("reading the case"):
            instances = _stow.read_instances(files, context.files)
        batches = _stow.plan_batches(instances, self.stow_batch_files, self.stow_batch_bytes)
        if self.is_file_url:
            self._store_in_folder(batches)
            how = f"stored in {self.folder()} (file client)"
        else:
            self._post_batches(batches)
            how = f"by STOW-RS to {public_url(self.service_url('stow'))}"
        size = sum(i.size for i in instances)
        return SendResult(
            files=len(instances),
            bytes=size,
            detail=f"{len(instances)} instances {how} in {len(batches)} request(s)",
            extra={"requests": len(batches)},
        )

    def _post_batches(self, batches: Sequence[Sequence[_stow.Instance]]) -> None:
        url = f"{self.service_url('stow')}/studies"
        total = sum(len(b) for b in batches)
        stored = 0
        with self._translate("STOW-RS", url), self.get_client() as client:
            for number, batch in enumerate(batches, 1):
                boundary = _stow.new_boundary()
                headers = {
                    "Content-Type": _stow.content_type(boundary),
                    "Content-Length": str(_stow.body_length(batch, boundary)),
                    "Accept": _ACCEPT_JSON,
                }
                response = client.post(
                    url, content=_stow.iter_body(batch, boundary), headers=headers
                )
                if response.status_code not in (200, 202, 409):
                    response.raise_for_status()
                    raise PermanentTargetError(
                        f"{self._where(url)}: STOW-RS: unexpected HTTP {response.status_code}"
                    )
                parsed = _stow.parse_store_response(
                    response.headers.get("Content-Type", ""), response.content
                )
                self._check_batch(url, batch, parsed, response.status_code, stored, total)
                stored += len(batch)
                self.logger.debug(
                    "STOW-RS batch %d/%d: %d instances", number, len(batches), len(batch)
                )

    def _check_batch(
        self,
        url: str,
        batch: Sequence[_stow.Instance],
        parsed: _stow.StoreResponse,
        status: int | None,
        stored_before: int,
        total: int,
    ) -> None:
        missing = parsed.missing(batch)
        if not missing:
            return
        stored = stored_before + len(batch) - len(missing)
        head = f"{self._where(url)}: only {stored} out of {total} instances were stored"
        if status is not None:
            head += f" (HTTP {status})"
        failed = [i for i in missing if i.sop_instance_uid in parsed.failed]
        if failed:
            codes = [parsed.failed[i.sop_instance_uid] for i in failed]
            first = failed[0]
            message = (
                f"{head}; {len(failed)} failed, first {first.path.name}: "
                f"{_stow.failure_text(codes[0])}"
            )
            transient = all(c is not None and 0xA700 <= c <= 0xA7FF for c in codes)
            raise (TransientTargetError if transient else PermanentTargetError)(message)
        if not parsed.has_body:
            raise PermanentTargetError(
                f"{head}; the response lists no stored instances (no ReferencedSOPSequence)"
            )
        raise TransientTargetError(
            f"{head}; {len(missing)} not referenced in the response, first {missing[0].path.name}"
        )

    def _store_in_folder(self, batches: Sequence[Sequence[_stow.Instance]]) -> None:
        from pydicom import dcmread

        folder = self.folder()
        where = self._where()
        if not folder.is_dir():
            raise PermanentTargetError(f"{where}: no such folder {folder}")
        total = sum(len(b) for b in batches)
        stored = 0
        with self._translate("storing into the folder"):
            client = self.get_file_client()
            for batch in batches:
                datasets = []
                for instance in batch:
                    with instance.open() as fh:
                        datasets.append(dcmread(fh))
                response = client.store_instances(datasets)
                referenced = {
                    str(item.ReferencedSOPInstanceUID)
                    for item in response.get("ReferencedSOPSequence", [])
                }
                failed = {
                    str(item.ReferencedSOPInstanceUID): item.get("FailureReason")
                    for item in response.get("FailedSOPSequence", [])
                }
                parsed = _stow.StoreResponse(referenced=referenced, failed=failed)
                self._check_batch(str(folder), batch, parsed, None, stored, total)
                stored += len(batch)

    # -- query / retrieve (QIDO-RS, WADO-RS: blocks._dicomweb_qr) ------------------------------

    def _find(
        self, accession: str, filters: dict[str, Any] | None, level: Level
    ) -> list[dict[str, Any]]:
        """QIDO-RS by accession number."""
        from blocks import _dicomweb_qr

        return _dicomweb_qr.find(self, accession, filters, level)

    def _retrieve(self, request: RetrieveRequest) -> RetrieveResult:
        """WADO-RS (streamed) what ``find`` finds."""
        from blocks import _dicomweb_qr

        return _dicomweb_qr.retrieve(self, request)

    def case_origin(self) -> CaseOrigin:
        return CaseOrigin(
            address=public_url(self.url) if self.url else "MISSING",
            sender_aet="MISSING",
            receiver_aet="MISSING",
        )

    # -- test ---------------------------------------------------------------------------------

    @staticmethod
    def connection_ok(result: dict[str, Any]) -> bool:
        """Usable only when both checks are ``True`` (a reason string is a failure)."""
        return result.get("Authentication") is True and result.get("QIDO query") is True

    def test_connection(self) -> dict[str, Any]:
        """mercure's keys: ``Authentication`` (bool, or a reason) and ``QIDO query``.

        A refused login (HTTP 401/403) gives ``Authentication: False`` and a ``Reason`` line;
        an unreachable server gives ``Authentication: None``, ``QIDO query: False`` and the
        reason. Never raises for a peer problem.
        """
        if self.is_file_url:
            return self._test_folder()
        result: dict[str, Any] = {"Authentication": None, "QIDO query": False}
        qido = f"{self.service_url('qido')}/studies"
        try:
            with self.get_client() as client:
                with self._translate("connecting", self.url):
                    probe = client.get(
                        without_userinfo(self.url.strip()), headers={"Accept": _ACCEPT_JSON}
                    )
                if probe.status_code in (401, 403):
                    result["Authentication"] = False
                    result["Reason"] = _status_error(self._where(), "login", probe).args[0]
                    return result
                result["Authentication"] = True
                with self._translate("QIDO-RS", qido):
                    answer = client.get(
                        qido, params={"limit": "1"}, headers={"Accept": _ACCEPT_JSON}
                    )
                    answer.raise_for_status()
                result["QIDO query"] = True
        except TargetError as exc:
            result["Reason"] = str(exc)
        return result

    def _test_folder(self) -> dict[str, Any]:
        import os

        folder = self.folder()
        result: dict[str, Any] = {"Authentication": True, "QIDO query": False}
        if not folder.is_dir():
            result["Authentication"] = f"No such folder {folder}"
            return result
        if self.direction in ("pull", "both") and not os.access(folder, os.R_OK):
            result["Authentication"] = f"No read access to folder {folder}"
        elif self.direction in ("push", "both") and not os.access(folder, os.W_OK | os.X_OK):
            result["Authentication"] = f"No write access to folder {folder}"
        try:
            with self._translate("QIDO query"):
                self.get_file_client().search_for_studies(limit=1)
            result["QIDO query"] = True
        except TargetError as exc:
            result["Reason"] = str(exc)
        return result


def _httpx_verify(ca_bundle: str, where: str) -> ssl.SSLContext | bool:
    """httpx's verify: its default (True), or an SSL context of the CA bundle file."""
    verify = ca_bundle_verify(ca_bundle, where)
    if not isinstance(verify, str):
        return True
    return _bundle_context(verify, os.stat(verify).st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _bundle_context(path: str, mtime_ns: int) -> ssl.SSLContext:
    """Made once per version of the file: loading certificates costs milliseconds."""
    return ssl.create_default_context(cafile=path)


def _status_error(where: str, action: str, response: httpx.Response) -> TargetError:
    """The ``TargetError`` for an HTTP error status: 4xx permanent, 5xx (and 408, 429) transient."""
    status = response.status_code
    phrase = response.reason_phrase or ""
    if status == 401:
        why = (
            "the server refused the credentials"
            if _sent_credentials(response)
            else "the server requires credentials and none are configured"
        )
        return PermanentTargetError(f"{where}: {action}: HTTP 401 {phrase}: {why}")
    if status == 403:
        return PermanentTargetError(f"{where}: {action}: HTTP 403 {phrase}: access denied")
    detail = ""
    try:
        if response.headers.get("Content-Type", "").startswith(("text/", "application/json")):
            detail = ": " + one_line(response.text, 200)
    except httpx.ResponseNotRead:
        detail = ""
    if status == 413:
        detail += " (lower stow_batch_bytes / stow_batch_files)"
    transient = status in _TRANSIENT_STATUSES or status >= 500
    return (TransientTargetError if transient else PermanentTargetError)(
        f"{where}: {action}: HTTP {status} {phrase}{detail}"
    )


def _sent_credentials(response: httpx.Response) -> bool:
    request = response.request
    return "Authorization" in request.headers
