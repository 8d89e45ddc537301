"""OpenREM's background-job API on Prefect: every job is a flow run of ``background_job``.

The names and meanings are OpenREM's (``remapp.tools.background``); the machinery is not::

    run_in_background*()    a flow run of the ``background_job/background-job`` deployment,
                            created in the state Scheduled/"AwaitingConcurrencySlot"; returns
                            at once. The flow run id is the task id.
    a background executor   (``dicom-dispatch serve``, or ``python -m
                            deployments.background_service`` on more hosts) admits queued runs
                            whose limits allow it and starts each in its own process.
    limits                  checked at admission, against every active job of every host, under
                            a server-side lock (a global concurrency limit of 1); active jobs are
                            lease-backed counters on the Prefect server (one per task type plus
                            a total), so a killed job or host gives its slots back by itself.

A waiting job is only a Scheduled flow run: it holds no process and no slot, so a burst of one
type never delays another type that is under its limits (OpenREM's waiters held a worker each).

Every function here is synchronous and talks to the Prefect API of the current settings
(``PREFECT_API_URL``) with its own client: call it from a web view, a script or a job, with no
event loop of the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling, Failed, Scheduled

from blocks.errors import (
    BackgroundJobError,
    JobNotFoundError,
    JobNotQueuedError,
    JobRefusedError,
)

__all__ = [
    "ACTIVE_STATES",
    "AWAITING_SLOT",
    "FORCEFULLY_ABORTED",
    "JOB_TAG",
    "REMOVED_FROM_QUEUE",
    "BackgroundJobError",
    "BackgroundTask",
    "JobListing",
    "JobNotFoundError",
    "JobNotQueuedError",
    "JobRefusedError",
    "QueuedTask",
    "background_job",
    "get_current_task",
    "get_or_generate_task_uuid",
    "get_queued_tasks",
    "get_task",
    "list_tasks",
    "record_task_error_exit",
    "record_task_info",
    "remove_task_from_queue",
    "run_in_background",
    "run_in_background_with_limits",
    "terminate_background",
    "wait_task",
]

LOGGER = logging.getLogger(__name__)

FLOW_NAME = "background_job"
DEPLOYMENT_NAME = "background-job"
ENTRYPOINT = "flows.background:background_job"
JOB_TAG = "background-job"
TYPE_TAG_PREFIX = "task-type:"
#: The state name of a queued job (Prefect's own name for a run waiting for a slot).
AWAITING_SLOT = "AwaitingConcurrencySlot"
FORCEFULLY_ABORTED = "Forcefully aborted"
REMOVED_FROM_QUEUE = "Removed from queue"
INFO_DESCRIPTION = "Background job info"

#: Global concurrency limits on the Prefect server: the admission lock, and counters of active
#: jobs (in total, per type). A counter's limit is never reached; the job limits are per call
#: and are checked against the counters under the lock.
LIMIT_PREFIX = "background-job:"
ADMISSION_LOCK = f"{LIMIT_PREFIX}admission"
TOTAL_COUNTER = f"{LIMIT_PREFIX}total"
COUNTER_CAPACITY = 1_000_000
#: The shortest lease the server accepts.
MIN_LEASE_SECONDS = 60.0

ACTIVE_STATES = (StateType.PENDING, StateType.RUNNING, StateType.CANCELLING)
_TASK_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PAGE = 200


def type_counter(task_type: str) -> str:
    """The name of the server-side counter of active jobs of ``task_type``."""
    return f"{LIMIT_PREFIX}type:{task_type}"


# --------------------------------------------------------------------------- errors


# --------------------------------------------------------------------------- records


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


def queue_order(runs: Sequence[FlowRun]) -> list[FlowRun]:
    """Higher ``priority`` first (OpenREM's CLI imports pass 10), then first come first served."""

    def key(run: FlowRun) -> tuple[int, float, float, str]:
        start = run.expected_start_time or run.created
        created = run.created.timestamp() if run.created else 0.0
        return (
            -JobLimits.of(run).priority,
            start.timestamp() if start else 0.0,
            created,
            str(run.id),
        )

    return sorted(runs, key=key)


def queue_filter(deployment_id: UUID) -> FlowRunFilter:
    return FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
    )


def _record(run: FlowRun, info: str | None = None) -> BackgroundTask:
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


# --------------------------------------------------------------------------- the client side


@contextmanager
def _client() -> Iterator[SyncPrefectClient]:
    with get_client(sync_client=True) as client:
        yield client


_DEPLOYMENTS: dict[str, UUID] = {}


def ensure_deployment(client: SyncPrefectClient, create: bool = True) -> UUID | None:
    """The id of ``background_job/background-job`` on this API (created if missing)."""
    key = str(client.api_url)
    if key in _DEPLOYMENTS:
        return _DEPLOYMENTS[key]
    try:
        deployment_id = client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT_NAME}").id
    except ObjectNotFound:
        if not create:
            return None
        from prefect.utilities.callables import parameter_schema

        flow_id = client.create_flow_from_name(FLOW_NAME)
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name=DEPLOYMENT_NAME,
            entrypoint=ENTRYPOINT,
            tags=[JOB_TAG],
            description=(
                "Background jobs (OpenREM's run_in_background): started by the dicom-dispatch "
                "background executor when their limits allow."
            ),
            parameter_openapi_schema=parameter_schema(background_job.fn).model_dump(
                exclude_unset=True
            ),
            enforce_parameter_schema=False,
        )
    _DEPLOYMENTS[key] = deployment_id
    return deployment_id


def forget_deployment() -> None:
    """Look the deployment up again next time (it was deleted)."""
    _DEPLOYMENTS.clear()


def ensure_counters(client: SyncPrefectClient, task_types: Sequence[str] = ()) -> None:
    """Create the admission lock and the counters (never with a limit of 0)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    wanted = {ADMISSION_LOCK: 1, TOTAL_COUNTER: COUNTER_CAPACITY}
    wanted.update({type_counter(t): COUNTER_CAPACITY for t in task_types})
    for name, limit in wanted.items():
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )
            except ObjectAlreadyExists:
                pass


@contextmanager
def _admission_lock(client: SyncPrefectClient, timeout: float = 30.0) -> Iterator[None]:
    """Hold the server-side admission lock (the executors admit jobs under it)."""
    from prefect.exceptions import PrefectHTTPStatusError

    deadline = time.monotonic() + timeout
    while True:
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[ADMISSION_LOCK],
                slots=1,
                mode="concurrency",
                lease_duration=MIN_LEASE_SECONDS,
            )
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise
            if time.monotonic() > deadline:
                raise BackgroundJobError(
                    f"the admission lock stayed taken for {timeout:.0f} s"
                ) from None
            time.sleep(0.1)
            continue
        body = response.json()
        lease_id = UUID(body["lease_id"])
        if body.get("limits"):
            break
        client.release_concurrency_slots_with_lease(lease_id)
        ensure_counters(client)  # the lock did not exist: create it, then take it
    try:
        yield
    finally:
        client.release_concurrency_slots_with_lease(lease_id)


def _func_ref(func: Any) -> str:
    """``module:name`` of a top-level function the job's process can import, or refuse."""
    if isinstance(func, str):
        module_name, sep, name = func.partition(":")
        if not sep or not module_name or not _IDENTIFIER.match(name):
            raise JobRefusedError(f"func {func!r} is not of the form 'module:function'")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not importable"
            raise JobRefusedError(
                f"func {func!r}: module {module_name!r} cannot be imported: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if not callable(getattr(module, name, None)):
            raise JobRefusedError(f"func {func!r}: {module_name} has no function {name!r}")
        return func
    if not callable(func):
        raise JobRefusedError(f"func must be a function or 'module:function', not {func!r}")
    owner: str | None = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", "")
    if qualname == "<lambda>" or "<" in qualname or "." in qualname:
        raise JobRefusedError(
            f"func {qualname or func!r} is not a top-level function (a lambda, nested function "
            "or method cannot be imported by the job's process)"
        )
    if not owner or owner == "__main__":
        raise JobRefusedError(
            f"func {qualname} is defined in __main__, which the job's process cannot import; "
            "move it into a module"
        )
    ref = f"{owner}:{qualname}"
    try:
        found = getattr(importlib.import_module(owner), qualname)
    except Exception:  # noqa: BLE001
        found = None
    if found is not func:
        raise JobRefusedError(f"func {ref} cannot be imported by that name")
    return ref


def _json_checked(
    args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    plain_args, plain_kwargs = list(args), dict(kwargs)
    plain: dict[str, Any] = {"args": plain_args, "kwargs": plain_kwargs}
    try:
        text = json.dumps(plain, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise JobRefusedError(f"the job's arguments are not JSON-serialisable: {exc}") from None
    if json.loads(text) != plain:
        raise JobRefusedError(
            "the job's arguments change in a JSON round trip (tuples, non-string keys?); "
            "pass lists and string-keyed dicts"
        )
    return plain_args, plain_kwargs


def _check_type(task_type: Any, what: str = "task_type") -> str:
    if not isinstance(task_type, str) or not _TASK_TYPE.match(task_type):
        raise JobRefusedError(
            f"{what} {task_type!r} must be 1-100 letters, digits, '_', '.', ':' or '-'"
        )
    return task_type


def _check_limits(num_proc: Any, num_of_task_type: Any) -> tuple[int, dict[str, int]]:
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 0:
        raise JobRefusedError(f"num_proc must be an integer >= 0 (0 = no cap), not {num_proc!r}")
    if num_of_task_type is None:
        num_of_task_type = {}
    if not isinstance(num_of_task_type, Mapping):
        raise JobRefusedError("num_of_task_type must be a dict of task type -> limit")
    limits: dict[str, int] = {}
    for key, value in num_of_task_type.items():
        _check_type(key, "num_of_task_type key")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise JobRefusedError(
                f"num_of_task_type[{key!r}] must be an integer >= 0 (0 = no cap), not {value!r}"
            )
        limits[key] = value
    return num_proc, limits


def run_in_background_with_limits(
    func: Any,
    task_type: str,
    num_proc: int,
    num_of_task_type: Mapping[str, int] | None,
    *args: Any,
    **kwargs: Any,
) -> BackgroundTask:
    """Queue ``func(*args, **kwargs)`` as a background job; returns its record at once.

    Args:
        func: A top-level function the executing process can import, or ``"module:name"``.
        task_type: The job's type (``import_rdsr``, ``export_ct``, ``query`` ...).
        num_proc: Start only while fewer than ``num_proc`` jobs are active in total; 0 = no cap.
        num_of_task_type: ``{type: n}``: start only while fewer than ``n`` jobs of ``type`` are
            active; keys may be other types (an NM import waiting for RDSR imports); 0 = no cap.
        *args: Positional arguments for ``func`` (JSON-serialisable).
        **kwargs: Keyword arguments for ``func`` (JSON-serialisable). ``priority=`` (int,
            default 0, higher first) is taken out, as Huey did in OpenREM.

    Returns:
        The job's ``BackgroundTask`` (state ``AwaitingConcurrencySlot``); ``.id`` is the task id.

    Raises:
        JobRefusedError: a lambda/nested/non-importable ``func``, non-JSON arguments, a bad type
            or limit; nothing was queued.
    """
    priority = kwargs.pop("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise JobRefusedError(f"priority must be an integer, not {priority!r}")
    ref = _func_ref(func)
    _check_type(task_type)
    num_proc, limits = _check_limits(num_proc, num_of_task_type)
    plain_args, plain_kwargs = _json_checked(args, kwargs)
    with _client() as client:
        try:
            run = _create_run(
                client, ref, task_type, num_proc, limits, priority, plain_args, plain_kwargs
            )
        except ObjectNotFound:  # the deployment was deleted since we looked it up
            _DEPLOYMENTS.pop(str(client.api_url), None)
            run = _create_run(
                client, ref, task_type, num_proc, limits, priority, plain_args, plain_kwargs
            )
    LOGGER.info("queued background job %s (%s %s)", run.id, task_type, ref)
    return _record(run)


def _create_run(
    client: SyncPrefectClient,
    ref: str,
    task_type: str,
    num_proc: int,
    limits: dict[str, int],
    priority: int,
    args: list[Any],
    kwargs: dict[str, Any],
) -> FlowRun:
    deployment_id = ensure_deployment(client)
    assert deployment_id is not None
    return client.create_flow_run_from_deployment(
        deployment_id,
        parameters={
            "func": ref,
            "args": args,
            "kwargs": kwargs,
            "task_type": task_type,
            "num_proc": num_proc,
            "num_of_task_type": limits,
            "priority": priority,
        },
        state=Scheduled(name=AWAITING_SLOT),
        name=f"{task_type} {ref}",
        tags=[JOB_TAG, f"{TYPE_TAG_PREFIX}{task_type}"],
    )


def run_in_background(func: Any, task_type: str, *args: Any, **kwargs: Any) -> BackgroundTask:
    """``run_in_background_with_limits`` with no limits: the job starts as soon as possible."""
    return run_in_background_with_limits(func, task_type, 0, {}, *args, **kwargs)


def _task_id(task: Any) -> UUID:
    value = getattr(task, "id", task)
    try:
        return value if isinstance(value, UUID) else UUID(str(value))
    except ValueError:
        raise JobNotFoundError(f"{value!r} is not a task id") from None


def _read_run(client: SyncPrefectClient, task: Any) -> FlowRun:
    try:
        return client.read_flow_run(_task_id(task))
    except ObjectNotFound:
        raise JobNotFoundError(f"no background job {task!s}") from None


def _infos(client: SyncPrefectClient, run_ids: Sequence[UUID]) -> dict[UUID, str]:
    """The latest info of each job (its info artifact)."""
    from prefect.client.schemas.objects import Artifact

    out: dict[UUID, str] = {}
    for start in range(0, len(run_ids), _PAGE // 4):
        chunk = [str(i) for i in run_ids[start : start + _PAGE // 4]]
        # Raw request: the client sends null flow/task-run filters, which this server version
        # refuses, and an empty task-run filter would drop artifacts without a task run.
        response = client.request(
            "POST",
            "/artifacts/filter",
            json={
                "artifacts": {"flow_run_id": {"any_": chunk}, "type": {"any_": ["markdown"]}},
                "sort": "CREATED_DESC",
                "limit": len(chunk) * 4,
                "offset": 0,
            },
        )
        for artifact in Artifact.model_validate_list(response.json()):
            run_id = artifact.flow_run_id
            if artifact.description == INFO_DESCRIPTION and run_id and run_id not in out:
                out[run_id] = str(artifact.data)
    return out


def get_task(task_id: Any) -> BackgroundTask:
    """The record of one job (handle, record or id), as OpenREM reads its ``BackgroundTask``."""
    with _client() as client:
        run = _read_run(client, task_id)
        return _record(run, _infos(client, [run.id]).get(run.id))


def _read_runs(client: SyncPrefectClient, flow_run_filter: FlowRunFilter) -> list[FlowRun]:
    runs: list[FlowRun] = []
    while True:
        page = client.read_flow_runs(
            flow_run_filter=flow_run_filter,
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=_PAGE,
            offset=len(runs),
        )
        runs.extend(page)
        if len(page) < _PAGE:
            return runs


def _queued(client: SyncPrefectClient, task_type: str | None) -> list[FlowRun]:
    deployment_id = ensure_deployment(client, create=False)
    if deployment_id is None:
        return []
    runs = queue_order(_read_runs(client, queue_filter(deployment_id)))
    if task_type is not None:
        runs = [r for r in runs if JobLimits.of(r).task_type == task_type]
    return runs


def get_queued_tasks(task_type: str | None = None) -> list[QueuedTask]:
    """Jobs waiting to start, in the order the executor tries them (priority, then FIFO).

    ``task_type`` is an exact match (OpenREM tested for a substring). Positions are 1, 2, 3 ...
    within the returned list, without gaps.
    """
    with _client() as client:
        runs = _queued(client, task_type)
    return [
        QueuedTask(task_id=str(r.id), task_type=JobLimits.of(r).task_type, queue_position=i)
        for i, r in enumerate(runs, start=1)
    ]


def list_tasks(task_type: str | None = None, recent_hours: float = 6.0) -> JobListing:
    """Queued (with positions), active, and recently ended jobs (OpenREM's task panels)."""
    with _client() as client:
        deployment_id = ensure_deployment(client, create=False)
        if deployment_id is None:
            return JobListing([], [], [])
        queued = _queued(client, task_type)
        active = _read_runs(
            client,
            FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(ACTIVE_STATES))),
            ),
        )
        since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=recent_hours)
        recent = _read_runs(
            client,
            FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(
                        any_=[
                            StateType.COMPLETED,
                            StateType.FAILED,
                            StateType.CRASHED,
                            StateType.CANCELLED,
                        ]
                    )
                ),
                end_time=FlowRunFilterEndTime(after_=since),
            ),
        )
        if task_type is not None:
            active = [r for r in active if JobLimits.of(r).task_type == task_type]
            recent = [r for r in recent if JobLimits.of(r).task_type == task_type]
        infos = _infos(client, [r.id for r in (*queued, *active, *recent)])
    recent.sort(
        key=lambda r: r.end_time or r.start_time or r.created or dt.datetime.min, reverse=True
    )
    return JobListing(
        queued=[
            (
                QueuedTask(str(r.id), JobLimits.of(r).task_type, i),
                _record(r, infos.get(r.id)),
            )
            for i, r in enumerate(queued, start=1)
        ],
        active=[_record(r, infos.get(r.id)) for r in active],
        recent=[_record(r, infos.get(r.id)) for r in recent],
    )


def remove_task_from_queue(task_id: Any) -> BackgroundTask:
    """Remove a queued job: it will never start (its run ends Cancelled, "Removed from queue").

    Raises:
        JobNotQueuedError: the job already started or ended; nothing was changed.
        JobNotFoundError: no such job.
    """
    with _client() as client:
        with _admission_lock(client):
            run = _read_run(client, task_id)
            if run.state is None or run.state.type != StateType.SCHEDULED:
                state = run.state.name if run.state else "unknown"
                raise JobNotQueuedError(
                    f"job {run.id} is not queued any more (state {state}); "
                    "use terminate_background to stop a running job"
                )
            client.set_flow_run_state(run.id, Cancelled(message=REMOVED_FROM_QUEUE), force=True)
        return _record(client.read_flow_run(run.id))


def _wait_final(client: SyncPrefectClient, run_id: UUID, timeout: float | None) -> FlowRun:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        if deadline is not None and time.monotonic() >= deadline:
            return run
        time.sleep(0.25)


def terminate_background(task: Any, timeout: float | None = 30.0) -> BackgroundTask:
    """Stop a job by force: its process is killed, it ends Cancelled, "Forcefully aborted".

    A queued job is cancelled before it starts. Waits up to ``timeout`` seconds (None: no limit,
    0: do not wait) for the job's process to be gone and its slots freed; returns the record.
    A job that already ended is left as it is.
    """
    with _client() as client:
        run = _read_run(client, task)
        if run.state is not None and run.state.is_final():
            return _record(run, _infos(client, [run.id]).get(run.id))
        if run.state is not None and run.state.type == StateType.SCHEDULED:
            with _admission_lock(client):
                run = client.read_flow_run(run.id)
                if run.state is not None and run.state.type == StateType.SCHEDULED:
                    client.set_flow_run_state(
                        run.id, Cancelled(message=FORCEFULLY_ABORTED), force=True
                    )
        if run.state is None or run.state.type != StateType.SCHEDULED:
            client.set_flow_run_state(run.id, Cancelling(message=FORCEFULLY_ABORTED), force=True)
        if timeout != 0:
            run = _wait_final(client, run.id, timeout)
        else:
            run = client.read_flow_run(run.id)
        return _record(run, _infos(client, [run.id]).get(run.id))


def wait_task(task: Any, timeout: float | None = None) -> BackgroundTask:
    """Block until the job has ended (any final state); returns its record.

    Raises:
        TimeoutError: the job did not end within ``timeout`` seconds.
    """
    with _client() as client:
        run = _wait_final(client, _read_run(client, task).id, timeout)
        if run.state is None or not run.state.is_final():
            raise TimeoutError(f"job {run.id} did not end within {timeout} s")
        return _record(run, _infos(client, [run.id]).get(run.id))


# --------------------------------------------------------------------------- inside a job


@dataclass
class _JobContext:
    run_id: str
    task_type: str
    error: str | None = None
    info_artifact: UUID | None = None


#: The job this process runs (one job per process).
_CURRENT_JOB: _JobContext | None = None


def get_current_task() -> BackgroundTask | None:
    """The running job's record inside a job; None elsewhere, and after
    ``record_task_error_exit`` (as in OpenREM)."""
    job = _CURRENT_JOB
    if job is None or job.error is not None:
        return None
    return get_task(job.run_id)


def get_or_generate_task_uuid() -> str:
    """Inside a job its task id, else a new uuid4 string."""
    job = _CURRENT_JOB
    return job.run_id if job is not None else str(uuid.uuid4())


def record_task_info(info_msg: str) -> None:
    """Inside a job: show ``info_msg`` as the job's info (its run's artifact, and the log).

    The UI shows it at once (the run's Artifacts tab); ``get_task(...).info`` returns it.
    Does nothing outside a job.
    """
    job = _CURRENT_JOB
    if job is None:
        return
    text = str(info_msg)
    logging.getLogger("dicom_dispatch.jobs").info("job %s: %s", job.run_id, text)
    with _client() as client:
        if job.info_artifact is None:
            artifact = client.create_artifact(
                ArtifactCreate(
                    type="markdown",
                    data=text,
                    description=INFO_DESCRIPTION,
                    flow_run_id=UUID(job.run_id),
                )
            )
            job.info_artifact = artifact.id
        else:
            client.update_artifact(job.info_artifact, ArtifactUpdate(data=text))


def record_task_error_exit(error_msg: str) -> None:
    """Inside a job: the job will end Failed with ``error_msg`` (when it really ends, which is
    also when its slots are released). ``get_current_task()`` returns None from now on."""
    job = _CURRENT_JOB
    if job is None:
        return
    job.error = str(error_msg)
    logging.getLogger("dicom_dispatch.jobs").error("job %s: %s", job.run_id, job.error)


def _job_traceback(exc: BaseException) -> str:
    """The traceback from the job's function on (without this module's and asyncio's frames)."""
    import asyncio.threads
    import concurrent.futures.thread

    wrappers = {__file__, asyncio.threads.__file__, concurrent.futures.thread.__file__}
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in wrappers:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def resolve_func(ref: str) -> Any:
    """Import ``module:name`` (in the job's process)."""
    module_name, _, name = ref.partition(":")
    return getattr(importlib.import_module(module_name), name)


@flow(name=FLOW_NAME, persist_result=False, validate_parameters=False)
async def background_job(
    func: str,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    task_type: str = "default",
    num_proc: int = 0,
    num_of_task_type: dict[str, int] | None = None,
    priority: int = 0,
) -> State[Any] | None:
    """One background job: ``func(*args, **kwargs)`` in this flow run's own process.

    ``task_type``, ``num_proc``, ``num_of_task_type`` and ``priority`` are read by the executor
    before the run starts. An exception ends the run Failed with its traceback;
    ``record_task_error_exit(msg)`` ends it Failed with ``msg``; ``sys.exit(n)`` with n != 0
    ends it Failed.
    """
    global _CURRENT_JOB
    from prefect.runtime import flow_run as current_run

    logger = get_run_logger()
    job = _JobContext(run_id=str(current_run.id), task_type=task_type)
    _CURRENT_JOB = job
    try:
        function = resolve_func(func)
        await asyncio.to_thread(function, *(args or []), **(kwargs or {}))
    except SystemExit as exc:
        if exc.code not in (None, 0) and job.error is None:
            job.error = f"the job called sys.exit({exc.code!r})"
    except Exception as exc:  # noqa: BLE001 - the job's failure is its record's error
        job.error = _job_traceback(exc)
        logger.error("job %s failed:\n%s", job.run_id, job.error)
    if job.error is not None:
        return Failed(message=job.error)
    return None


# --------------------------------------------------------------------------- the job process


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the process that forked us exits (no orphaned jobs)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _leave_fork_server() -> None:
    """Close the fork server's "alive" pipe that a forked child inherits: the fork server exits
    when the executor dies only once no process holds it (and then its jobs die with it)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


def run_job_process(flow_run_id: str) -> None:
    """The body of a job's process (forked by the executor): run the flow run to its end."""
    os.setsid()  # its own process group: terminating the job stops its children too
    _leave_fork_server()
    _die_with_parent()
    os.environ["PREFECT__FLOW_RUN_ID"] = flow_run_id
    from prefect.engine import handle_engine_signals
    from prefect.events.worker import EventsWorker
    from prefect.flow_engine import load_flow_run, run_flow
    from prefect.logging.handlers import APILogWorker

    run = load_flow_run(UUID(flow_run_id))
    try:
        with handle_engine_signals(run.id):
            outcome = run_flow(background_job, flow_run=run, return_type="state")
            if asyncio.iscoroutine(outcome):
                asyncio.run(outcome)
    finally:
        # A forked process ends with os._exit (no atexit hooks): ship the run's logs now.
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
