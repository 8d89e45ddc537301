"""blocks/qr.py: query filters are checked before any peer is asked, and matched client-side
as a PACS would (exact, wildcards, date/time ranges, person names, multi-valued attributes)."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.multival import MultiValue

from blocks.errors import QueryError
from blocks.qr import normalize_filters, value_matches


def test_filters_become_lists_of_trimmed_strings() -> None:
    assert normalize_filters(None) == {}
    assert normalize_filters(
        {" SeriesDescription ": " chest ", "Modality": ["CT", "MR"], "SeriesNumber": 3}
    ) == {"SeriesDescription": ["chest"], "Modality": ["CT", "MR"], "SeriesNumber": ["3"]}


@pytest.mark.parametrize(
    ("filters", "says"),
    [
        ({"AccessionNumber": "A1"}, "not allowed"),
        ({"QueryRetrieveLevel": "STUDY"}, "not allowed"),
        ({"0008103E": "chest"}, "unknown DICOM keyword"),
        ({"NoSuchKeyword": "x"}, "unknown DICOM keyword"),
        ({"ReferencedSeriesSequence": "x"}, "sequence"),
        ({"SOPInstanceUID": "1.2.3"}, "instance-level"),
        ({"Modality": []}, "non-empty"),
        ({"Modality": ["CT", " "]}, "non-empty"),
        ({"Modality": None}, "non-empty"),
        ({"Modality": "CT\\MR"}, "separately"),
    ],
)
def test_bad_filters_are_refused_clearly(filters: dict[str, Any], says: str) -> None:
    with pytest.raises(QueryError, match=says):
        normalize_filters(filters)


@pytest.mark.parametrize(
    ("actual", "wanted", "keyword", "matches"),
    [
        ("chest", "chest", "SeriesDescription", True),
        (" chest ", "chest", "SeriesDescription", True),
        ("Chest", "chest", "SeriesDescription", False),  # exact, not case-folded
        ("chest ct", "chest*", "SeriesDescription", True),
        ("chest ct", "*ct", "SeriesDescription", True),
        ("head ct", "chest*", "SeriesDescription", False),
        ("CT1", "CT?", "StationName", True),
        ("CT12", "CT?", "StationName", False),
        (None, "chest", "SeriesDescription", False),
        ("20260115", "20260101-20260131", "StudyDate", True),
        ("20260201", "20260101-20260131", "StudyDate", False),
        ("20260101", "20260101-", "StudyDate", True),
        ("20251231", "20260101-", "StudyDate", False),
        ("20251231", "-20260101", "StudyDate", True),
        ("", "-20260101", "StudyDate", False),
        ("101500.123", "1000-1100", "StudyTime", True),  # the range's precision decides
        ("110059", "1000-1100", "StudyTime", True),  # 11:00 ends with its last second
        ("110100", "1000-1100", "StudyTime", False),
        ("A-B", "A-B", "SeriesDescription", True),  # not a range outside DA/TM/DT
        ("doe^jane", "DOE^JANE", "PatientName", True),
        ("Doe^Jane", "doe^*", "PatientName", True),
        ("CT\\PT", "PT", "ModalitiesInStudy", True),
        (["CT", "PT"], "PT", "ModalitiesInStudy", True),
        (MultiValue(str, ["CT", "SR"]), "MR", "ModalitiesInStudy", False),
    ],
)
def test_value_matches_as_a_pacs_would(
    actual: Any, wanted: str, keyword: str, matches: bool
) -> None:
    assert value_matches(actual, wanted, keyword) is matches
