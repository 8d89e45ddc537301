"""mercure's XNAT target: the case as one zip to XNAT's Image Session Import service.

As mercure does (reference §3.8): subject = the PatientID of the case's first DICOM file, session
(experiment) label = ``<PatientID>_<StudyDate as YYYY-MM-DD>``, every ``*.dcm`` found recursively
zipped as ``0.dcm``, ``1.dcm``, ... and POSTed with pyxnat to ``/data/services/import`` with
``PROJECT_ID``, ``SUBJECT_ID``, ``EXPT_LABEL``, ``rename=true``, ``overwrite=delete``,
``inbody=true``; then pyxnat's ``disconnect()`` closes the XNAT session.

Except ``overwrite``: mercure's ``delete`` replaced an existing session of the same label (a
second study of the patient that day) and so deleted data. By default we import with XNAT's
``none`` after looking whether the session exists (``blocks._xnat_session``): one holding
exactly the case's instances counts as sent, any other is a clear failure and nothing is
changed. ``overwrite="delete"`` restores mercure's behaviour, explicitly.

Differences: the zip is written to a temporary file and streamed from it (never held in memory),
each case file read from a descriptor opened without following a link (a link planted after the
pre-send check fails the send, naming the file);
the header comes from the first file in the case's sorted file list, sub-folders included (mercure
looked at the top level only and failed when it had no file); every HTTP request pyxnat makes has
a connect and a read timeout; failures are one-line reasons, never a password.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr

from blocks._xnat_session import (
    UnexpectedAnswer,
    case_instances,
    compare_instances,
    session_exists,
    session_instances,
)
from blocks.base import DispatchTarget, SendContext, SendResult, ca_bundle_verify, dicom_files
from blocks.errors import PermanentTargetError, TargetError, TransientTargetError, one_line
from tasks.safefiles import CaseFiles

if TYPE_CHECKING:
    from requests import PreparedRequest, Response

__all__ = ["XnatTarget", "session_labels"]

IMPORT_SERVICE = "/data/services/import"
DEFAULT_CONNECT_TIMEOUT = 10.0
#: XNAT answers the import only after archiving the whole session (``inbody=true``).
DEFAULT_READ_TIMEOUT = 600.0
_COPY_CHUNK = 1024 * 1024


def session_labels(first_file: Path, case: CaseFiles) -> tuple[str, str]:
    """(subject, experiment label) from one DICOM header of ``case``, as mercure derives them."""
    from pydicom import dcmread

    with case.open(first_file) as fh:
        ds = dcmread(fh, stop_before_pixels=True)
    subject = str(ds.get("PatientID", "") or "")
    study_date = str(ds.get("StudyDate", "") or "")
    if not subject:
        raise ValueError(f"{first_file.name} has no PatientID (the XNAT subject)")
    try:
        day = datetime.datetime.strptime(study_date, "%Y%m%d").strftime("%Y-%m-%d")
    except ValueError:
        raise ValueError(
            f"{first_file.name} has no valid StudyDate ({study_date!r}); the XNAT session "
            "label needs it"
        ) from None
    return subject, f"{subject}_{day}"


class XnatTarget(DispatchTarget):
    """An XNAT project that receives each case as one imaging session (mercure's XNAT target).

    Field names are mercure's, so a mercure.json target imports one to one.
    """

    _block_type_name = "XNAT Target"
    _block_type_slug = "xnat-target"
    _description = "An XNAT project that receives each case as one session (mercure's XNAT)."
    target_type: ClassVar[str] = "xnat"
    _example_document = "xnat-research"

    project_id: str = Field(description="XNAT project ID the sessions are imported into.")
    host: str = Field(description="Base URL of the XNAT server (e.g. https://xnat.example.org).")
    user: str = Field(description="XNAT user name.")
    password: SecretStr = Field(description="Password of user.")
    connect_timeout: float = Field(
        default=DEFAULT_CONNECT_TIMEOUT, gt=0, description="TCP connect timeout, seconds."
    )
    read_timeout: float = Field(
        default=DEFAULT_READ_TIMEOUT,
        gt=0,
        description="Timeout waiting for XNAT's answer, seconds (the import answers after "
        "archiving the session).",
    )
    ca_bundle: str = Field(
        default="",
        description="CA certificates file (PEM) an https XNAT's certificate must chain to "
        "(empty: the HTTP client's default CA bundle). Certificates are always verified.",
    )
    overwrite: Literal["none", "append", "delete"] = Field(
        default="none",
        description="XNAT's import overwrite mode for a session label that exists: none (a "
        "session with exactly the case's instances counts as sent, any other is an error; "
        "nothing is changed), append, or delete (mercure's: replaces the existing session).",
    )

    def where(self) -> str:
        return f"XNAT target {self.target_name or self.project_id} ({self.base_url()})"

    def base_url(self) -> str:
        return self.host.rstrip("/")

    def get_client(self) -> Any:
        """A ``pyxnat.Interface``: the one place the password is unwrapped.

        pyxnat gives no timeout to its own requests (``disconnect()`` among them), so its
        ``requests`` session gets adapters that add ours to every request.
        """
        import pyxnat

        if not (self.base_url() and self.user and self.password.get_secret_value()):
            # pyxnat would prompt on the terminal, or connect without a timeout.
            raise PermanentTargetError(f"{self.where()}: host, user and password are required")
        interface = pyxnat.Interface(
            server=self.base_url(),
            user=self.user,
            password=self.password.get_secret_value(),
            verify=ca_bundle_verify(self.ca_bundle, self.where()),
        )
        adapter = _timeout_adapter((self.connect_timeout, self.read_timeout))
        interface._http.mount("http://", adapter)
        interface._http.mount("https://", adapter)
        return interface

    def send(self, context: SendContext) -> SendResult:
        files = dicom_files(context.case_dir)
        if not files:
            raise PermanentTargetError(f"{self.where()}: the case has no *.dcm files")
        try:
            subject, label = session_labels(files[0], context.files)
        except (OSError, ValueError) as exc:
            raise PermanentTargetError(f"{self.where()}: {exc}") from None
        params = {
            "PROJECT_ID": self.project_id,
            "SUBJECT_ID": subject,
            "EXPT_LABEL": label,
            "rename": "true",
            "overwrite": self.overwrite,
            "inbody": "true",
        }
        with (
            self._errors(),
            self._session() as session,
            tempfile.TemporaryDirectory(prefix="dicom-dispatch-xnat-") as tmp,
        ):
            if self.overwrite == "none":
                there = self._already_there(session, subject, label, files, context.files)
                if there is not None:
                    return there
            archive = Path(tmp) / "dicom.zip"
            try:
                size_in = _write_zip(archive, files, context.files)
            except OSError as exc:
                raise PermanentTargetError(
                    f"{self.where()}: cannot build the zip: {exc.strerror or exc}"
                ) from None
            size = archive.stat().st_size
            with archive.open("rb") as body:
                response = session.post(
                    uri=IMPORT_SERVICE,
                    params=params,
                    headers={"Content-Type": "application/zip"},
                    data=body,
                    timeout=(self.connect_timeout, self.read_timeout),
                )
            if response.status_code != 200:
                raise _status_error(self.where(), response)
            answer = " ".join(response.text.split())[:200]
        return SendResult(
            files=len(files),
            bytes=size_in,
            detail=f"{len(files)} files ({size} bytes zipped) to project {self.project_id}, "
            f"subject {subject}, session {label}",
            extra={"xnat": answer},
        )

    def _already_there(
        self, session: Any, subject: str, label: str, files: list[Path], case: CaseFiles
    ) -> SendResult | None:
        """None when the session does not exist yet; the case as sent when it holds exactly
        its instances; else the ``PermanentTargetError`` that says what differs."""
        where = f"{self.where()}: session {label} of subject {subject}"
        try:
            if not session_exists(session, self.project_id, subject, label):
                return None
            theirs = session_instances(session, self.project_id, subject, label)
        except UnexpectedAnswer as exc:
            raise _status_error(self.where(), exc.response, "looking at the session") from None
        ours = case_instances(files, case)
        differs = compare_instances(ours, theirs)
        if differs is not None:
            raise PermanentTargetError(
                f"{where} already exists and is another study ({differs}); nothing was sent "
                "or changed: import it under another label by hand, or set overwrite"
            )
        return SendResult(
            files=0,
            bytes=0,
            detail=f"session {label} already holds the case's {len(ours)} instances "
            f"(project {self.project_id}, subject {subject}): not sent again",
        )

    def test_connection(self) -> dict[str, Any]:
        """mercure's keys: ``ping`` (here: TCP connect to the host), ``loggedin`` and ``err``.

        ``loggedin`` is true when ``GET <host>/data/auth`` with the credentials answers 200;
        ``err`` is the server's answer (or the connection error) otherwise.
        """
        import requests

        parts = urlsplit(self.base_url())
        port = parts.port or (443 if parts.scheme == "https" else 80)
        ping = False
        if parts.hostname:
            try:
                with socket.create_connection((parts.hostname, port), timeout=5):
                    ping = True
            except OSError:
                ping = False
        try:
            response = requests.get(
                f"{self.base_url()}/data/auth",
                auth=(self.user, self.password.get_secret_value()),
                timeout=(self.connect_timeout, min(self.read_timeout, 30)),
                verify=ca_bundle_verify(self.ca_bundle, self.where()),
            )
        except TargetError as exc:
            return {"ping": ping, "loggedin": False, "err": str(exc)}
        except requests.RequestException as exc:
            why = f"cannot reach {self.base_url()}/data/auth ({type(exc).__name__})"
            return {"ping": ping, "loggedin": False, "err": why}
        ok = response.status_code == 200
        detail = one_line(response.text, 200, "no details")
        err = "" if ok else f"HTTP {response.status_code}: {detail}"
        return {"ping": ping, "loggedin": ok, "err": err}

    @contextmanager
    def _session(self) -> Iterator[Any]:
        """An XNAT session, closed afterwards as mercure does (errors closing it are ignored)."""
        session = self.get_client()
        try:
            yield session
        finally:
            try:
                session.disconnect()
            except Exception as exc:  # a failed logout must not hide the import's outcome
                self.logger.debug("%s: closing the XNAT session failed: %s", self.where(), exc)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate requests/pyxnat errors into TargetErrors (the block's one boundary)."""
        import requests

        where = self.where()
        try:
            yield
        except TargetError:
            raise
        except requests.ConnectTimeout:
            raise TransientTargetError(
                f"{where}: no connection within {self.connect_timeout:g} s"
            ) from None
        except requests.ReadTimeout:
            raise TransientTargetError(
                f"{where}: no answer within {self.read_timeout:g} s"
            ) from None
        except requests.ConnectionError:
            raise TransientTargetError(f"{where}: cannot connect") from None
        except requests.RequestException as exc:
            raise TransientTargetError(f"{where}: {type(exc).__name__}") from None
        except OSError as exc:
            raise PermanentTargetError(f"{where}: {exc.strerror or exc}") from None


def _write_zip(archive: Path, files: list[Path], case: CaseFiles) -> int:
    """mercure's zip: every file stored (not compressed) as ``<n>.dcm``, streamed from a
    descriptor opened without following a link; the bytes of the files."""
    size = 0
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for number, path in enumerate(files):
            with case.open(path) as source:
                info = os.fstat(source.fileno())
                member = zipfile.ZipInfo(f"{number}.dcm", time.localtime(info.st_mtime)[:6])
                member.external_attr = (info.st_mode & 0xFFFF) << 16
                with zf.open(member, "w", force_zip64=info.st_size >= zipfile.ZIP64_LIMIT) as out:
                    shutil.copyfileobj(source, out, _COPY_CHUNK)
            size += info.st_size
    return size


def _status_error(where: str, response: Any, action: str = "the import") -> TargetError:
    status = int(response.status_code)
    text = one_line(response.text, 200, "no details")
    if status in (401, 403):
        return PermanentTargetError(
            f"{where}: XNAT refused the credentials (HTTP {status}): check user and password"
        )
    if status == 404:
        return PermanentTargetError(
            f"{where}: no import service at {IMPORT_SERVICE} (HTTP 404): is host the XNAT URL?"
        )
    kind = TransientTargetError if status >= 500 or status in (408, 429) else PermanentTargetError
    return kind(f"{where}: {action} failed (HTTP {status}): {text}")


def _timeout_adapter(timeout: tuple[float, float]) -> Any:
    """A requests adapter that gives ``timeout`` to every request sent without one."""
    from requests.adapters import HTTPAdapter

    class TimeoutAdapter(HTTPAdapter):
        def send(
            self,
            request: PreparedRequest,
            stream: bool = False,
            timeout: None | float | tuple[float | None, float | None] = None,
            verify: bool | str = True,
            cert: None | str | tuple[str, str] = None,
            proxies: dict[str, str] | None = None,
        ) -> Response:
            return super().send(
                request,
                stream=stream,
                timeout=default if timeout is None else timeout,
                verify=verify,
                cert=cert,
                proxies=proxies,
            )

    default = timeout
    return TimeoutAdapter()
