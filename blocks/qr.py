"""The query/retrieve vocabulary shared by DICOM (C-FIND/C-GET/C-MOVE) and DICOMweb (QIDO/WADO).

Filters, the accession check, result rows, the two-level find both protocols run, what to
retrieve and what a retrieve received: the flows and the CLI speak these, whichever protocol the
source target uses; ``blocks._dimse_qr`` and ``blocks._dicomweb_qr`` plug their searches into
:func:`find_rows`. Prefect-free. One module of about 400 lines on purpose: it is the
whole vocabulary both protocols must agree on, read as one.

* **Find** is hierarchical, so strict PACS answer it: a study-level search by accession number
  with the study-level filters, then, when series are wanted or series-level filters are given,
  one series-level search per study by ``StudyInstanceUID``. Rows are plain dicts keyed by DICOM
  keywords (JSON-serialisable).
* **Filters** are ``{keyword: [value, ...]}``. A keyword that is not in the DICOM dictionary is
  refused with :class:`QueryError`. One value is the peer's to match (wildcards and ranges are
  its matching). Several values are checked here on every row (exact, ``*``/``?`` wildcards,
  ``A-B`` date/time ranges), because list matching of non-UID attributes is not something every
  peer does.
* **Retrieve** fetches exactly what find found: one study-level request per study when no
  series-level filter narrows it, else one series-level request per matching series.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from blocks.errors import AccessionNotFound, ConfigError, QueryError

if TYPE_CHECKING:
    from blocks.base import DispatchTarget

__all__ = [
    "DEFAULT_FREE_SPACE_RESERVE_BYTES",
    "DEFAULT_MAX_INSTANCE_BYTES",
    "RETURN_KEYS",
    "SERIES_KEYS",
    "SERIES_KEYWORDS",
    "STUDY_KEYS",
    "AccessionNotFound",
    "Filters",
    "Level",
    "Progress",
    "QueryError",
    "ReceiveLimits",
    "RetrieveItem",
    "RetrieveResult",
    "RowSource",
    "check_accession",
    "check_pull",
    "check_query",
    "expected_total",
    "filter_rows",
    "find_rows",
    "normalize_filters",
    "not_found",
    "plan_retrieve",
    "row_from_dataset",
    "split_filters",
    "value_matches",
]

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
_RANGE_VRS = frozenset({"DA", "TM", "DT"})


# --------------------------------------------------------------------------------------------
# Filters and rows
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


# --------------------------------------------------------------------------------------------
# The find both protocols run
# --------------------------------------------------------------------------------------------


class RowSource(Protocol):
    """One protocol's two searches (C-FIND, QIDO-RS), returning rows with exactly ``keys``.

    ``filters`` are the level's filters; how many of them go to the peer is the protocol's
    choice: :func:`find_rows` checks the multi-valued ones again on every row.
    """

    def studies(
        self, accession: str, filters: Filters, keys: Sequence[str]
    ) -> list[dict[str, Any]]: ...

    def series(
        self, study_uid: str, filters: Filters, keys: Sequence[str]
    ) -> list[dict[str, Any]]: ...


def check_query(
    accession: str, filters: Mapping[str, Any] | None, level: str
) -> tuple[str, Filters]:
    """(accession, filters) checked and normalised; :class:`QueryError` if one is bad."""
    accession = check_accession(accession)
    wanted = normalize_filters(filters)
    if level not in ("study", "series"):
        raise QueryError(f"level must be 'study' or 'series', not {level!r}")
    return accession, wanted


def find_rows(
    source: RowSource, accession: str, filters: Filters, level: Level
) -> list[dict[str, Any]]:
    """Studies or series of ``accession`` that match ``filters`` (input from :func:`check_query`).

    Returns rows keyed by DICOM keywords: ``RETURN_KEYS[level]`` plus the filter keywords; an
    unknown accession number gives ``[]``. Study rows are the studies that have at least one
    matching series when series-level filters are given. Series are in series-number order.
    """
    study_filters, series_filters = split_filters(filters)
    study_keys = list(dict.fromkeys([*STUDY_KEYS, *study_filters]))
    series_keys = list(dict.fromkeys([*SERIES_KEYS, *series_filters]))
    studies = [
        s
        for s in filter_rows(source.studies(accession, study_filters, study_keys), study_filters)
        if s["StudyInstanceUID"] and s["AccessionNumber"] in ("", accession)
    ]
    if level == "study" and not series_filters:
        return studies
    rows: list[dict[str, Any]] = []
    for study in studies:
        found = source.series(str(study["StudyInstanceUID"]), series_filters, series_keys)
        series = filter_rows(found, series_filters)
        if level == "study":
            if series:
                rows.append(study)
            continue
        series.sort(key=_series_order)
        rows.extend({**study, **s} for s in series if s["SeriesInstanceUID"])
    return rows


def _series_order(row: dict[str, Any]) -> tuple[int, str]:
    number = str(row.get("SeriesNumber") or "").strip()
    return (int(number) if number.lstrip("-").isdigit() else 1 << 30, str(row["SeriesInstanceUID"]))


# --------------------------------------------------------------------------------------------
# What to retrieve, and what was received
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrieveItem:
    """One retrieve request: a whole study, or one series of it."""

    study_uid: str
    series_uid: str | None = None
    expected: int | None = None


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
            known = study_count if isinstance(study_count, int) else expected_total(counts)
            items.append(RetrieveItem(study_uid, None, known))
        else:
            items.extend(
                RetrieveItem(study_uid, str(r["SeriesInstanceUID"]), expected_total([c]))
                for r, c in zip(rows, counts, strict=True)
            )
    return items


def expected_total(counts: Sequence[Any]) -> int | None:
    """The sum of instance counts, or ``None`` unless every count is known."""
    if counts and all(isinstance(c, int) for c in counts):
        return int(sum(counts))
    return None


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
    #: The reasons of the first refused objects (at most ``REJECTED_KEPT``) ...
    rejected: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    #: ... and how many were refused in all.
    rejected_count: int = 0
    #: Why receiving stopped before the peer was done (free space), else empty.
    stopped: str = ""


#: Default of ``DispatcherSettings.retrieve_max_instance_bytes``.
DEFAULT_MAX_INSTANCE_BYTES = 4 * 1024**3
#: Default of ``DispatcherSettings.retrieve_free_space_reserve_bytes``.
DEFAULT_FREE_SPACE_RESERVE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class ReceiveLimits:
    """What one retrieve may cost the destination: no object over ``max_instance_bytes``, and
    never less than ``free_space_reserve_bytes`` free on its file system (the queue, the
    database and other cases share it)."""

    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    free_space_reserve_bytes: int = DEFAULT_FREE_SPACE_RESERVE_BYTES


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
