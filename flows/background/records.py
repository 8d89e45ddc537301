"""What a caller reads about a job: OpenREM's record shapes, made from the job's flow run.

A job has no table of its own: its flow run is the record (state, times, process) and its
parameters carry the limits the executor admits it by, so one mapping, :func:`record_of`, turns
a run into OpenREM's ``BackgroundTask``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect.client.schemas.objects import FlowRun, StateType

__all__ = [
    "ACTIVE_STATES",
    "AWAITING_SLOT",
    "FORCEFULLY_ABORTED",
    "INFO_DESCRIPTION",
    "REMOVED_FROM_QUEUE",
    "BackgroundTask",
    "JobLimits",
    "JobListing",
    "QueuedTask",
    "record_of",
]

#: The state name of a queued job (Prefect's own name for a run waiting for a slot).
AWAITING_SLOT = "AwaitingConcurrencySlot"
FORCEFULLY_ABORTED = "Forcefully aborted"
REMOVED_FROM_QUEUE = "Removed from queue"
#: The description of the markdown artifact that holds a job's info (``record_task_info``).
INFO_DESCRIPTION = "Background job info"
#: States of a job that holds its slots (admitted and not yet ended).
ACTIVE_STATES = (StateType.PENDING, StateType.RUNNING, StateType.CANCELLING)


@dataclass(frozen=True)
class BackgroundTask:
    """One job's record, with OpenREM's ``BackgroundTask`` field names.

    ``uuid`` is the flow run id (``id`` is an alias); ``proc_id`` is ``host:pid`` of the job's
    process; ``state`` is the Prefect state name (``AwaitingConcurrencySlot``, ``Running``,
    ``Completed``, ``Failed``, ``Crashed``, ``Cancelled`` ...).
    """

    uuid: str
    task_type: str
    info: str | None
    error: str | None
    complete: bool
    completed_successfully: bool
    started_at: dt.datetime | None
    created_at: dt.datetime | None
    ended_at: dt.datetime | None
    proc_id: str | None
    state: str
    state_type: str
    func: str = ""
    priority: int = 0
    num_proc: int = 0
    num_of_task_type: dict[str, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.uuid

    @property
    def queued(self) -> bool:
        return self.state_type == StateType.SCHEDULED.value

    @property
    def active(self) -> bool:
        return self.state_type in {s.value for s in ACTIVE_STATES}

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            out[key] = value.isoformat() if isinstance(value, dt.datetime) else value
        return out


@dataclass(frozen=True)
class QueuedTask:
    """A job waiting to start; positions are 1, 2, 3 ... in the order the executor tries them."""

    task_id: str
    task_type: str
    queue_position: int


@dataclass(frozen=True)
class JobListing:
    """``list_tasks``: queued (with positions), active, and recently ended jobs."""

    queued: list[tuple[QueuedTask, BackgroundTask]]
    active: list[BackgroundTask]
    recent: list[BackgroundTask]


@dataclass(frozen=True)
class JobLimits:
    """What the executor needs to admit a job (from the run's parameters)."""

    task_type: str
    num_proc: int
    num_of_task_type: dict[str, int]
    priority: int

    @classmethod
    def of(cls, run: FlowRun) -> JobLimits:
        p = run.parameters
        limits = p.get("num_of_task_type") or {}
        return cls(
            task_type=str(p.get("task_type") or "default"),
            num_proc=int(p.get("num_proc") or 0),
            num_of_task_type={str(k): int(v) for k, v in dict(limits).items()},
            priority=int(p.get("priority") or 0),
        )

    def admissible(self, total: int, active: Mapping[str, int]) -> bool:
        """OpenREM's start condition: fewer than ``num_proc`` active in total (0 = no cap) and
        fewer than ``v`` active of type ``k`` for every ``k: v`` (0 = no cap)."""
        if self.num_proc > 0 and total >= self.num_proc:
            return False
        return all(v <= 0 or active.get(k, 0) < v for k, v in self.num_of_task_type.items())


def record_of(run: FlowRun, info: str | None = None) -> BackgroundTask:
    """The ``BackgroundTask`` of a job's flow run (``info``: its latest info artifact)."""
    state = run.state
    state_type = state.type if state else StateType.SCHEDULED
    message = state.message if state else None
    error: str | None = None
    if state_type == StateType.CANCELLED:
        error = message or FORCEFULLY_ABORTED
    elif state_type in (StateType.FAILED, StateType.CRASHED):
        error = message or state_type.value.title()
    limits = JobLimits.of(run)
    return BackgroundTask(
        uuid=str(run.id),
        task_type=limits.task_type,
        info=info,
        error=error,
        complete=bool(state and state.is_final()),
        completed_successfully=state_type == StateType.COMPLETED,
        started_at=run.start_time if run.run_count else None,  # Prefect also stamps removals
        created_at=run.created,
        ended_at=run.end_time,
        proc_id=run.infrastructure_pid,
        state=(state.name if state and state.name else state_type.value.title()),
        state_type=state_type.value,
        func=str(run.parameters.get("func", "")),
        priority=limits.priority,
        num_proc=limits.num_proc,
        num_of_task_type=limits.num_of_task_type,
    )
