"""STOW-RS (DICOM PS3.18 §10.5) streamed from files: the sending half of a DICOMweb target.

mercure read every ``*.dcm`` of a case into memory and posted them as one request with
dicomweb-client's ``store_instances``, which re-encodes each dataset and joins all of them into
one ``bytes`` body: a 2 GB case needed several GB of memory. This module builds the same
``multipart/related; type="application/dicom"`` body itself, file by file:

* Every file is opened without following a link (``tasks.safefiles.CaseFiles``), when its header
  is read and again when it is sent: a link planted in the case meanwhile is refused, never read.
* Instances are identified from their headers only (``SOPClassUID``, ``SOPInstanceUID``; pixel
  data is never read for that), and grouped into bounded batches (count and bytes), one POST each.
* Each body is a generator over the files, read in ``CHUNK_SIZE`` pieces with the multipart
  framing coalesced into the same writes, so memory stays at about one chunk whatever the case
  size; the file bytes are sent as they are on disk (byte-identical, never re-encoded).
* ``Content-Length`` is computed up front, so no chunked transfer encoding is needed (some
  servers, older Orthanc among them, do not accept it).
* A batch counts as stored only when the response's ReferencedSOPSequence names every one of its
  SOP instances; FailedSOPSequence entries become the reason.

It is Prefect-free and does no HTTP itself: the block posts :func:`iter_body` with its own client
and hands the response to :func:`parse_store_response`. The same functions serve a future async
client unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tasks.safefiles import CaseFiles

__all__ = [
    "CHUNK_SIZE",
    "FAILURE_REASONS",
    "CaseFileError",
    "Instance",
    "StoreResponse",
    "body_length",
    "content_type",
    "failure_text",
    "iter_body",
    "new_boundary",
    "parse_store_response",
    "plan_batches",
    "read_instances",
]

LOGGER = logging.getLogger(__name__)

#: Bytes read from a file (and written to the socket) at a time.
CHUNK_SIZE = 1024 * 1024

# DICOM JSON tags (PS3.18 Annex F) of a Store Instances Response Module (PS3.18 Table 10.5.3-1).
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"

#: FailureReason codes of PS3.18 Table 10.5.3-2 (and the C-STORE codes PS3.4 lets servers use).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
    0xC123: "transfer syntax not supported",
}


class CaseFileError(Exception):
    """A file of the case cannot be read as DICOM, or changed while it was being sent."""


@dataclass(frozen=True)
class Instance:
    """One file of the case, identified from its header."""

    path: Path
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    #: The case the file belongs to (None: the file's own folder).
    case: CaseFiles | None = field(default=None, compare=False, repr=False)

    def open(self) -> BinaryIO:
        """The file, opened without following a link."""
        case = self.case or CaseFiles(self.path.parent)
        return case.open(self.path if self.case else Path(self.path.name))


def read_instances(files: Iterable[Path], case: CaseFiles | None = None) -> list[Instance]:
    """Identify every file of ``case`` from its header (no pixel data is read)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    instances = []
    for path in files:
        unread = Instance(path, 0, "", "", case)
        try:
            fh = unread.open()
        except OSError as exc:
            raise CaseFileError(f"cannot read {path.name}: {exc.strerror or exc}") from None
        with fh:
            try:
                ds = dcmread(
                    fh, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
                )
                meta = getattr(ds, "file_meta", None)
                sop_uid = ds.get("SOPInstanceUID") or (
                    meta and meta.get("MediaStorageSOPInstanceUID")
                )
                sop_class = ds.get("SOPClassUID") or (meta and meta.get("MediaStorageSOPClassUID"))
                size = os.fstat(fh.fileno()).st_size
            except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
                raise CaseFileError(f"{path.name} is not readable as DICOM: {exc}") from None
        if not sop_uid:
            raise CaseFileError(f"{path.name} has no SOP Instance UID")
        instances.append(Instance(path, size, str(sop_class or ""), str(sop_uid), case))
    return instances


def plan_batches(
    instances: Sequence[Instance], max_files: int, max_bytes: int
) -> list[list[Instance]]:
    """Consecutive batches of at most ``max_files`` instances and ``max_bytes`` bytes.

    A single instance larger than ``max_bytes`` goes alone in its batch (it must be sent whole).
    """
    batches: list[list[Instance]] = []
    current: list[Instance] = []
    size = 0
    for instance in instances:
        if current and (len(current) >= max_files or size + instance.size > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(instance)
        size += instance.size
    if current:
        batches.append(current)
    return batches


def new_boundary() -> str:
    return f"dicom-dispatch-{uuid.uuid4().hex}"


def content_type(boundary: str) -> str:
    """The request's ``Content-Type`` (PS3.18 §10.5.1.2: multipart/related of application/dicom)."""
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def _part_head(boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")


def _closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def body_length(batch: Sequence[Instance], boundary: str) -> int:
    """Exact length of :func:`iter_body`'s output (for ``Content-Length``)."""
    framing = len(_part_head(boundary)) + 2  # head + CRLF after the part's bytes
    return sum(i.size + framing for i in batch) + len(_closing(boundary))


def iter_body(
    batch: Sequence[Instance], boundary: str, chunk_size: int = CHUNK_SIZE
) -> Iterator[bytes]:
    """The multipart body, read from the files as it is sent, in writes of about ``chunk_size``.

    Raises :class:`CaseFileError` if a file cannot be read or its size changed since
    :func:`read_instances` (the announced ``Content-Length`` would be wrong).
    """
    pending = bytearray()
    for instance in batch:
        pending += _part_head(boundary)
        remaining = instance.size
        try:
            with instance.open() as fh:
                while remaining > 0:
                    if len(pending) >= chunk_size:
                        yield bytes(pending)
                        pending.clear()
                    data = fh.read(min(chunk_size - len(pending), remaining))
                    if not data:
                        break
                    pending += data
                    remaining -= len(data)
                extra = fh.read(1)
        except OSError as exc:
            raise CaseFileError(
                f"cannot read {instance.path.name}: {exc.strerror or exc}"
            ) from None
        if remaining or extra:
            raise CaseFileError(f"{instance.path.name} changed size while it was being sent")
        pending += b"\r\n"
    pending += _closing(boundary)
    yield bytes(pending)


@dataclass
class StoreResponse:
    """What a STOW-RS response says about the instances of one request."""

    referenced: set[str] = field(default_factory=set)
    failed: dict[str, int | None] = field(default_factory=dict)  # SOP Instance UID -> reason
    warnings: dict[str, int | None] = field(default_factory=dict)
    #: False when the response carried no Store Instances Response at all (no body, other type).
    has_body: bool = True

    def missing(self, batch: Sequence[Instance]) -> list[Instance]:
        """Instances of ``batch`` the response does not name as stored."""
        return [i for i in batch if i.sop_instance_uid not in self.referenced]


def failure_text(code: int | None) -> str:
    if code is None:
        return "no reason given"
    name = FAILURE_REASONS.get(code) or FAILURE_REASONS.get(code & 0xFF00, "failure")
    return f"0x{code:04X} {name}"


def parse_store_response(content_type_header: str, body: bytes) -> StoreResponse:
    """Parse a Store Instances Response (DICOM JSON or DICOM XML, PS3.18 §10.5.3)."""
    media = content_type_header.split(";", 1)[0].strip().lower()
    if not body.strip():
        return StoreResponse(has_body=False)
    try:
        if media.endswith("json"):
            return _parse_json(json.loads(body))
        if media.endswith("xml"):
            return _parse_xml(ET.fromstring(body))  # noqa: S314 (trusted configured peer)
    except (ValueError, ET.ParseError, TypeError, AttributeError) as exc:
        LOGGER.warning("unreadable STOW-RS response (%s): %s", media, exc)
    return StoreResponse(has_body=False)


def _json_values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def _json_code(item: dict[str, Any], tag: str) -> int | None:
    values = _json_values(item, tag)
    return int(values[0]) if values and values[0] is not None else None


def _parse_json(data: Any) -> StoreResponse:
    if isinstance(data, list):  # some servers wrap the response dataset in a list
        data = data[0] if data else {}
    result = StoreResponse()
    for item in _json_values(data, _REFERENCED_SOP_SEQUENCE):
        for uid in _json_values(item, _REFERENCED_SOP_INSTANCE_UID):
            result.referenced.add(str(uid))
            if _WARNING_REASON in item:
                result.warnings[str(uid)] = _json_code(item, _WARNING_REASON)
    for item in _json_values(data, _FAILED_SOP_SEQUENCE):
        for uid in _json_values(item, _REFERENCED_SOP_INSTANCE_UID):
            result.failed[str(uid)] = _json_code(item, _FAILURE_REASON)
    return result


def _xml_items(root: ET.Element, tag: str) -> list[ET.Element]:
    return root.findall(f"./DicomAttribute[@tag='{tag}']/Item")


def _xml_value(item: ET.Element, tag: str) -> str | None:
    value = item.find(f"./DicomAttribute[@tag='{tag}']/Value")
    return value.text.strip() if value is not None and value.text else None


def _parse_xml(root: ET.Element) -> StoreResponse:
    result = StoreResponse()
    for item in _xml_items(root, _REFERENCED_SOP_SEQUENCE):
        uid = _xml_value(item, _REFERENCED_SOP_INSTANCE_UID)
        if uid:
            result.referenced.add(uid)
    for item in _xml_items(root, _FAILED_SOP_SEQUENCE):
        uid = _xml_value(item, _REFERENCED_SOP_INSTANCE_UID)
        if uid:
            code = _xml_value(item, _FAILURE_REASON)
            result.failed[uid] = int(code) if code and code.isdigit() else None
    return result
