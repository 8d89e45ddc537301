"""DICOM query/retrieve on pynetdicom: C-FIND, C-GET, and C-MOVE with our own Storage SCP.

mercure retrieves with C-GET only, sends series filters as extra keys of a STUDY-level C-GET
(undefined behaviour at most PACS) and cannot use C-MOVE, which many PACS require. This module is
the Prefect-free half of ``DicomTarget.find``/``DicomTarget.retrieve``:

* **Find** is hierarchical, so strict PACS answer it: a STUDY-level C-FIND (study root) by
  accession number with the study-level filters, then, when series are wanted or series-level
  filters are given, one SERIES-level C-FIND per study by ``StudyInstanceUID``. All on one
  association. Rows are plain dicts keyed by DICOM keywords (JSON-serialisable).
* **Filters** are ``{keyword: [value, ...]}``. A keyword that is not in the DICOM dictionary is
  refused with :class:`QueryError`. One value is sent as is (wildcards and ranges are the peer's
  matching). Several values are sent joined by ``\\`` *and* checked here on every row (exact,
  ``*``/``?`` wildcards, ``A-B`` date/time ranges), because list matching of non-UID attributes
  is not something every peer does.
* **Retrieve** fetches exactly what find found: one STUDY-level request per study when no
  series-level filter narrows it, else one SERIES-level request per matching series. C-GET
  receives on the same association (SCP role negotiated for every storage SOP class); C-MOVE
  starts a Storage SCP with our AE title on the configured address/port for the duration of the
  call (a second retrieve needing the same port waits for it).
* **Received files** are checked before they count: the bytes must parse as DICOM, the SOP
  Instance UID in the data set must be the one of the C-STORE request and a valid UID, and the
  instance must belong to a requested study. They are written as ``<SOPInstanceUID>.dcm``
  through a temporary file in the same folder and a rename (atomic), exactly as the peer sent
  them (no decoding, no re-encoding).
* ``TCP_NODELAY`` on every socket; every wait has a timeout. Errors are the project's tree:
  ``TransientTargetError`` for refused connections, timeouts, aborts, no response and DIMSE
  "out of resources" (0xA7xx); ``PermanentTargetError`` for rejections and failure statuses.
* Optional DCMTK backend (``getscu``/``movescu``, absolute paths: pynetdicom installs
  same-named tools into the venv) for sites where the pure-Python receiver is too slow; its
  files go through the same checks and naming.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.presentation import PresentationContext, build_context, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import code_to_category
from pynetdicom.transport import ThreadedAssociationServer

from blocks import _dimse  # noqa: F401 - applies the pynetdicom reactor fix and identifier privacy
from blocks._dimse import _set_nodelay, association_answer
from blocks.errors import (
    AccessionNotFound,
    ConfigError,
    PermanentTargetError,
    QueryError,
    TargetError,
    TransientTargetError,
    first_line,
)

if TYPE_CHECKING:
    from blocks.base import DispatchTarget
    from blocks.dicom import DicomTarget

__all__ = [
    "AccessionNotFound",
    "RETURN_KEYS",
    "SERIES_KEYWORDS",
    "Filters",
    "Level",
    "MoveSCP",
    "Progress",
    "QRPeer",
    "QueryError",
    "Receiver",
    "RetrieveItem",
    "RetrieveResult",
    "check_accession",
    "check_pull",
    "check_result",
    "dcmtk_tool",
    "filter_rows",
    "find",
    "find_on_target",
    "normalize_filters",
    "not_found",
    "plan_retrieve",
    "retrieve",
    "retrieve_from_target",
    "row_from_dataset",
    "split_filters",
    "value_matches",
]

LOGGER = logging.getLogger(__name__)

Level = Literal["study", "series"]
Filters = dict[str, list[str]]
#: ``progress(received, expected)``; ``expected`` is ``None`` when the peer did not say.
Progress = Callable[[int, int | None], None]

STUDY_KEYS = (
    "AccessionNumber",
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "NumberOfSeriesRelatedInstances",
)
#: The keys every row has, per level (filter keywords are added to them).
RETURN_KEYS: dict[str, tuple[str, ...]] = {"study": STUDY_KEYS, "series": STUDY_KEYS + SERIES_KEYS}
_COUNT_KEYS = frozenset(
    {
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "NumberOfSeriesRelatedInstances",
    }
)
#: Attributes of the series level of the DICOM information model (anything else is matched at
#: study level: study root C-FIND carries patient and study attributes there).
SERIES_KEYWORDS = frozenset(
    {
        "Modality",
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "ProtocolName",
        "Laterality",
        "PerformedProcedureStepID",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "PerformedProcedureStepDescription",
        "OperatorsName",
        "PerformingPhysicianName",
        "Manufacturer",
        "ManufacturerModelName",
        "StationName",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "FrameOfReferenceUID",
        "ContrastBolusAgent",
        "NumberOfSeriesRelatedInstances",
    }
)
#: Instance-level attributes: neither level of our queries can match them.
_INSTANCE_KEYWORDS = frozenset(
    {
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "ImageType",
        "AcquisitionNumber",
        "AcquisitionDate",
        "AcquisitionTime",
        "ContentDate",
        "ContentTime",
        "SliceLocation",
    }
)
_RESERVED_KEYWORDS = frozenset({"QueryRetrieveLevel", "AccessionNumber"})
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PREAMBLE = b"\x00" * 128 + b"DICM"
_CHECKED_TAGS: list[str] = ["SOPInstanceUID", "StudyInstanceUID"]
_WRITE_CHUNK = 64 * 1024
_RANGE_VRS = frozenset({"DA", "TM", "DT"})

#: Transfer syntaxes we accept for received objects: uncompressed first (a peer that picks the
#: first it supports sends uncompressed data uncompressed), then the common compressed ones so
#: compressed objects arrive as stored instead of being decompressed by the peer.
RECEIVE_SYNTAXES: list[str | UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]
#: Storage SOP classes proposed with SCP role for C-GET (pynetdicom's 120 + the GET model fit
#: in DICOM's 128 presentation contexts).
STORAGE_CLASSES = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]

# Status codes (PS3.4 C.4.2.1.5 / C.4.3.1.4, PS3.7 C).
_PENDING = frozenset({0xFF00, 0xFF01})
_STORE_CANNOT_UNDERSTAND = 0xC000
_STORE_OUT_OF_RESOURCES = 0xA700
_MOVE_DESTINATION_UNKNOWN = 0xA801
#: Seconds to wait for C-MOVE sub-associations to end after the final C-MOVE response.
MOVE_DRAIN_SECONDS = 10.0
#: Seconds a retrieve waits for the C-MOVE port while another retrieve holds it.
MOVE_PORT_WAIT_SECONDS = 600.0


# --------------------------------------------------------------------------------------------
# Filters and rows (shared with the DICOMweb half)
# --------------------------------------------------------------------------------------------


def normalize_filters(filters: Mapping[str, Any] | None) -> Filters:
    """``{keyword: value or [values]}`` → ``{keyword: [values]}``; :class:`QueryError` if bad.

    Keywords must be DICOM dictionary keywords (``SeriesDescription``, not ``0008103E``) of a
    non-sequence attribute at study or series level; values are strings (numbers are
    converted); empty lists are refused.
    """
    out: Filters = {}
    for key, raw in (filters or {}).items():
        keyword = str(key).strip()
        if keyword in _RESERVED_KEYWORDS:
            raise QueryError(
                f"filter {keyword} is not allowed (the accession number is given apart)"
            )
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise QueryError(f"unknown DICOM keyword {keyword!r} in filters")
        if dictionary_VR(tag) == "SQ":
            raise QueryError(f"filter {keyword} is a sequence; only single attributes can filter")
        if keyword in _INSTANCE_KEYWORDS:
            raise QueryError(f"filter {keyword} is an instance-level attribute; not supported")
        values = [raw] if isinstance(raw, str | int | float) else list(raw or [])
        texts = [str(v).strip() for v in values]
        if not texts or any(not t for t in texts):
            raise QueryError(f"filter {keyword} needs a non-empty value")
        if any("\\" in t for t in texts):
            raise QueryError(f"filter {keyword}: give several values separately, not joined by \\")
        out[keyword] = texts
    return out


def check_accession(accession: str) -> str:
    """The accession number, stripped; wildcards and value separators are refused.

    A ``*`` would make a C-FIND or QIDO query match every study of the PACS, and a retrieve
    fetch all of them.
    """
    text = str(accession).strip()
    if not text:
        raise QueryError("an accession number is required")
    if any(c in text for c in "*?\\"):
        raise QueryError(f"accession number {text!r} contains a wildcard or a '\\'")
    return text


def split_filters(filters: Filters) -> tuple[Filters, Filters]:
    """(study-level, series-level) filters."""
    study = {k: v for k, v in filters.items() if k not in SERIES_KEYWORDS}
    series = {k: v for k, v in filters.items() if k in SERIES_KEYWORDS}
    return study, series


def value_matches(actual: Any, wanted: str, keyword: str) -> bool:
    """Whether an attribute value matches one filter value (client-side check).

    Exact match after trimming; ``*``/``?`` wildcards; ``A-B``, ``A-`` and ``-B`` ranges for
    dates and times; person names case-insensitively. A multi-valued attribute
    (``ModalitiesInStudy``) matches when one of its values does.
    """
    if actual is None:
        return False
    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag) if tag is not None else ""
    items = actual if isinstance(actual, list | tuple | MultiValue) else str(actual).split("\\")
    for item in items:
        text = str(item).strip()
        want = wanted
        if vr == "PN":
            text, want = text.upper(), want.upper()
        if "*" in want or "?" in want:
            if fnmatch.fnmatchcase(text, want):
                return True
        elif vr in _RANGE_VRS and "-" in want:
            low, _, high = want.partition("-")
            if text and (not low or text >= low) and (not high or text[: len(high)] <= high):
                return True
        elif text == want:
            return True
    return False


def filter_rows(rows: Iterable[dict[str, Any]], filters: Filters) -> list[dict[str, Any]]:
    """Rows whose value matches one of the values of every *multi-valued* filter.

    Single-valued filters were matched by the peer (with its wildcard and range rules) and are
    not checked again.
    """
    multi = {k: v for k, v in filters.items() if len(v) > 1}
    return [
        row
        for row in rows
        if all(any(value_matches(row.get(k), w, k) for w in wanted) for k, wanted in multi.items())
    ]


def row_from_dataset(ds: Dataset, keys: Iterable[str]) -> dict[str, Any]:
    """A JSON-serialisable row: counts as ``int`` (``None`` if absent), multi-values joined by
    ``\\``, everything else as text (``""`` if absent)."""
    row: dict[str, Any] = {}
    for key in keys:
        value = ds.get(key)
        if key in _COUNT_KEYS:
            try:
                row[key] = int(value) if value not in (None, "") else None
            except (TypeError, ValueError):
                row[key] = None
        elif value is None:
            row[key] = ""
        elif isinstance(value, list | tuple | MultiValue):
            row[key] = "\\".join(str(v) for v in value)
        else:
            row[key] = str(value)
    return row


def _identifier(
    level: str, keys: Iterable[str], matching: Mapping[str, str | list[str]]
) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in keys:
        setattr(ds, key, "")
    for key, value in matching.items():
        setattr(ds, key, "\\".join(value) if isinstance(value, list) else value)
    return ds


# --------------------------------------------------------------------------------------------
# Associations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QRPeer:
    """The node to query and its timeouts (seconds)."""

    host: str
    port: int
    called_aet: str
    calling_aet: str
    connect_timeout: float = 10
    acse_timeout: float = 30
    dimse_timeout: float = 60
    network_timeout: float = 60

    def describe(self) -> str:
        return f"{self.host}:{self.port} ({self.calling_aet} -> {self.called_aet})"


def _make_ae(peer: QRPeer, ae_title: str | None = None) -> AE:
    ae = AE(ae_title=ae_title or peer.calling_aet)
    ae.connection_timeout = peer.connect_timeout
    ae.acse_timeout = peer.acse_timeout
    ae.dimse_timeout = peer.dimse_timeout
    ae.network_timeout = peer.network_timeout
    ae.maximum_pdu_size = 0  # receive PDUs as large as the peer likes
    return ae


def _open(
    peer: QRPeer,
    contexts: list[PresentationContext],
    *,
    roles: list[Any] | None = None,
    handlers: list[Any] | None = None,
) -> Any:
    """An established association, or the matching ``TargetError``."""
    ae = _make_ae(peer)
    connected = threading.Event()

    def on_open(event: evt.Event) -> None:
        connected.set()

    started = time.monotonic()
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            contexts=contexts,
            ae_title=peer.called_aet,
            ext_neg=roles or None,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, _set_nodelay),
                (evt.EVT_CONN_OPEN, on_open),
                *(handlers or []),
            ],
        )
    except OSError as exc:
        raise TransientTargetError(f"cannot reach {peer.describe()}: {exc}") from exc
    if assoc.is_established:
        return assoc
    answer = association_answer(assoc, peer.describe())
    if getattr(answer, "result", None) == 0x00:
        raise PermanentTargetError(
            f"{peer.describe()} accepted none of the proposed presentation contexts "
            f"({UID(str(contexts[0].abstract_syntax)).name})"
        )
    elapsed = time.monotonic() - started
    if not connected.is_set():
        why = (
            f"no TCP connection within {peer.connect_timeout:g} s"
            if elapsed >= peer.connect_timeout - 0.05
            else "TCP connection refused"
        )
    elif answer is None and elapsed >= peer.acse_timeout - 0.05:
        why = f"no answer to the association request within {peer.acse_timeout:g} s"
    else:
        why = "association aborted during negotiation"
    raise TransientTargetError(f"cannot associate with {peer.describe()}: {why}")


@contextlib.contextmanager
def _association(
    peer: QRPeer,
    contexts: list[PresentationContext],
    *,
    roles: list[Any] | None = None,
    handlers: list[Any] | None = None,
) -> Iterator[Any]:
    assoc = _open(peer, contexts, roles=roles, handlers=handlers)
    try:
        yield assoc
    except BaseException:
        if assoc.is_established:
            assoc.abort()
        raise
    else:
        if assoc.is_established:
            assoc.release()


def _status_error(peer: QRPeer, service: str, code: int | None, detail: str = "") -> TargetError:
    """The error for a final DIMSE status that is not success."""
    where = f"{service} at {peer.describe()}"
    if code is None:
        return TransientTargetError(
            f"no {service} response from {peer.describe()} (timeout, abort or lost response)"
        )
    text = f"{where} answered 0x{code:04X} ({code_to_category(code)})"
    if detail:
        text += f": {detail}"
    if code == _MOVE_DESTINATION_UNKNOWN:
        return PermanentTargetError(f"{text}: the peer does not know our move destination AE title")
    if 0xA700 <= code <= 0xA7FF:
        return TransientTargetError(f"{text}: the peer is out of resources")
    return PermanentTargetError(text)


def _status(response: Dataset | None) -> int | None:
    value = response.get("Status") if response is not None else None
    return int(value) if value is not None else None


# --------------------------------------------------------------------------------------------
# C-FIND
# --------------------------------------------------------------------------------------------


def _c_find(peer: QRPeer, assoc: Any, identifier: Dataset) -> list[Dataset]:
    found: list[Dataset] = []
    for response, matched in assoc.send_c_find(
        identifier, StudyRootQueryRetrieveInformationModelFind
    ):
        code = _status(response)
        if code in _PENDING:
            if matched is not None:
                found.append(matched)
            continue
        if code == 0x0000:
            return found
        comment = str(response.get("ErrorComment", "")) if response is not None else ""
        raise _status_error(peer, "C-FIND", code, comment)
    raise _status_error(peer, "C-FIND", None)


def find(
    peer: QRPeer, accession: str, filters: Mapping[str, Any] | None = None, level: Level = "series"
) -> list[dict[str, Any]]:
    """Studies or series of ``accession`` that match ``filters`` (see module docstring).

    Returns rows keyed by DICOM keywords: ``RETURN_KEYS[level]`` plus the filter keywords; an
    unknown accession number gives ``[]``. Study rows are the studies that have at least one
    matching series when series-level filters are given.
    """
    accession = check_accession(accession)
    wanted = normalize_filters(filters)
    study_filters, series_filters = split_filters(wanted)
    if level not in ("study", "series"):
        raise QueryError(f"level must be 'study' or 'series', not {level!r}")
    study_keys = list(dict.fromkeys([*STUDY_KEYS, *study_filters]))
    series_keys = list(dict.fromkeys([*SERIES_KEYS, *series_filters]))
    with _association(peer, [build_context(StudyRootQueryRetrieveInformationModelFind)]) as assoc:
        studies = [
            row_from_dataset(ds, study_keys)
            for ds in _c_find(
                peer,
                assoc,
                _identifier("STUDY", study_keys, {"AccessionNumber": accession, **study_filters}),
            )
        ]
        studies = [
            s
            for s in filter_rows(studies, study_filters)
            if s["StudyInstanceUID"] and s["AccessionNumber"] in ("", accession)
        ]
        if level == "study" and not series_filters:
            return studies
        rows: list[dict[str, Any]] = []
        for study in studies:
            matching = {"StudyInstanceUID": study["StudyInstanceUID"], **series_filters}
            found = _c_find(peer, assoc, _identifier("SERIES", series_keys, matching))
            series = filter_rows(
                (row_from_dataset(ds, series_keys) for ds in found), series_filters
            )
            if level == "study":
                if series:
                    rows.append(study)
            else:
                series.sort(key=_series_order)
                rows.extend({**study, **s} for s in series if s["SeriesInstanceUID"])
    return rows


def _series_order(row: dict[str, Any]) -> tuple[int, str]:
    number = str(row.get("SeriesNumber") or "").strip()
    return (int(number) if number.lstrip("-").isdigit() else 1 << 30, str(row["SeriesInstanceUID"]))


# --------------------------------------------------------------------------------------------
# What to retrieve
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrieveItem:
    """One C-GET/C-MOVE request: a whole study, or one series of it."""

    study_uid: str
    series_uid: str | None = None
    expected: int | None = None

    def identifier(self) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES" if self.series_uid else "STUDY"
        ds.StudyInstanceUID = self.study_uid
        if self.series_uid:
            ds.SeriesInstanceUID = self.series_uid
        return ds


def plan_retrieve(series_rows: Sequence[dict[str, Any]], filters: Filters) -> list[RetrieveItem]:
    """Requests for the series rows that ``find(level="series")`` returned.

    Whole studies when no series-level filter narrowed them (fewer round trips, and nothing of
    the study is left out), else one request per series. ``expected`` is the instance count the
    peer reported, when it reported one for every series.
    """
    _, series_filters = split_filters(filters)
    by_study: dict[str, list[dict[str, Any]]] = {}
    for row in series_rows:
        by_study.setdefault(str(row["StudyInstanceUID"]), []).append(row)
    items: list[RetrieveItem] = []
    for study_uid, rows in by_study.items():
        counts = [r.get("NumberOfSeriesRelatedInstances") for r in rows]
        if not series_filters:
            study_count = rows[0].get("NumberOfStudyRelatedInstances")
            known = study_count if isinstance(study_count, int) else _sum(counts)
            items.append(RetrieveItem(study_uid, None, known))
        else:
            items.extend(
                RetrieveItem(study_uid, str(r["SeriesInstanceUID"]), _sum([c]))
                for r, c in zip(rows, counts, strict=True)
            )
    return items


def _sum(counts: Sequence[Any]) -> int | None:
    if counts and all(isinstance(c, int) for c in counts):
        return int(sum(counts))
    return None


# --------------------------------------------------------------------------------------------
# Receiving objects
# --------------------------------------------------------------------------------------------


@dataclass
class RetrieveResult:
    """What a retrieve received (``instances``: SOP Instance UID → file) and what the peer said."""

    folder: Path
    method: str
    backend: str
    instances: dict[str, Path] = field(default_factory=dict)
    bytes: int = 0
    expected: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    rejected: list[str] = field(default_factory=list)
    elapsed: float = 0.0


class Receiver:
    """Checks and writes received objects; thread-safe (C-MOVE sub-associations are threads)."""

    def __init__(
        self,
        folder: Path,
        studies: set[str],
        expected: int | None,
        progress: Progress | None,
    ) -> None:
        self.folder = folder
        self.studies = studies
        self.expected = expected
        self.progress = progress
        self.instances: dict[str, Path] = {}
        self.bytes = 0
        self.rejected: list[str] = []
        self._lock = threading.Lock()

    def accept(
        self, data: bytes | Sequence[bytes | memoryview], sop_uid: str | None = None
    ) -> tuple[bool, str]:
        """Write ``data`` (a DICOM file's bytes, or its pieces) and :meth:`adopt` it."""
        tmp = self.folder / f".{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "wb", buffering=0) as fh:
                for piece in [data] if isinstance(data, bytes) else data:
                    view = memoryview(piece)
                    # 64 KiB writes: measured 3-5x faster here than one 0.5 MB write.
                    for start in range(0, len(view), _WRITE_CHUNK):
                        fh.write(view[start : start + _WRITE_CHUNK])
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            return self._reject(f"{sop_uid or '?'}: cannot write {self.folder}: {exc.strerror}")
        return self.adopt(tmp, sop_uid)

    def adopt(self, path: Path, sop_uid: str | None = None) -> tuple[bool, str]:
        """Check a received file and rename it to ``<folder>/<SOPInstanceUID>.dcm``.

        The file must be in a folder on the same file system (the rename is atomic). Its header
        must parse as DICOM (pixel data is not decoded), hold ``sop_uid`` (when given) as a
        valid SOP Instance UID, and belong to a requested study; otherwise it is deleted and
        the reason recorded.
        """
        try:
            # Walks every element header up to the pixel data (a broken file fails here);
            # converts only the two UIDs that are checked.
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_CHECKED_TAGS)
            found = str(ds.SOPInstanceUID)
            study = str(ds.StudyInstanceUID)
            size = path.stat().st_size
        except Exception as exc:  # anything unparsable: this object's outcome
            path.unlink(missing_ok=True)
            return self._reject(f"{sop_uid or '?'}: not valid DICOM ({first_line(exc)})")
        reason = ""
        if sop_uid is not None and found != sop_uid:
            reason = f"{sop_uid}: the data set holds SOP Instance UID {found}"
        elif not _UID.match(found) or len(found) > 64:
            reason = f"{found[:80]!r}: not a valid SOP Instance UID"
        elif self.studies and study not in self.studies:
            reason = f"{found}: belongs to study {study}, which was not requested"
        if reason:
            path.unlink(missing_ok=True)
            return self._reject(reason)
        final = self.folder / f"{found}.dcm"
        try:
            os.replace(path, final)
        except OSError as exc:
            path.unlink(missing_ok=True)
            return self._reject(f"{found}: cannot write {final}: {exc.strerror}")
        with self._lock:
            if found not in self.instances:
                self.bytes += size
            self.instances[found] = final
            count = len(self.instances)
        if self.progress is not None:
            self.progress(count, self.expected)
        return True, ""

    def _reject(self, reason: str) -> tuple[bool, str]:
        with self._lock:
            self.rejected.append(reason)
        LOGGER.warning("received object refused: %s", reason)
        return False, reason

    def on_c_store(self, event: evt.Event) -> int:
        """EVT_C_STORE handler: 0x0000 when written, a failure status otherwise.

        The data set is written as received (file meta + the bytes the peer sent), without
        decoding or re-encoding it.
        """
        try:
            request: Any = event.request
            sop_uid = str(request.AffectedSOPInstanceUID)
            meta = encode_file_meta(event.file_meta)
            stream = request.DataSet.getbuffer()
        except Exception as exc:
            self._reject(f"undecodable C-STORE request ({first_line(exc)})")
            return _STORE_CANNOT_UNDERSTAND
        try:
            ok, reason = self.accept([_PREAMBLE, meta, stream], sop_uid)
        finally:
            stream.release()
        if ok:
            return 0x0000
        return _STORE_OUT_OF_RESOURCES if "cannot write" in reason else _STORE_CANNOT_UNDERSTAND


# --------------------------------------------------------------------------------------------
# C-GET and C-MOVE
# --------------------------------------------------------------------------------------------


@dataclass
class _Counters:
    completed: int = 0
    failed: int = 0
    warning: int = 0

    def update(self, response: Dataset) -> None:
        for name, key in (
            ("completed", "NumberOfCompletedSuboperations"),
            ("failed", "NumberOfFailedSuboperations"),
            ("warning", "NumberOfWarningSuboperations"),
        ):
            value = response.get(key)
            if value is not None:
                setattr(self, name, int(value))


def _run_retrieve(
    peer: QRPeer,
    responses: Iterator[tuple[Dataset, Dataset | None]],
    service: str,
    counters: _Counters,
) -> None:
    """Consume the responses of one C-GET/C-MOVE; raise unless the final status is success."""
    for response, _ in responses:
        code = _status(response)
        if code is None:
            raise _status_error(peer, service, None)
        counters.update(response)
        if code in _PENDING:
            continue
        if code == 0x0000:
            return
        if code == 0xB000:  # warning: some sub-operations failed; checked by the caller
            return
        comment = str(response.get("ErrorComment", "")) if response is not None else ""
        raise _status_error(peer, service, code, comment)
    raise _status_error(peer, service, None)


def _get_contexts() -> tuple[list[PresentationContext], list[Any]]:
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
    contexts += [build_context(uid, RECEIVE_SYNTAXES) for uid in STORAGE_CLASSES]
    roles = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]
    return contexts, roles


def _c_get(peer: QRPeer, items: Sequence[RetrieveItem], receiver: Receiver) -> _Counters:
    total = _Counters()
    contexts, roles = _get_contexts()
    handlers = [(evt.EVT_C_STORE, receiver.on_c_store)]
    with _association(peer, contexts, roles=roles, handlers=handlers) as assoc:
        for item in items:
            counters = _Counters()
            responses = assoc.send_c_get(
                item.identifier(), StudyRootQueryRetrieveInformationModelGet
            )
            _run_retrieve(peer, responses, "C-GET", counters)
            total.completed += counters.completed
            total.failed += counters.failed
            total.warning += counters.warning
    return total


class MoveSCP:
    """Our Storage SCP for C-MOVE: ``aet`` on ``host:port`` while the ``with`` block runs.

    Only associations addressed to ``aet`` are accepted. If the port is taken (another
    retrieve of this host uses it), waits up to ``port_wait`` seconds for it.
    """

    def __init__(
        self,
        aet: str,
        host: str,
        port: int,
        receiver: Receiver,
        *,
        timeouts: QRPeer,
        port_wait: float = MOVE_PORT_WAIT_SECONDS,
    ) -> None:
        self.aet = aet
        self.host = host
        self.port = port
        self.receiver = receiver
        self.timeouts = timeouts
        self.port_wait = port_wait
        self._server: Any = None

    def __enter__(self) -> MoveSCP:
        ae = _make_ae(self.timeouts, self.aet)
        ae.require_called_aet = True
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, RECEIVE_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, _set_nodelay),
            (evt.EVT_C_STORE, self.receiver.on_c_store),
        ]
        deadline = time.monotonic() + self.port_wait
        logged = False
        while True:
            try:
                server = ae.make_server(
                    (self.host, self.port),
                    evt_handlers=handlers,
                    server_class=ThreadedAssociationServer,
                )
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise TransientTargetError(
                        f"cannot listen for C-MOVE on {self.host}:{self.port}: {exc.strerror}"
                    ) from exc
                if not logged:
                    LOGGER.info("port %d is busy (another C-MOVE?); waiting for it", self.port)
                    logged = True
                time.sleep(0.5)
                continue
            # Our own serving thread: pynetdicom's polls for shutdown every 0.5 s.
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.02},
                name=f"move-scp-{self.port}",
                daemon=True,
            )
            thread.start()
            ae._servers.append(server)  # as start_server does (shutdown() removes it)
            self._server = server
            return self

    def drain(self, wanted: int, timeout: float = MOVE_DRAIN_SECONDS) -> None:
        """Wait until ``wanted`` objects arrived and no sub-association is left (or timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = self._server is not None and self._server.active_associations
            if len(self.receiver.instances) + len(self.receiver.rejected) >= wanted and not busy:
                return
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def _c_move(
    peer: QRPeer,
    items: Sequence[RetrieveItem],
    receiver: Receiver,
    move_aet: str,
    listen: tuple[str, int],
) -> _Counters:
    total = _Counters()
    with MoveSCP(move_aet, listen[0], listen[1], receiver, timeouts=peer) as scp:
        contexts = [build_context(StudyRootQueryRetrieveInformationModelMove)]
        with _association(peer, contexts) as assoc:
            for item in items:
                counters = _Counters()
                responses = assoc.send_c_move(
                    item.identifier(), move_aet, StudyRootQueryRetrieveInformationModelMove
                )
                _run_retrieve(peer, responses, "C-MOVE", counters)
                total.completed += counters.completed
                total.failed += counters.failed
                total.warning += counters.warning
                scp.drain(total.completed + total.warning)
    return total


# --------------------------------------------------------------------------------------------
# DCMTK backend
# --------------------------------------------------------------------------------------------


def dcmtk_tool(name: str) -> str | None:
    """DCMTK's ``getscu``/``movescu`` by absolute path (never pynetdicom's same-named apps)."""
    import sys

    for folder in ("/usr/bin", "/usr/local/bin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin
    )
    return shutil.which(name, path=path)


_DCMTK_RESPONSE = re.compile(r"Received (?:Final )?(?:C-GET|Move) Response(?: \d+)? \(([^)]*)\)")
_DCMTK_FAILED = re.compile(r"Number of Failed Suboperations\s*:\s*(\d+)")


def _dcmtk_outcome(output: str) -> tuple[str | None, int]:
    """(last response status text, failed sub-operations) from getscu/movescu ``-v`` output."""
    statuses = _DCMTK_RESPONSE.findall(output)
    failed = _DCMTK_FAILED.findall(output)
    return (statuses[-1] if statuses else None), (int(failed[-1]) if failed else 0)


def _dcmtk_args(
    tool: str,
    peer: QRPeer,
    item: RetrieveItem,
    staging: Path,
    method: str,
    move_aet: str,
    listen: tuple[str, int],
) -> list[str]:
    args = [
        tool,
        "-S",
        "-aet",
        peer.calling_aet,
        "-aec",
        peer.called_aet,
        "-to",
        str(max(1, int(peer.connect_timeout))),
        "-ta",
        str(max(1, int(peer.acse_timeout))),
        "-td",
        str(max(1, int(peer.dimse_timeout))),
        "-pdu",
        "131072",
        "+B",  # bit-preserving: the objects as the peer sent them
        "-v",  # per-object responses, the final status and counts: parsed
        "-od",
        str(staging),
        "-k",
        f"QueryRetrieveLevel={'SERIES' if item.series_uid else 'STUDY'}",
        "-k",
        f"StudyInstanceUID={item.study_uid}",
    ]
    if item.series_uid:
        args += ["-k", f"SeriesInstanceUID={item.series_uid}"]
    if method == "move":
        args += ["-aem", move_aet, "--port", str(listen[1])]
    return [*args, peer.host, str(peer.port)]


def _run_tool(args: list[str], folder: Path, timeout: float) -> tuple[int, str]:
    """Run getscu/movescu in ``folder``; (exit code, its log).

    The files are checked only once the tool has exited: checking them while it runs was
    measured slower here (the checks and the transfer compete for the same cores).
    """
    try:
        done = subprocess.run(
            args,
            env={**os.environ, "TCP_NODELAY": "1"},
            cwd=folder,  # movescu 3.6.7 with +B writes to the working directory, not -od
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise TransientTargetError(
            f"{Path(args[0]).name} did not finish within {timeout:g} s"
        ) from exc
    return done.returncode, done.stdout + done.stderr


def _take(folder: Path, receiver: Receiver) -> None:
    with os.scandir(folder) as entries:
        files = sorted(Path(e.path) for e in entries if e.is_file(follow_symlinks=False))
    for path in files:
        receiver.adopt(path)


def _dcmtk_retrieve(
    peer: QRPeer,
    items: Sequence[RetrieveItem],
    receiver: Receiver,
    method: str,
    move_aet: str,
    listen: tuple[str, int],
    staging: Path,
) -> _Counters:
    tool_name = "getscu" if method == "get" else "movescu"
    tool = dcmtk_tool(tool_name)
    if tool is None:
        raise PermanentTargetError(
            f"DCMTK {tool_name} not found (install the Debian package 'dcmtk' or use the "
            "pynetdicom backend)"
        )
    service = "C-GET" if method == "get" else "C-MOVE"
    staging.mkdir(parents=True, exist_ok=True)
    counters = _Counters()
    finished = threading.Event()

    def count_arrivals() -> None:  # progress while the tool runs: files in its folder
        while not finished.wait(0.5):
            if receiver.progress is not None:
                with contextlib.suppress(OSError), os.scandir(staging) as entries:
                    arrived = sum(1 for _ in entries)
                    receiver.progress(len(receiver.instances) + arrived, receiver.expected)

    watcher = threading.Thread(target=count_arrivals, name="dcmtk-progress", daemon=True)
    watcher.start()
    try:
        for item in items:
            args = _dcmtk_args(tool, peer, item, staging, method, move_aet, listen)
            timeout = peer.connect_timeout + peer.acse_timeout + 3600
            if receiver.progress is not None:
                receiver.progress(len(receiver.instances), receiver.expected)
            code, output = _run_tool(args, staging, timeout)
            _take(staging, receiver)
            if code != 0:
                errors = [line for line in output.splitlines() if line.startswith(("E:", "F:"))]
                reason = (errors or output.splitlines() or [f"exit code {code}"])[-1]
                kind = (
                    TransientTargetError
                    if any(w in output for w in ("Connection refused", "Timeout", "TCP"))
                    else PermanentTargetError
                )
                raise kind(f"{tool_name} {peer.describe()}: {reason}")
            final, failed = _dcmtk_outcome(output)
            if final is not None and not final.startswith(("Success", "Warning")):
                raise PermanentTargetError(f"{service} at {peer.describe()} answered {final}")
            counters.failed += failed
            counters.completed = len(receiver.instances)
    finally:
        finished.set()
        watcher.join(timeout=2)
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    return counters


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def retrieve(
    peer: QRPeer,
    items: Sequence[RetrieveItem],
    folder: Path,
    *,
    method: Literal["get", "move"] = "get",
    move_aet: str = "",
    listen: tuple[str, int] = ("127.0.0.1", 11113),
    backend: Literal["pynetdicom", "dcmtk"] = "pynetdicom",
    progress: Progress | None = None,
) -> RetrieveResult:
    """C-GET or C-MOVE ``items`` into ``folder`` (created), as ``<SOPInstanceUID>.dcm``.

    Raises a ``TargetError`` unless the peer reported success, no sub-operation failed, every
    received object passed the checks, and (when the peer's C-FIND gave counts) as many
    instances arrived as were expected. The files that did arrive stay in ``folder`` either way.
    """
    begin = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    expected = _sum([i.expected for i in items])
    receiver = Receiver(folder, {i.study_uid for i in items}, expected, progress)
    service = "C-GET" if method == "get" else "C-MOVE"
    if method == "move" and not move_aet:
        raise PermanentTargetError(
            f"{peer.describe()}: C-MOVE needs move_destination_aet (our Storage SCP's AE title)"
        )
    if progress is not None:
        progress(0, expected)
    if backend == "dcmtk":
        staging = folder.parent / f".{folder.name}.dcmtk-{os.getpid()}"
        counters = _dcmtk_retrieve(peer, items, receiver, method, move_aet, listen, staging)
    elif method == "get":
        counters = _c_get(peer, items, receiver)
    else:
        counters = _c_move(peer, items, receiver, move_aet, listen)
    result = RetrieveResult(
        folder=folder,
        method=service,
        backend=backend,
        instances=dict(receiver.instances),
        bytes=receiver.bytes,
        expected=expected,
        completed=counters.completed,
        failed=counters.failed,
        warning=counters.warning,
        rejected=list(receiver.rejected),
        elapsed=time.monotonic() - begin,
    )
    return check_result(result, f"{service} from {peer.describe()}")


def check_result(result: RetrieveResult, where: str) -> RetrieveResult:
    """``result`` if the retrieve is whole, else the ``TargetError`` saying what is missing.

    Whole: no received object refused, no failed sub-operation, something received, and at
    least as many instances as the peer's query counted (when it counted them).
    """
    if result.rejected:
        raise PermanentTargetError(
            f"{where}: {len(result.rejected)} received object(s) refused (first: "
            f"{result.rejected[0]})"
        )
    if result.failed:
        raise PermanentTargetError(
            f"{where}: the peer reported {result.failed} failed sub-operation(s) "
            f"({len(result.instances)} received)"
        )
    if not result.instances:
        raise PermanentTargetError(f"{where}: nothing was received")
    if result.expected is not None and len(result.instances) < result.expected:
        raise TransientTargetError(
            f"{where}: received {len(result.instances)} of {result.expected} expected instances"
        )
    LOGGER.info(
        "%s: %d instances, %d bytes in %.2f s (%s)",
        where,
        len(result.instances),
        result.bytes,
        result.elapsed,
        result.backend,
    )
    return result


# --------------------------------------------------------------------------------------------
# The DicomTarget verbs (DicomTarget.find / DicomTarget.retrieve delegate here)
# --------------------------------------------------------------------------------------------

#: Calling AE title for queries when the target sets none (mercure's).
DEFAULT_QR_CALLING_AET = "MERCURE"


def check_pull(target: DispatchTarget) -> None:
    """:class:`ConfigError` unless the target may be queried (``direction`` pull or both)."""
    if target.direction not in ("pull", "both"):
        raise ConfigError(
            f"target {target.target_name or '?'} is for sending only (direction "
            f"{target.direction!r}); set direction to 'pull' or 'both' to query it"
        )


def not_found(accession: str, filters: Filters) -> AccessionNotFound:
    """mercure's message, and the filters when there were some."""
    text = f"No series found with accession number {accession}"
    if filters:
        text += " matching " + ", ".join(f"{k}={'|'.join(v)}" for k, v in filters.items())
    return AccessionNotFound(text)


def _qr_peer(target: DicomTarget) -> QRPeer:
    if target.target_type != "dicom":
        raise ConfigError(
            f"target {target.target_name}: query/retrieve is supported for DICOM targets only, "
            f"not {target.target_type}"
        )
    if target.ip == "sender":
        raise ConfigError(f"target {target.target_name}: cannot query the 'sender' address")
    host, port, called, _ = target.peer()
    return QRPeer(
        host,
        port,
        called,
        target.aet_source or DEFAULT_QR_CALLING_AET,
        connect_timeout=target.connect_timeout,
        acse_timeout=target.acse_timeout,
        dimse_timeout=target.dimse_timeout,
        network_timeout=target.network_timeout,
    )


def find_on_target(
    target: DicomTarget, accession: str, filters: Mapping[str, Any] | None, level: Level
) -> list[dict[str, Any]]:
    """``DicomTarget.find``: C-FIND rows for one accession number."""
    check_pull(target)
    return find(_qr_peer(target), accession, filters, level)


def retrieve_from_target(
    target: DicomTarget,
    accession: str,
    filters: Mapping[str, Any] | None,
    destination: Path,
    progress: Progress | None,
) -> RetrieveResult:
    """``DicomTarget.retrieve``: find the series, then C-GET or C-MOVE them into a folder."""
    check_pull(target)
    peer = _qr_peer(target)
    wanted = normalize_filters(filters)
    rows = find(peer, accession, wanted, "series")
    if not rows:
        raise not_found(check_accession(accession), wanted)
    listen_port = int(target.move_destination_port)
    return retrieve(
        peer,
        plan_retrieve(rows, wanted),
        destination,
        method=target.retrieve_method,
        move_aet=target.move_destination_aet or peer.calling_aet,
        listen=(target.move_listen_address, listen_port),
        backend=target.retrieve_backend,
        progress=progress,
    )
