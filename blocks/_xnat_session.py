"""Whether XNAT already holds a case's session: so a re-send neither duplicates nor deletes.

mercure imports with ``overwrite=delete``: a second study of a patient on the same day (same
label ``<PatientID>_<date>``) deleted the first session on the server. We import with XNAT's
default ``overwrite=none`` instead and look first: a session of that label whose SOP instances
are exactly the case's is the case already sent (a re-send after a crash succeeds without an
upload); any other session of that label is a clear failure, and nothing on the server changes.

XNAT REST calls used (XNAT's documented API, "Image Session Experiments API" and "Image
Session Scans API"):

* ``GET /data/projects/{project}/subjects/{subject}/experiments/{label}?format=json``: 200
  with the session, 404 when there is none;
* ``GET /data/projects/{project}/subjects/{subject}/experiments/{label}/scans/ALL/files
  ?format=zip``: every scan file of the session, as one zip (read for its SOP Instance UIDs).

Prefect-free.
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tasks.safefiles import CaseFiles

__all__ = [
    "UnexpectedAnswer",
    "case_instances",
    "compare_instances",
    "session_exists",
    "session_instances",
]

_CHUNK = 1024 * 1024


def _session_uri(project: str, subject: str, label: str) -> str:
    parts = ("projects", project, "subjects", subject, "experiments", label)
    return "/data/" + "/".join(quote(p, safe="") for p in parts)


def session_exists(session: Any, project: str, subject: str, label: str) -> bool:
    """Whether the project has a session ``label`` for ``subject``."""
    response = session.get(_session_uri(project, subject, label), params={"format": "json"})
    if response.status_code == 404:
        return False
    if response.status_code != 200:
        raise UnexpectedAnswer(response)
    return True


def session_instances(session: Any, project: str, subject: str, label: str) -> set[str]:
    """The SOP Instance UIDs of every scan file of the session (downloaded to a temp file)."""
    uri = _session_uri(project, subject, label) + "/scans/ALL/files"
    with tempfile.TemporaryDirectory(prefix="dicom-dispatch-xnat-") as tmp:
        archive = Path(tmp) / "session.zip"
        response = session.get(uri, params={"format": "zip"}, stream=True)
        if response.status_code == 404:
            return set()  # a session without scan files
        if response.status_code != 200:
            raise UnexpectedAnswer(response)
        with archive.open("wb") as out:
            for chunk in response.iter_content(_CHUNK):
                out.write(chunk)
        return _zip_instances(archive)


def _zip_instances(archive: Path) -> set[str]:
    found: set[str] = set()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            if member.is_dir():
                continue
            with zf.open(member) as fh:
                uid = _sop_uid(fh)
            if uid:
                found.add(uid)
    return found


def _sop_uid(source: Any) -> str:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(source, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return ""  # a non-DICOM file of a scan (a snapshot, ...)
    return str(ds.get("SOPInstanceUID", "") or "")


def case_instances(files: Iterable[Path], case: CaseFiles) -> set[str]:
    """The SOP Instance UIDs of the case's files (opened without following a link)."""
    found: set[str] = set()
    for path in files:
        with case.open(path) as fh:
            uid = _sop_uid(fh)
        if uid:
            found.add(uid)
    return found


def compare_instances(ours: set[str], theirs: set[str]) -> str | None:
    """None when the session holds exactly the case's instances, else what differs."""
    if ours == theirs:
        return None
    common = len(ours & theirs)
    return f"it holds {len(theirs)} instance(s), this case {len(ours)}, {common} in common"


class UnexpectedAnswer(Exception):
    """An answer other than 200/404 while looking at an existing session."""

    def __init__(self, response: Any) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response
