"""tasks/casefolder.py: mercure's case-folder protocol, quirks fixed per architecture §4.1."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
import pytest

from tasks.casefolder import (
    ERROR,
    HALT,
    LOCK,
    PROCESSING,
    REASON_FILE,
    Candidate,
    ClaimOwner,
    case_priority,
    case_targets,
    claim_case,
    claim_is_stale,
    halt,
    is_halted,
    is_offpeak,
    move_case,
    order_cases,
    read_claim,
    record_claim_run,
    record_failed_attempt,
    release_claim,
    reset_status_if_mismatched,
    restart_case,
    scan_outgoing,
    set_target_status,
    unhalt,
)
from tasks.taskjson import TaskFileError, parse_task

from .mercure_task import MERCURE_TASK

STAMP_RE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
PRIORITIES = {"stroke": "urgent", "ct_to_pacs": "normal", "research": "offpeak"}
GRACE = 600.0


def load(case: Path) -> dict[str, Any]:
    return json.loads((case / "task.json").read_text(encoding="utf-8"))


def task_with(*, applied: str = "", triggered: Any = None, **dispatch: Any) -> dict[str, Any]:
    raw = copy.deepcopy(MERCURE_TASK)
    raw["info"]["applied_rule"] = applied
    if triggered is not None:
        raw["info"]["triggered_rules"] = triggered
    raw["dispatch"].update(dispatch)
    return raw


def scan(outgoing: Path, **kw: Any):
    return scan_outgoing(outgoing, rule_priorities=PRIORITIES, invalid_grace=GRACE, **kw)


def age(path: Path, seconds: float) -> None:
    """Make a folder (and its task.json) look untouched for ``seconds``."""
    old = time.time() - seconds
    for p in (path / "task.json", path):
        if p.exists():
            os.utime(p, (old, old))


# --------------------------------------------------------------------------------------------
# off-peak window


@pytest.mark.parametrize(
    ("start", "end", "now", "expected"),
    [
        ("08:00", "17:00", "12:00", True),
        ("08:00", "17:00", "08:00", True),  # inclusive start
        ("08:00", "17:00", "17:00", True),  # inclusive end
        ("08:00", "17:00", "07:59", False),
        ("08:00", "17:00", "17:01", False),
        ("22:00", "06:00", "23:30", True),  # over midnight
        ("22:00", "06:00", "00:00", True),
        ("22:00", "06:00", "03:00", True),
        ("22:00", "06:00", "22:00", True),
        ("22:00", "06:00", "06:00", True),
        ("22:00", "06:00", "06:01", False),
        ("22:00", "06:00", "12:00", False),
        ("22:00", "06:00", "21:59", False),
    ],
)
def test_is_offpeak_window(start, end, now, expected):
    assert is_offpeak(start, end, dt.time.fromisoformat(now)) is expected


@pytest.mark.parametrize("now", ["00:00", "09:00", "09:01", "23:59"])
def test_is_offpeak_start_equals_end_means_always(now):
    assert is_offpeak("09:00", "09:00", dt.time.fromisoformat(now)) is True


@pytest.mark.parametrize(
    ("start", "end"),
    [("", "06:00"), ("22:00", "late"), ("25:00", "06:00"), ("22h", "6h"), (None, "06:00")],
)
def test_is_offpeak_unparsable_means_always(start, end):
    assert is_offpeak(start, end, dt.time(12, 0)) is True


# --------------------------------------------------------------------------------------------
# priority


def test_priority_of_applied_rule():
    task = parse_task(task_with(applied="stroke"))

    assert case_priority(task, PRIORITIES) == "urgent"


def test_applied_rule_wins_over_triggered_rules():
    task = parse_task(task_with(applied="ct_to_pacs", triggered={"stroke": True}))

    assert case_priority(task, PRIORITIES) == "normal"


def test_unknown_applied_rule_falls_back_to_triggered_rules():
    task = parse_task(task_with(applied="deleted_rule", triggered={"stroke": True}))

    assert case_priority(task, PRIORITIES) == "urgent"


def test_highest_triggered_rule_wins_even_if_listed_later():
    task = parse_task(task_with(triggered={"ct_to_pacs": True, "research": True, "stroke": True}))

    assert case_priority(task, PRIORITIES) == "urgent"


def test_normal_beats_offpeak_among_triggered_rules():
    task = parse_task(task_with(triggered={"research": True, "ct_to_pacs": True}))

    assert case_priority(task, PRIORITIES) == "normal"


def test_offpeak_from_triggered_rules():
    # mercure never yielded offpeak for series-level route tasks (quirk fixed).
    task = parse_task(task_with(triggered={"research": True}))

    assert case_priority(task, PRIORITIES) == "offpeak"


def test_unknown_triggered_rules_are_normal():
    task = parse_task(task_with(triggered={"gone": True, "also_gone": True}))

    assert case_priority(task, PRIORITIES) == "normal"


def test_string_triggered_rules_are_normal():
    task = parse_task(task_with(triggered=""))

    assert case_priority(task, PRIORITIES) == "normal"


def test_unknown_priority_value_counts_as_normal():
    task = parse_task(task_with(applied="weird"))

    assert case_priority(task, {"weird": "asap"}) == "normal"


# --------------------------------------------------------------------------------------------
# ordering


def cand(name: str, priority: str, mtime: float) -> Candidate:
    return Candidate(Path(name), parse_task(task_with()), priority, mtime)


def names(cands: list[Candidate]) -> list[str]:
    return [c.path.name for c in cands]


def test_order_interleaves_two_urgent_then_one_normal_oldest_first():
    cands = [
        cand("N2", "normal", 20),
        cand("U3", "urgent", 3),
        cand("U1", "urgent", 1),
        cand("N3", "normal", 30),
        cand("U5", "urgent", 5),
        cand("N1", "normal", 10),
        cand("U2", "urgent", 2),
        cand("U4", "urgent", 4),
    ]

    ordered = order_cases(cands, offpeak_now=False)

    assert names(ordered) == ["U1", "U2", "N1", "U3", "U4", "N2", "U5", "N3"]


def test_order_only_urgent_continues_past_the_normal_slot():
    # mercure aborted the cycle after two urgent cases when no normal one was left.
    cands = [cand(f"U{i}", "urgent", i) for i in (4, 2, 3, 1)]

    assert names(order_cases(cands, offpeak_now=False)) == ["U1", "U2", "U3", "U4"]


def test_order_only_normal():
    cands = [cand(f"N{i}", "normal", i) for i in (3, 1, 2)]

    assert names(order_cases(cands, offpeak_now=False)) == ["N1", "N2", "N3"]


def test_order_normal_continue_when_urgent_run_out():
    cands = [cand("U1", "urgent", 1), *(cand(f"N{i}", "normal", i) for i in (1, 2, 3))]

    assert names(order_cases(cands, offpeak_now=False)) == ["U1", "N1", "N2", "N3"]


def test_order_empty():
    assert order_cases([], offpeak_now=True) == []


def test_offpeak_cases_wait_outside_the_window():
    cands = [cand("N1", "normal", 1), cand("O1", "offpeak", 2), cand("U1", "urgent", 3)]

    assert names(order_cases(cands, offpeak_now=False)) == ["U1", "N1"]


def test_offpeak_cases_are_normal_inside_the_window():
    cands = [
        cand("N2", "normal", 3),
        cand("O1", "offpeak", 2),
        cand("N1", "normal", 1),
        cand("U1", "urgent", 9),
        cand("U2", "urgent", 10),
    ]

    ordered = order_cases(cands, offpeak_now=True)

    assert names(ordered) == ["U1", "U2", "N1", "O1", "N2"]


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


# --------------------------------------------------------------------------------------------
# claims


def test_claim_is_exclusive(make_case):
    case = make_case()

    assert claim_case(case) is True
    assert claim_case(case) is False


def test_claim_records_the_owner(make_case):
    case = make_case()

    claim_case(case, flow_run_id="run-1")

    data = json.loads((case / PROCESSING).read_text())
    assert data["host"] == socket.gethostname()
    assert data["pid"] == os.getpid()
    assert data["process_started"] == pytest.approx(psutil.Process().create_time())
    assert data["flow_run_id"] == "run-1"
    claimed_at = dt.datetime.fromisoformat(data["claimed_at"])
    assert claimed_at.tzinfo is not None
    assert abs((dt.datetime.now().astimezone() - claimed_at).total_seconds()) < 60


def test_second_claim_keeps_the_first_owner(make_case):
    case = make_case()
    claim_case(case, flow_run_id="first")

    claim_case(case, flow_run_id="second")

    assert read_claim(case).flow_run_id == "first"


def test_read_claim_returns_the_owner(make_case):
    case = make_case()
    claim_case(case)

    owner = read_claim(case)

    assert owner == ClaimOwner(**json.loads((case / PROCESSING).read_text()))
    assert owner.is_this_process()


def test_read_claim_of_empty_marker_is_none(make_case):
    # mercure's own dispatcher writes an empty .processing.
    case = make_case()
    (case / PROCESSING).touch()

    assert read_claim(case) is None


@pytest.mark.parametrize("content", ["garbage", "[1, 2]", '{"host": "h"}', '{"who": "else"}'])
def test_read_claim_of_foreign_marker_is_none(make_case, content):
    case = make_case()
    (case / PROCESSING).write_text(content)

    assert read_claim(case) is None


def test_read_claim_without_marker_is_none(make_case):
    assert read_claim(make_case()) is None


def write_claim(case: Path, **fields: Any) -> None:
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_started": psutil.Process().create_time(),
        "claimed_at": "2025-03-01T10:00:00+00:00",
        "flow_run_id": None,
        **fields,
    }
    (case / PROCESSING).write_text(json.dumps(owner))


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer names a process
    return proc.pid


def test_own_live_claim_is_not_stale(make_case):
    case = make_case()
    claim_case(case)

    assert claim_is_stale(case) is False


def test_claim_of_dead_process_on_this_host_is_stale(make_case, dead_pid):
    case = make_case()
    write_claim(case, pid=dead_pid, process_started=time.time() - 1)

    assert claim_is_stale(case) is True


def test_claim_of_reused_pid_is_stale(make_case):
    # The pid is alive but belongs to a process started at another time.
    case = make_case()
    write_claim(case, process_started=psutil.Process().create_time() - 3600)

    assert claim_is_stale(case) is True


def test_claim_from_another_host_is_not_stale(make_case, dead_pid):
    case = make_case()
    write_claim(case, host=socket.gethostname() + "-elsewhere", pid=dead_pid)

    assert claim_is_stale(case) is False


def test_empty_claim_is_not_stale(make_case):
    case = make_case()
    (case / PROCESSING).touch()

    assert claim_is_stale(case) is False


def test_missing_claim_is_not_stale(make_case):
    assert claim_is_stale(make_case()) is False


def test_record_claim_run_adds_the_flow_run(make_case):
    case = make_case()
    claim_case(case)
    before = read_claim(case)

    record_claim_run(case, "run-42")

    after = read_claim(case)
    assert after.flow_run_id == "run-42"
    assert asdict(after) == {**asdict(before), "flow_run_id": "run-42"}
    assert sorted(p.name for p in case.iterdir() if p.name.startswith(PROCESSING)) == [PROCESSING]


def test_record_claim_run_leaves_foreign_claims_alone(make_case):
    case = make_case()
    write_claim(case, host="other-host")
    before = (case / PROCESSING).read_text()

    record_claim_run(case, "run-42")

    assert (case / PROCESSING).read_text() == before


def test_record_claim_run_leaves_empty_marker_empty(make_case):
    case = make_case()
    (case / PROCESSING).touch()

    record_claim_run(case, "run-42")

    assert (case / PROCESSING).read_text() == ""


def test_release_claim(make_case):
    case = make_case()
    claim_case(case)

    release_claim(case)
    release_claim(case)  # idempotent

    assert not (case / PROCESSING).exists()
    assert claim_case(case) is True


# --------------------------------------------------------------------------------------------
# per-target status


def test_reset_status_when_count_differs(make_case):
    case = make_case(task=task_with(target_name=["pacs", "archive"], status={}))

    reset_status_if_mismatched(case, ["pacs", "archive"])

    status = load(case)["dispatch"]["status"]
    assert list(status) == ["pacs", "archive"]
    assert {s["state"] for s in status.values()} == {"waiting"}
    assert all(re.fullmatch(STAMP_RE, s["time"]) for s in status.values())


def test_reset_status_when_same_count_but_target_renamed(make_case):
    old = {
        "pacs": {"state": "complete", "time": "2025-03-01 10:00:00"},
        "archive": {"state": "error", "time": "2025-03-01 10:00:00"},
    }
    case = make_case(task=task_with(target_name=["pacs", "archive2"], status=old))

    reset_status_if_mismatched(case, ["pacs", "archive2"])

    status = load(case)["dispatch"]["status"]
    assert set(status) == {"pacs", "archive2"}
    assert status["pacs"]["state"] == status["archive2"]["state"] == "waiting"


def test_matching_status_is_untouched(make_case):
    old = {
        "pacs": {"state": "complete", "time": "2025-03-01 10:00:00"},
        "archive": {"state": "error", "time": "2025-03-01 10:05:00", "message": "refused"},
    }
    case = make_case(task=task_with(target_name=["pacs", "archive"], status=old))

    returned = reset_status_if_mismatched(case, ["archive", "pacs"])

    assert load(case)["dispatch"]["status"] == old
    assert returned["dispatch"]["status"] == old


def test_set_target_status(make_case):
    case = make_case(
        task=task_with(
            target_name=["pacs", "archive"],
            status={
                "pacs": {"state": "waiting", "time": "2025-03-01 10:00:00"},
                "archive": {"state": "complete", "time": "2025-03-01 10:00:00"},
            },
        )
    )

    set_target_status(case, "pacs", "complete")

    status = load(case)["dispatch"]["status"]
    assert status["pacs"]["state"] == "complete"
    assert status["pacs"]["time"] != "2025-03-01 10:00:00"
    assert "message" not in status["pacs"]
    assert status["archive"] == {"state": "complete", "time": "2025-03-01 10:00:00"}


def test_set_target_status_with_message(make_case):
    case = make_case()

    set_target_status(case, "pacs", "error", "association rejected by PACS")

    entry = load(case)["dispatch"]["status"]["pacs"]
    assert entry["state"] == "error"
    assert entry["message"] == "association rejected by PACS"
    parse_task(load(case))  # still a valid mercure task


def test_set_target_status_success_drops_an_old_message(make_case):
    case = make_case()
    set_target_status(case, "pacs", "error", "refused")

    set_target_status(case, "pacs", "complete")

    assert "message" not in load(case)["dispatch"]["status"]["pacs"]


# --------------------------------------------------------------------------------------------
# retries (mercure's increase_retry counting)


def test_retry_max_5_persists_retries_1_to_4_then_gives_up(make_case):
    case = make_case()

    for attempt in range(1, 5):
        now = 1000.0 * attempt
        assert record_failed_attempt(case, retry_max=5, retry_delay=900, now=now) is True
        dispatch = load(case)["dispatch"]
        assert dispatch["retries"] == attempt
        assert dispatch["next_retry_at"] == now + 900

    before = (case / "task.json").read_bytes()
    assert record_failed_attempt(case, retry_max=5, retry_delay=900, now=9999.0) is False
    assert (case / "task.json").read_bytes() == before  # the 5th is not written: retries 4
    assert load(case)["dispatch"]["retries"] == 4


@pytest.mark.parametrize("retry_max", [0, 1])
def test_retry_max_0_or_1_gives_up_on_first_failure(make_case, retry_max):
    case = make_case()
    before = (case / "task.json").read_bytes()

    assert record_failed_attempt(case, retry_max=retry_max, retry_delay=900) is False
    assert (case / "task.json").read_bytes() == before


@pytest.mark.parametrize("retries", [5, 7])
def test_task_already_at_retry_max_gives_up(make_case, retries):
    case = make_case(task=task_with(retries=retries, next_retry_at=1.0))
    before = (case / "task.json").read_bytes()

    assert record_failed_attempt(case, retry_max=5, retry_delay=900) is False
    assert (case / "task.json").read_bytes() == before


def test_failed_attempt_without_retries_key_counts_from_zero(make_case):
    raw = task_with()
    del raw["dispatch"]["retries"]
    case = make_case(task=raw)

    assert record_failed_attempt(case, retry_max=3, retry_delay=60, now=100.0) is True
    assert load(case)["dispatch"]["retries"] == 1
    assert load(case)["dispatch"]["next_retry_at"] == 160.0


def test_failed_attempt_keeps_status_and_unknown_keys(make_case):
    raw = task_with(status={"pacs": {"state": "error", "time": "2025-03-01 10:00:00"}})
    raw["site_extension"] = {"ticket": 1}
    case = make_case(task=raw)

    record_failed_attempt(case, retry_max=5, retry_delay=900, now=0.0)

    after = load(case)
    assert after["dispatch"]["status"] == raw["dispatch"]["status"]
    assert after["site_extension"] == {"ticket": 1}


def test_failed_attempt_default_now_is_current_time(make_case):
    case = make_case()
    t0 = time.time()

    record_failed_attempt(case, retry_max=5, retry_delay=900)

    assert t0 + 900 <= load(case)["dispatch"]["next_retry_at"] <= time.time() + 900


# --------------------------------------------------------------------------------------------
# moves


def tree(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_move_to_success_keeps_name_and_files(make_case, tmp_path):
    case = make_case()
    (case / "sent.txt").write_text("report")
    claim_case(case)
    files = sorted(set(tree(case)) - {PROCESSING})
    task_before = load(case)

    dest = move_case(case, tmp_path / "success")

    assert dest == tmp_path / "success" / case.name
    assert not case.exists()
    assert tree(dest) == files
    assert load(dest) == task_before


def test_move_collision_gets_isoformat_suffix(make_case, tmp_path):
    success = tmp_path / "success"
    (success / MERCURE_TASK["id"]).mkdir(parents=True)
    case = make_case()

    dest = move_case(case, success)

    prefix = f"{case.name}_"
    assert dest.parent == success
    assert dest.name.startswith(prefix)
    stamp = dt.datetime.fromisoformat(dest.name[len(prefix) :])
    assert abs((dt.datetime.now() - stamp).total_seconds()) < 60
    assert (success / case.name).is_dir()  # the earlier one is untouched
    assert (dest / "task.json").is_file()


def test_move_to_error_writes_fail_stage_reason_and_reason_file(make_case, tmp_path):
    case = make_case()
    claim_case(case)

    dest = move_case(case, tmp_path / "error", fail_stage="DISPATCHING", reason="pacs: refused")

    raw = load(dest)
    assert raw["info"]["fail_stage"] == "DISPATCHING"
    assert raw["info"]["fail_reason"] == "pacs: refused"
    assert '"fail_stage": "DISPATCHING"' in (dest / "task.json").read_text()
    assert (dest / REASON_FILE).read_text() == "pacs: refused\n"
    assert not (dest / PROCESSING).exists()
    assert parse_task(raw).info.fail_stage == "DISPATCHING"


def test_move_to_error_keeps_unknown_keys(make_case, tmp_path):
    raw = task_with()
    raw["info"]["ward"] = "ICU"
    raw["site_extension"] = [1, 2]
    case = make_case(task=raw)

    dest = move_case(case, tmp_path / "error", fail_stage="DISPATCHING", reason="x")

    after = load(dest)
    assert after["info"]["ward"] == "ICU"
    assert after["site_extension"] == [1, 2]


def test_move_reason_file_ends_with_one_newline(make_case, tmp_path):
    case = make_case()

    dest = move_case(case, tmp_path / "error", fail_stage="DISPATCHING", reason="a\nb\n\n  ")

    assert (dest / REASON_FILE).read_text() == "a\nb\n"


def test_move_removes_processing(make_case, tmp_path):
    case = make_case()
    claim_case(case)

    dest = move_case(case, tmp_path / "success")

    assert not (dest / PROCESSING).exists()
    assert not (dest / REASON_FILE).exists()


def test_move_with_invalid_task_json_still_writes_reason(make_case, tmp_path):
    case = make_case(text="{broken")

    dest = move_case(case, tmp_path / "error", fail_stage="DISPATCHING", reason="invalid task")

    assert (dest / "task.json").read_text() == "{broken"
    assert (dest / REASON_FILE).read_text() == "invalid task\n"


def test_move_without_task_json_still_writes_reason(make_case, tmp_path):
    case = make_case(task=None)

    dest = move_case(case, tmp_path / "error", fail_stage="DISPATCHING", reason="no task")

    assert not (dest / "task.json").exists()
    assert (dest / REASON_FILE).read_text() == "no task\n"


# --------------------------------------------------------------------------------------------
# restart


@pytest.fixture
def failed_case(make_case, tmp_path) -> Path:
    """A two-target case in error/ after mercure gave up: pacs complete, archive failed."""
    raw = task_with(
        target_name=["pacs", "archive"],
        status={
            "pacs": {"state": "complete", "time": "2025-03-01 10:00:00"},
            "archive": {"state": "error", "time": "2025-03-01 11:00:00", "message": "refused"},
        },
        retries=4,
        next_retry_at=1_740_830_000.0,
    )
    raw["info"]["fail_stage"] = "DISPATCHING"
    raw["info"]["fail_reason"] = "archive: refused"
    case = make_case(task=raw, parent=tmp_path / "error")
    (case / REASON_FILE).write_text("archive: refused\n")
    return case


def test_restart_resets_retries_and_fail_stage_keeps_complete(failed_case, outgoing):
    status_before = load(failed_case)["dispatch"]["status"]

    dest = restart_case(failed_case, outgoing)

    assert dest == outgoing / failed_case.name
    assert not failed_case.exists()
    raw = load(dest)
    assert raw["dispatch"]["retries"] is None
    assert raw["dispatch"]["next_retry_at"] is None
    assert "fail_stage" in raw["info"]
    assert raw["info"]["fail_stage"] is None
    assert "fail_reason" not in raw["info"]
    assert raw["dispatch"]["status"] == status_before
    assert not (dest / REASON_FILE).exists()
    assert not (dest / LOCK).exists()


def test_restarted_case_is_ready_again(failed_case, outgoing):
    restart_case(failed_case, outgoing)

    assert [c.path.name for c in scan(outgoing).ready] == [failed_case.name]


def test_restart_does_not_add_a_missing_fail_stage(make_case, tmp_path, outgoing):
    raw = task_with()
    del raw["info"]["fail_stage"]
    case = make_case(task=raw, parent=tmp_path / "error")

    dest = restart_case(case, outgoing)

    assert "fail_stage" not in load(dest)["info"]


@pytest.mark.parametrize("marker", [LOCK, ERROR, PROCESSING])
def test_restart_refuses_when_a_marker_exists(failed_case, outgoing, marker):
    (failed_case / marker).touch()
    before = (failed_case / "task.json").read_bytes()

    with pytest.raises(TaskFileError, match=marker):
        restart_case(failed_case, outgoing)

    assert (failed_case / "task.json").read_bytes() == before
    assert list(outgoing.iterdir()) == []


def test_restart_refuses_when_destination_exists(failed_case, outgoing):
    (outgoing / failed_case.name).mkdir()
    before = (failed_case / "task.json").read_bytes()

    with pytest.raises(TaskFileError, match="already exists"):
        restart_case(failed_case, outgoing)

    assert (failed_case / "task.json").read_bytes() == before
    assert not (failed_case / LOCK).exists()
    assert list((outgoing / failed_case.name).iterdir()) == []


def test_restart_refuses_process_action(make_case, tmp_path, outgoing):
    raw = task_with()
    raw["info"]["action"] = "process"
    case = make_case(task=raw, parent=tmp_path / "error")

    with pytest.raises(TaskFileError, match="'process'"):
        restart_case(case, outgoing)

    assert case.is_dir()
    assert not (case / LOCK).exists()


def test_restart_accepts_both_action(make_case, tmp_path, outgoing):
    raw = task_with()
    raw["info"]["action"] = "both"
    case = make_case(task=raw, parent=tmp_path / "error")

    assert restart_case(case, outgoing).is_dir()


def test_restart_refuses_without_task_json(make_case, tmp_path, outgoing):
    case = make_case(task=None, parent=tmp_path / "error")

    with pytest.raises(TaskFileError, match="missing"):
        restart_case(case, outgoing)

    assert case.is_dir()


@pytest.mark.parametrize("dispatch", [{}, None, {"target_name": ["pacs"]}])
def test_restart_refuses_without_dispatch_status_and_leaves_no_lock(
    make_case, tmp_path, outgoing, dispatch
):
    # mercure's "no_dispatch_status"; a refusal must not leave a .lock that blocks later restarts.
    raw = task_with()
    raw["dispatch"] = dispatch
    case = make_case(task=raw, parent=tmp_path / "error")

    with pytest.raises(TaskFileError, match="no dispatch status"):
        restart_case(case, outgoing)

    assert not (case / LOCK).exists()
    assert list(outgoing.iterdir()) == []


def test_restart_with_null_info_is_a_task_file_error(make_case, tmp_path, outgoing):
    case = make_case(task={"info": None, "id": "x"}, parent=tmp_path / "error")

    with pytest.raises(TaskFileError):
        restart_case(case, outgoing)

    assert not (case / LOCK).exists()


# --------------------------------------------------------------------------------------------
# case_targets


def test_case_targets(make_case):
    case = make_case(task=task_with(target_name="pacs"))

    assert case_targets(case) == ["pacs"]


def test_case_targets_of_invalid_case_is_empty(make_case):
    assert case_targets(make_case(text="{")) == []
