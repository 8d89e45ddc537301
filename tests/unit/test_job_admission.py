"""flows/background: OpenREM's admission rule (``JobLimits.admissible``) and the queue's order
(``queue_order``), on flow-run objects built in memory (no server)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from prefect.client.schemas.objects import FlowRun

from flows.background.queue import queue_order
from flows.background.records import JobLimits

T0 = dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC)


def job(name: str, *, at: float = 0, created: float | None = None, **parameters: Any) -> FlowRun:
    return FlowRun(
        id=uuid.uuid4(),
        name=name,
        flow_id=uuid.uuid4(),
        parameters=parameters,
        expected_start_time=T0 + dt.timedelta(seconds=at),
        created=T0 + dt.timedelta(seconds=at if created is None else created),
    )


def test_limits_are_read_from_the_runs_parameters() -> None:
    limits = JobLimits.of(
        job("j", task_type="export", num_proc="2", num_of_task_type={"export": "1"}, priority=10)
    )
    assert limits == JobLimits("export", 2, {"export": 1}, 10)
    assert JobLimits.of(job("bare")) == JobLimits("default", 0, {}, 0)


@pytest.mark.parametrize(
    ("num_proc", "per_type", "total", "active", "admitted"),
    [
        (0, {}, 100, {"export": 100}, True),  # no caps at all
        (2, {}, 1, {}, True),
        (2, {}, 2, {}, False),  # the total cap is reached
        (0, {"export": 1}, 5, {"export": 0, "query": 5}, True),
        (0, {"export": 1}, 1, {"export": 1}, False),  # its type's cap is reached
        (0, {"export": 0}, 9, {"export": 9}, True),  # 0: no cap for the type
        (0, {"export": 2, "query": 1}, 2, {"export": 1, "query": 1}, False),  # every cap holds
        (3, {"export": 2}, 2, {"export": 1}, True),
    ],
)
def test_admissible_is_openrems_start_condition(
    num_proc: int, per_type: dict[str, int], total: int, active: dict[str, int], admitted: bool
) -> None:
    limits = JobLimits("export", num_proc, per_type, 0)
    assert limits.admissible(total, active) is admitted


def test_queue_order_is_priority_then_first_come() -> None:
    early, late = job("early", at=0), job("late", at=5)
    urgent = job("urgent", at=9, priority=10)
    same_time_older = job("same-time-older", at=5, created=1)
    ordered = queue_order([late, early, same_time_older, urgent])
    assert [run.name for run in ordered] == ["urgent", "early", "same-time-older", "late"]


def test_queue_order_is_total_for_equal_runs() -> None:
    """Runs alike in everything are still ordered the same way every time (by id)."""
    twins = [job(f"twin-{i}", at=0) for i in range(5)]
    assert queue_order(twins) == queue_order(list(reversed(twins)))
    assert [r.id for r in queue_order(twins)] == sorted(r.id for r in twins)
