"""How the unit tests build C-STORE outcomes: one :class:`InstanceResult` with neutral values for
all a test does not name, and a :class:`StoreResult` with the association header of the example
report in mercure-dispatcher.md §5.1 (dcmsend 3.6.7), so that a report formatted from it can be
compared with that example, and only the instances and counts differ between tests."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from blocks._dimse_results import InstanceResult, StoreResult

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def instance_result(path: Path, status: int | None, **fields: Any) -> InstanceResult:
    """What happened to ``path``: ``status``, and for every field not in ``fields`` a CT instance
    in Explicit VR Little Endian, one byte, on context 1 of association 1, no error (what the
    code under test does not look at, so that a test names only what it is about)."""
    values: dict[str, Any] = {
        "path": path,
        "sop_class_uid": CT,
        "sop_instance_uid": "1.2.3",
        "transfer_syntax": EXPLICIT,
        "size": 1,
        "status": status,
        "association": 1,
        "context_id": 1,
        "network_transfer_syntax": None,
        "error": None,
    }
    return InstanceResult(**{**values, **fields})


def store_result(
    *instances: InstanceResult, associations: int = 1, contexts: int = 1
) -> StoreResult:
    """A finished store of ``instances`` to the spec example's peer (DCMSEND -> ANY)."""
    return StoreResult(
        peer="127.0.0.1:11199",
        calling_aet="DCMSEND",
        called_aet="ANY",
        started=datetime(2026, 11, 23, 8, 10, 23),
        instances=list(instances),
        associations=associations,
        presentation_contexts=contexts,
    )
