"""The one judge of a C-STORE result (``blocks._dimse_results``), shared by both DICOM backends.

The status table (category per code range), and the rule "a quick retry only when every instance
not stored failed for a transient reason", on dcmsend's report too (``blocks._dcmsend._judge``).
The same rule on the pynetdicom path, against a real peer: tests/integration/test_store_judge.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks import _dcmsend
from blocks._dimse_results import (
    STORE_STATUSES,
    InstanceResult,
    Unstored,
    status_category,
    store_failure_is_transient,
    stored,
)
from blocks.errors import PermanentTargetError, TransientTargetError

from .store_results import instance_result


@pytest.mark.parametrize(
    ("code", "category"),
    [
        (0x0000, "success"),
        (0x0001, "warning"),
        (0x0107, "warning"),
        (0x0116, "warning"),
        (0xB000, "warning"),
        (0xB006, "warning"),
        (0xB007, "warning"),
        (0xBFFF, "warning"),
        (0xA700, "failure"),
        (0xA7FF, "failure"),
        (0xA800, "failure"),
        (0xA900, "failure"),
        (0xC000, "failure"),
        (0xCFFF, "failure"),
        (0x0122, "failure"),
        (0x0124, "failure"),
        (0x0110, "failure"),
        (0xFE00, "failure"),  # cancel: not stored
        (0xFF00, "failure"),  # pending: not stored
        (0xFF01, "failure"),
        (0x1234, "failure"),  # unknown: not stored
    ],
)
def test_status_table_gives_the_category(code: int, category: str) -> None:
    assert status_category(code) == category


def test_the_table_agrees_with_pynetdicom_on_every_code() -> None:
    """pynetdicom's own tables (what the DICOM standard lists); pending/cancel/unknown: failure."""
    from pynetdicom.status import code_to_category

    for code in range(0x10000):
        theirs = code_to_category(code).lower()
        assert status_category(code) == (theirs if theirs in ("success", "warning") else "failure")


def test_rows_do_not_overlap_and_only_out_of_resources_is_transient() -> None:
    for i, row in enumerate(STORE_STATUSES):
        for other in STORE_STATUSES[i + 1 :]:
            assert row.last < other.first or other.last < row.first, (row, other)
    assert [(r.first, r.last) for r in STORE_STATUSES if r.transient] == [(0xA700, 0xA7FF)]


def test_stored_counts_warnings_only_when_allowed() -> None:
    assert stored(0x0000, warnings_ok=False)
    assert stored(0xB000)
    assert not stored(0xB000, warnings_ok=False)
    for code in (None, 0xA700, 0xFF00):
        assert not stored(code)


def instance(status: int | None, *, no_context: bool = False) -> InstanceResult:
    return instance_result(Path("x.dcm"), status, no_context=no_context)


@pytest.mark.parametrize(
    ("failed", "transient"),
    [
        ([0xA700], True),
        ([0xA700, 0xA7FF], True),
        ([None], True),  # no response (or not sent: the association broke first)
        ([None, 0xA701], True),
        ([0xA900], False),
        ([0xC000], False),
        ([0xA700, 0xA900], False),  # out of resources + does not match: a retry cannot fix it
        ([None, 0xC000], False),
        ([0xFF00], False),
        ([], False),  # a report that does not add up: nothing a retry would fix
    ],
)
def test_a_send_is_transient_only_when_every_failure_is(
    failed: list[int | None], transient: bool
) -> None:
    assert store_failure_is_transient(instance(code) for code in failed) is transient
    assert store_failure_is_transient(Unstored(code) for code in failed) is transient


def test_no_presentation_context_is_permanent_even_beside_a_lost_response() -> None:
    assert not store_failure_is_transient([instance(None, no_context=True)])
    assert not store_failure_is_transient([instance(None), instance(None, no_context=True)])


def report(*statuses: str) -> str:
    """A dcmsend report (DCMTK 3.6.7 layout) with one instance per status line."""
    blocks = "\n".join(
        f"Number        : {n}\nFilename      : case/f{n}.dcm\nDataset Size  : 10 bytes\n"
        f"Association   : 1\nDIMSE Status  : {status}\n"
        for n, status in enumerate(statuses, 1)
    )
    ok = sum(s.startswith("0x0000") for s in statuses)
    warned = sum(s.startswith("0xb") for s in statuses)
    return (
        "Detailed Report on the Transfer of Instances\n"
        "============================================\n\n"
        "Communication Peer : 127.0.0.1:104\nAE Titles used     : DCMSEND -> ANY\n\n\n"
        f"{blocks}\n\nStatus Summary\n--------------\n"
        "Number of associations   : 1\nNumber of pres. contexts : 1\n"
        f"Number of SOP instances  : {len(statuses)}\n"
        f"- sent to the peer       : {len(statuses)}\n"
        f"  * with status SUCCESS  : {ok}"
        + (f"\n  * with status WARNING  : {warned}" if warned else "")
    )


@pytest.mark.parametrize(
    ("statuses", "error"),
    [
        (("0xa700 (Refused: OutOfResources)",), TransientTargetError),
        (("0xa700 (Refused: OutOfResources)", "<not sent>"), TransientTargetError),
        (
            ("0xa700 (Refused: OutOfResources)", "0xa900 (Error: DataSetDoesNotMatchSOPClass)"),
            PermanentTargetError,
        ),
        (
            ("0xa700 (Refused: OutOfResources)", "<no acceptable presentation context>"),
            PermanentTargetError,
        ),
    ],
)
def test_dcmsend_report_is_judged_by_the_same_rule(
    statuses: tuple[str, ...], error: type[Exception]
) -> None:
    text = report("0x0000 (Success)", *statuses)
    with pytest.raises(error) as caught:
        _dcmsend._judge(text, True, "target pacs", 0.1)
    assert f"only 1 out of {len(statuses) + 1} instances" in str(caught.value)


def test_dcmsend_report_counts_warnings_as_sent_only_when_allowed() -> None:
    text = report("0x0000 (Success)", "0xb000 (Warning: CoercionOfDataElements)")
    assert _dcmsend._judge(text, True, "t", 0.1).instances == 2
    with pytest.raises(PermanentTargetError):
        _dcmsend._judge(text, False, "t", 0.1)
