"""OpenREM's background-job functions: queue a job, read its record, unqueue, terminate, wait.

Every function here is synchronous and talks to the Prefect API of the current settings
(``PREFECT_API_URL``) with its own client: call it from a web view, a script or a job, with no
event loop of the caller's. Queueing only creates a Scheduled run; starting it is the executor's
(``flows.background.executor``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import Artifact, FlowRun, StateType
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling, Scheduled

from blocks.errors import JobNotFoundError, JobNotQueuedError
from flows.background.checks import (
    check_allowed,
    check_limits,
    check_priority,
    check_type,
    func_ref,
    json_checked,
)
from flows.background.flow import JOB_TAG, TYPE_TAG_PREFIX
from flows.background.queue import (
    PAGE,
    active_filter,
    admission_lock,
    ended_filter,
    ensure_deployment,
    forget_deployment,
    queue_filter,
    queue_order,
    read_runs,
)
from flows.background.records import (
    AWAITING_SLOT,
    FORCEFULLY_ABORTED,
    INFO_DESCRIPTION,
    REMOVED_FROM_QUEUE,
    BackgroundTask,
    JobLimits,
    JobListing,
    QueuedTask,
    record_of,
)
from flows.background.registered import JobRegistry, registered_jobs

__all__ = [
    "get_queued_tasks",
    "get_task",
    "list_tasks",
    "remove_task_from_queue",
    "run_in_background",
    "run_in_background_with_limits",
    "terminate_background",
    "wait_task",
]

LOGGER = logging.getLogger(__name__)
#: Seconds the caller trusts its last read of the registry (a web view may queue many jobs).
REGISTRY_TTL = 10.0
_registry_read: tuple[float, JobRegistry] | None = None


# --------------------------------------------------------------------------- queueing


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
        JobRefusedError: a lambda/nested/non-importable ``func``, one outside the settings'
            functions registered as jobs on this host (``DICOM_DISPATCH_JOBS``, entry points
            ``dicom_dispatch.jobs``), non-JSON arguments, a bad type or limit; nothing was queued.
    """
    priority = check_priority(kwargs.pop("priority", 0))
    ref = func_ref(func)
    check_type(task_type)
    num_proc, limits = check_limits(num_proc, num_of_task_type)
    plain_args, plain_kwargs = json_checked(args, kwargs)
    parameters = {
        "func": ref,
        "args": plain_args,
        "kwargs": plain_kwargs,
        "task_type": task_type,
        "num_proc": num_proc,
        "num_of_task_type": limits,
        "priority": priority,
    }
    with get_client(sync_client=True) as client:
        check_allowed(ref, _registry())
        try:
            run = _create_run(client, parameters)
        except ObjectNotFound:  # the deployment was deleted since we looked it up
            forget_deployment()
            run = _create_run(client, parameters)
    LOGGER.info("queued background job %s (%s %s)", run.id, task_type, ref)
    return record_of(run)


def _registry() -> JobRegistry:
    """This host's registered jobs (the executor decides on its own host; this is for an early
    error, so register the functions on the hosts that queue jobs too)."""
    global _registry_read
    now = time.monotonic()
    if _registry_read is None or now - _registry_read[0] >= REGISTRY_TTL:
        _registry_read = (now, registered_jobs())
    return _registry_read[1]


def _create_run(client: SyncPrefectClient, parameters: dict[str, Any]) -> FlowRun:
    deployment_id = ensure_deployment(client)
    assert deployment_id is not None
    task_type = parameters["task_type"]
    return client.create_flow_run_from_deployment(
        deployment_id,
        parameters=parameters,
        state=Scheduled(name=AWAITING_SLOT),
        name=f"{task_type} {parameters['func']}",
        tags=[JOB_TAG, f"{TYPE_TAG_PREFIX}{task_type}"],
    )


def run_in_background(func: Any, task_type: str, *args: Any, **kwargs: Any) -> BackgroundTask:
    """``run_in_background_with_limits`` with no limits: the job starts as soon as possible."""
    return run_in_background_with_limits(func, task_type, 0, {}, *args, **kwargs)


# --------------------------------------------------------------------------- records


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
    out: dict[UUID, str] = {}
    for start in range(0, len(run_ids), PAGE // 4):
        chunk = [str(i) for i in run_ids[start : start + PAGE // 4]]
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


def _full_record(client: SyncPrefectClient, run: FlowRun) -> BackgroundTask:
    return record_of(run, _infos(client, [run.id]).get(run.id))


def get_task(task_id: Any) -> BackgroundTask:
    """The record of one job (handle, record or id), as OpenREM reads its ``BackgroundTask``."""
    with get_client(sync_client=True) as client:
        return _full_record(client, _read_run(client, task_id))


def _of_type(runs: list[FlowRun], task_type: str | None) -> list[FlowRun]:
    return (
        runs if task_type is None else [r for r in runs if JobLimits.of(r).task_type == task_type]
    )


def _queued(client: SyncPrefectClient, task_type: str | None) -> list[FlowRun]:
    deployment_id = ensure_deployment(client, create=False)
    if deployment_id is None:
        return []
    return _of_type(queue_order(read_runs(client, queue_filter(deployment_id))), task_type)


def get_queued_tasks(task_type: str | None = None) -> list[QueuedTask]:
    """Jobs waiting to start, in the order the executor tries them (priority, then FIFO).

    ``task_type`` is an exact match (OpenREM tested for a substring). Positions are 1, 2, 3 ...
    within the returned list, without gaps.
    """
    with get_client(sync_client=True) as client:
        runs = _queued(client, task_type)
    return [
        QueuedTask(task_id=str(r.id), task_type=JobLimits.of(r).task_type, queue_position=i)
        for i, r in enumerate(runs, start=1)
    ]


def list_tasks(task_type: str | None = None, recent_hours: float = 6.0) -> JobListing:
    """Queued (with positions), active, and recently ended jobs (OpenREM's task panels)."""
    with get_client(sync_client=True) as client:
        deployment_id = ensure_deployment(client, create=False)
        if deployment_id is None:
            return JobListing([], [], [])
        queued = _queued(client, task_type)
        active = _of_type(read_runs(client, active_filter(deployment_id)), task_type)
        since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=recent_hours)
        recent = _of_type(read_runs(client, ended_filter(deployment_id, since)), task_type)
        infos = _infos(client, [r.id for r in (*queued, *active, *recent)])
    recent.sort(
        key=lambda r: r.end_time or r.start_time or r.created or dt.datetime.min, reverse=True
    )
    return JobListing(
        queued=[
            (
                QueuedTask(str(r.id), JobLimits.of(r).task_type, i),
                record_of(r, infos.get(r.id)),
            )
            for i, r in enumerate(queued, start=1)
        ],
        active=[record_of(r, infos.get(r.id)) for r in active],
        recent=[record_of(r, infos.get(r.id)) for r in recent],
    )


# --------------------------------------------------------------------------- stopping, waiting


def remove_task_from_queue(task_id: Any) -> BackgroundTask:
    """Remove a queued job: it will never start (its run ends Cancelled, "Removed from queue").

    Raises:
        JobNotQueuedError: the job already started or ended; nothing was changed.
        JobNotFoundError: no such job.
    """
    with get_client(sync_client=True) as client:
        with admission_lock(client):
            run = _read_run(client, task_id)
            if run.state is None or run.state.type != StateType.SCHEDULED:
                state = run.state.name if run.state else "unknown"
                raise JobNotQueuedError(
                    f"job {run.id} is not queued any more (state {state}); "
                    "use terminate_background to stop a running job"
                )
            client.set_flow_run_state(run.id, Cancelled(message=REMOVED_FROM_QUEUE), force=True)
        return record_of(client.read_flow_run(run.id))


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
    with get_client(sync_client=True) as client:
        run = _read_run(client, task)
        if run.state is not None and run.state.is_final():
            return _full_record(client, run)
        if run.state is not None and run.state.type == StateType.SCHEDULED:
            with admission_lock(client):
                run = client.read_flow_run(run.id)
                if run.state is not None and run.state.type == StateType.SCHEDULED:
                    client.set_flow_run_state(
                        run.id, Cancelled(message=FORCEFULLY_ABORTED), force=True
                    )
        if run.state is None or run.state.type != StateType.SCHEDULED:
            # The executor that runs it sees Cancelling, kills its process, ends it Cancelled.
            client.set_flow_run_state(run.id, Cancelling(message=FORCEFULLY_ABORTED), force=True)
        if timeout != 0:
            run = _wait_final(client, run.id, timeout)
        else:
            run = client.read_flow_run(run.id)
        return _full_record(client, run)


def wait_task(task: Any, timeout: float | None = None) -> BackgroundTask:
    """Block until the job has ended (any final state); returns its record.

    Raises:
        TimeoutError: the job did not end within ``timeout`` seconds.
    """
    with get_client(sync_client=True) as client:
        run = _wait_final(client, _read_run(client, task).id, timeout)
        if run.state is None or not run.state.is_final():
            raise TimeoutError(f"job {run.id} did not end within {timeout} s")
        return _full_record(client, run)
