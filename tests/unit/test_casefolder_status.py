"""tasks/casefolder.py, a case's record: per-target status and mercure's retry counting."""

from __future__ import annotations

import re
import time

import pytest

from tasks.casefolder import (
    record_failed_attempt,
    reset_status_if_mismatched,
    set_target_status,
)
from tasks.taskjson import parse_task

from .casefolder_helpers import STAMP_RE, load, task_with

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
