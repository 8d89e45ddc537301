"""The one way the unit tests build a :class:`StoreResult`: the association header of the
example report in mercure-dispatcher.md §5.1 (dcmsend 3.6.7), so that a report formatted from it
can be compared with that example, and only the instances and counts differ between tests."""

from __future__ import annotations

from datetime import datetime

from blocks._dimse_results import InstanceResult, StoreResult


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
