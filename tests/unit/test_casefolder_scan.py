"""tasks/casefolder.py, scanning outgoing/: ready, busy, claimed, invalid and expired cases, the
retry gate, and halt."""

from __future__ import annotations

import os
import time

import pytest

from tasks.casefolder import (
    ERROR,
    HALT,
    LOCK,
    PROCESSING,
    halt,
    is_halted,
    unhalt,
)

from .casefolder_helpers import GRACE, age, scan, task_with
from .mercure_task import MERCURE_TASK

# --------------------------------------------------------------------------------------------
# scanning


def test_scan_ready_case(outgoing, make_case):
    case = make_case(task=task_with(applied="stroke"))

    result = scan(outgoing)

    assert [c.path for c in result.ready] == [case]
    assert result.ready[0].priority == "urgent"
    assert result.ready[0].task.id == MERCURE_TASK["id"]
    assert result.ready[0].mtime == case.stat().st_mtime
    assert result.halted is False
    assert result.not_due == result.claimed == result.busy == []
    assert result.invalid == result.expired_invalid == []


def test_scan_does_not_need_dicom_files(outgoing, make_case):
    make_case(files=False)

    assert len(scan(outgoing).ready) == 1


@pytest.mark.parametrize("marker", [LOCK, ERROR])
def test_scan_lock_and_error_are_busy(outgoing, make_case, marker):
    case = make_case()
    (case / marker).touch()

    result = scan(outgoing)

    assert result.busy == [case]
    assert result.ready == []


def test_scan_processing_is_claimed(outgoing, make_case):
    case = make_case()
    (case / PROCESSING).touch()

    result = scan(outgoing)

    assert result.claimed == [case]
    assert result.ready == []


def test_scan_lock_on_invalid_folder_is_busy_not_invalid(outgoing, make_case):
    # A producer still writing (no task.json yet) must not be taken for an invalid folder.
    case = make_case(task=None)
    (case / LOCK).touch()
    age(case, 2 * GRACE)

    result = scan(outgoing)

    assert result.busy == [case]
    assert result.invalid == result.expired_invalid == []


def test_scan_detects_halt_and_ignores_stray_files(outgoing, make_case):
    make_case()
    halt(outgoing)
    (outgoing / "notes.txt").write_text("not a case")

    result = scan(outgoing)

    assert result.halted is True
    assert len(result.ready) == 1
    assert result.invalid == result.expired_invalid == result.busy == []


def test_halt_helpers(outgoing):
    assert not is_halted(outgoing)
    halt(outgoing)
    assert (outgoing / HALT).is_file()
    assert is_halted(outgoing)
    unhalt(outgoing)
    unhalt(outgoing)  # idempotent
    assert not is_halted(outgoing)


def test_scan_ignores_symlinked_folders(outgoing, make_case, tmp_path):
    real = make_case(parent=tmp_path / "elsewhere")
    (outgoing / "link").symlink_to(real, target_is_directory=True)

    result = scan(outgoing)

    assert result.ready == result.invalid == []


def test_scan_missing_outgoing_folder_is_empty(tmp_path):
    result = scan(tmp_path / "does-not-exist")

    assert result.ready == result.invalid == result.claimed == []
    assert result.halted is False


def test_scan_next_retry_at_in_future_is_not_due(outgoing, make_case):
    case = make_case(task=task_with(retries=1, next_retry_at=2000.0))

    result = scan(outgoing, now=1999.0)

    assert [c.path for c in result.not_due] == [case]
    assert result.ready == []


def test_scan_next_retry_at_reached_is_ready(outgoing, make_case):
    case = make_case(task=task_with(retries=1, next_retry_at=2000.0))

    result = scan(outgoing, now=2000.0)

    assert [c.path for c in result.ready] == [case]
    assert result.not_due == []


def test_scan_null_next_retry_at_is_ready(outgoing, make_case):
    make_case(task=task_with(next_retry_at=None))

    assert len(scan(outgoing, now=0.0).ready) == 1


def test_scan_invalid_json_within_grace_is_invalid(outgoing, make_case):
    case = make_case(text="{not json")

    result = scan(outgoing)

    assert [p for p, _ in result.invalid] == [case]
    assert "not valid JSON" in result.invalid[0][1]
    assert result.expired_invalid == result.ready == []


def test_scan_invalid_json_after_grace_is_expired(outgoing, make_case):
    case = make_case(text="{not json")
    age(case, GRACE + 60)

    result = scan(outgoing)

    assert [p for p, _ in result.expired_invalid] == [case]
    assert "not valid JSON" in result.expired_invalid[0][1]
    assert result.invalid == []


def test_scan_recently_changed_task_json_restarts_the_grace(outgoing, make_case):
    case = make_case(text="{not json")
    age(case, GRACE + 60)
    os.utime(case / "task.json")  # rewritten just now

    result = scan(outgoing)

    assert [p for p, _ in result.invalid] == [case]
    assert result.expired_invalid == []


def test_scan_schema_error_is_invalid_with_field_name(outgoing, make_case):
    raw = task_with()
    del raw["id"]
    case = make_case(task=raw)

    result = scan(outgoing)

    assert result.invalid == [
        (case, "task.json has invalid format: id: Field required (1 error(s))")
    ]


def test_scan_empty_dispatch_is_invalid(outgoing, make_case):
    raw = task_with()
    raw["dispatch"] = {}
    case = make_case(task=raw)
    age(case, GRACE + 1)

    result = scan(outgoing)

    assert [p for p, _ in result.expired_invalid] == [case]
    assert "empty dispatch" in result.expired_invalid[0][1]


def test_scan_folder_without_task_json_is_invalid(outgoing, make_case):
    case = make_case(task=None)

    result = scan(outgoing)

    assert result.invalid == [(case, "task.json is missing")]


def test_scan_empty_folder_without_task_json_expires(outgoing, make_case):
    case = make_case(task=None, files=False)
    age(case, GRACE * 10)

    assert scan(outgoing).expired_invalid == [(case, "task.json is missing")]


def test_scan_changes_nothing_on_disk(outgoing, make_case):
    make_case("a")
    make_case("b", text="{")
    make_case("c", task=task_with(next_retry_at=time.time() + 3600))
    before = sorted(str(p.relative_to(outgoing)) for p in outgoing.rglob("*"))

    scan(outgoing)

    assert sorted(str(p.relative_to(outgoing)) for p in outgoing.rglob("*")) == before
