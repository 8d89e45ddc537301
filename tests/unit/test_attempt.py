"""tasks/attempt.py: what one attempt at a case comes to, for every row of README's state table.

Pure: send outcomes and retry state in, a disposition out; ``flows.case_states.final_state``
turns where the case went into the run's final state (no Prefect server: states are values).
The retry count is mercure's ``increase_retry`` (``cf.record_failed_attempt``) on a real
task.json.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.objects import StateType

from flows.case_states import ALREADY_SENT, RETRY_PENDING, SKIPPED, already_sent, final_state
from tasks import casefolder as cf
from tasks.attempt import (
    Disposition,
    Failed,
    Kind,
    Outage,
    Sent,
    after_counting,
    after_sending,
    on_break,
    refused,
)
from tasks.claims import ClaimLost
from tasks.taskjson import read_task_raw

ABORT = "the service stopped while sending"


def ended(exc: BaseException, *, api_outage: bool = False, aborting: bool = False) -> Disposition:
    return on_break(exc, api_outage=api_outage, aborting=aborting, abort_reason=ABORT, why="boom")


# -- README's table, row by row -----------------------------------------------------------------


def test_row_reached_success_is_completed() -> None:
    decided = after_sending({"pacs": Sent({"files": 2}), "archive": Sent({})}, None, "job")
    assert decided == Disposition(Kind.SUCCESS)
    result = {"location": "success"}
    assert final_state(decided.kind.value, decided.reason, result) is result  # run: Completed


def test_row_failed_with_attempts_left_is_retry_pending() -> None:
    decided = after_sending({"pacs": Sent({}), "archive": Failed("refused")}, None, "job")
    assert decided == Disposition(Kind.FAILED, "archive: refused")
    assert decided.counts
    counted = after_counting(decided.reason, retry_later=True)
    assert counted == Disposition(Kind.RETRY, "archive: refused")
    state: Any = final_state(counted.kind.value, counted.reason, {})
    assert (state.type, state.name, state.message) == (
        StateType.FAILED,
        RETRY_PENDING,
        "archive: refused",
    )


def test_row_attempts_exhausted_is_failed_moved_to_error() -> None:
    counted = after_counting("pacs: refused", retry_later=False)
    assert counted == Disposition(Kind.ERROR, "Max retries reached: pacs: refused")
    state: Any = final_state(counted.kind.value, counted.reason, {})
    assert state.type is StateType.FAILED
    assert state.name == "Failed"
    assert state.message == "moved to error/: Max retries reached: pacs: refused"


@pytest.mark.parametrize(
    "problem",
    [
        "No targets provided",
        "Settings for target x incorrect: no such target",
        "case contains a symbolic link: a.dcm",
    ],
)
def test_row_no_or_unknown_target_or_a_link_is_error_at_once(problem: str) -> None:
    decided = refused(problem, "job-1")
    assert decided == Disposition(Kind.ERROR, f"{problem}. Unable to dispatch job job-1")
    assert not decided.counts  # not retried: the same folder fails the same way


def test_row_held_by_another_or_taken_over_is_skipped() -> None:
    decided = ended(ClaimLost("case c is no longer claimed by this process"))
    assert decided.kind is Kind.SKIPPED
    state: Any = final_state(decided.kind.value, decided.reason, {})
    assert (state.type, state.name) == (StateType.CANCELLED, SKIPPED)
    assert state.message == "case c is no longer claimed by this process"


def test_row_already_in_success_is_already_sent() -> None:
    state: Any = already_sent("/success/c", {})
    assert (state.type, state.name) == (StateType.COMPLETED, ALREADY_SENT)


# -- the rules flows/dispatch.py applies ----------------------------------------------------------


def test_an_outage_wins_and_is_not_counted() -> None:
    outage = Outage(ConnectionError("api"), "ConnectError: api")
    decided = after_sending({"a": Failed("x"), "b": outage}, "a link", "job")
    assert decided == Disposition(Kind.UNCOUNTED, "ConnectError: api")
    assert not decided.counts
    assert ended(RuntimeError("api"), api_outage=True) == Disposition(Kind.UNCOUNTED, "boom")


def test_a_link_planted_during_the_sends_is_error_whatever_the_peers_said() -> None:
    decided = after_sending({"pacs": Sent({})}, "case contains a symbolic link", "job")
    assert decided == Disposition(
        Kind.ERROR, "case contains a symbolic link. Unable to dispatch job job"
    )


def test_a_permanent_target_error_is_counted_like_any_failure() -> None:
    """mercure retries every failure up to retry_max; "permanent" only skips quick retries."""
    decided = after_sending({"pacs": Failed("association rejected (permanent)")}, None, "j")
    assert decided.kind is Kind.FAILED


def test_every_failed_target_is_named_in_order() -> None:
    decided = after_sending({"a": Failed("one"), "b": Sent({}), "c": Failed("two")}, None, "j")
    assert decided.reason == "a: one; c: two"


def test_a_task_json_that_cannot_be_updated_sends_the_case_to_error() -> None:
    counted = after_counting("pacs: refused", retry_later=True, problem="task.json is invalid")
    assert counted == Disposition(Kind.ERROR, "pacs: refused; task.json is invalid")


def test_a_stop_is_uncounted_and_an_abort_after_the_grace_period_counts() -> None:
    assert ended(asyncio.CancelledError()) == Disposition(Kind.UNCOUNTED)
    assert ended(KeyboardInterrupt()) == Disposition(Kind.UNCOUNTED)
    assert ended(asyncio.CancelledError(), aborting=True) == Disposition(Kind.FAILED, ABORT)
    # a cancelled attempt is a stop even when the API is down too
    assert ended(asyncio.CancelledError(), api_outage=True) == Disposition(Kind.UNCOUNTED)


def test_an_unexpected_error_counts() -> None:
    assert ended(OSError(28, "No space left on device")) == Disposition(
        Kind.FAILED, "the attempt ended unexpectedly: boom"
    )


def test_send_outcomes_are_the_targets_entries() -> None:
    assert Sent({"files": 2, "bytes": 10}).status() == {
        "state": "complete",
        "message": "",
        "files": 2,
        "bytes": 10,
    }
    assert Failed("refused").status() == {"state": "error", "message": "refused"}


@pytest.mark.parametrize(("retry_max", "attempts"), [(0, 1), (1, 1), (3, 3), (5, 5)])
def test_retry_max_counts_attempts_as_mercure(
    make_case: Any, retry_max: int, attempts: int
) -> None:
    """A case makes ``max(retry_max, 1)`` attempts: retried while the count stays under it."""
    case: Path = make_case()
    made = 0
    while True:
        made += 1
        retry = cf.record_failed_attempt(case, retry_max, 900.0, now=1000.0)
        counted = after_counting("pacs: refused", retry)
        if counted.kind is Kind.ERROR:
            break
        assert counted.kind is Kind.RETRY
        assert read_task_raw(case)["dispatch"]["retries"] == made
        assert read_task_raw(case)["dispatch"]["next_retry_at"] == 1900.0
    assert made == attempts
    assert counted.reason == "Max retries reached: pacs: refused"
