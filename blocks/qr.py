"""The query/retrieve vocabulary shared by DICOM (C-FIND/C-GET/C-MOVE) and DICOMweb (QIDO/WADO).

Filters, the accession check, result rows and what a retrieve received: the flows and the CLI
speak these, whichever protocol the source target uses. Prefect-free.
"""

from __future__ import annotations

from blocks._dimse_qr import (
    RETURN_KEYS,
    SERIES_KEYWORDS,
    Filters,
    Level,
    Progress,
    RetrieveItem,
    RetrieveResult,
    check_accession,
    filter_rows,
    normalize_filters,
    not_found,
    plan_retrieve,
    split_filters,
)
from blocks.errors import AccessionNotFound, QueryError

__all__ = [
    "RETURN_KEYS",
    "SERIES_KEYWORDS",
    "AccessionNotFound",
    "Filters",
    "Level",
    "Progress",
    "QueryError",
    "RetrieveItem",
    "RetrieveResult",
    "check_accession",
    "filter_rows",
    "normalize_filters",
    "not_found",
    "plan_retrieve",
    "split_filters",
]
