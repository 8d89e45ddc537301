"""The job queue as the Prefect server holds it: the deployment, the queue, the lock, the counters.

Everything that decides whether a job may start lives on the server, so every host sees the same::

    the queue           Scheduled runs of ``background_job/background-job``, tried in
                        :func:`queue_order` (priority, then first come first served)
    the admission lock  a global concurrency limit of 1 (``background-job:admission``), held
                        with a lease while an executor admits jobs or a caller unqueues one
    the counters        global concurrency limits ``background-job:total`` and
                        ``background-job:type:<type>`` whose active slots are the active jobs;
                        their limit is never reached (the job limits are per call and are
                        checked against the counts under the lock), and each slot is a lease,
                        so a dead host's jobs give their slots back by themselves

The API is synchronous and the executor asynchronous, so the few reads both need come in twins
(``read_runs`` / ``aread_runs``) built on the same request.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from uuid import UUID

from httpx import Response
from prefect.client.orchestration import PrefectClient, SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError

from blocks.errors import BackgroundJobError
from flows.background.flow import (
    DEPLOYMENT_NAME,
    ENTRYPOINT,
    FLOW_NAME,
    JOB_TAG,
    background_job,
)
from flows.background.records import ACTIVE_STATES, JobLimits
from tasks.paging import PAGE, read_all  # runs and limits are read in pages of PAGE

__all__ = [
    "ADMISSION_LOCK",
    "COUNTER_CAPACITY",
    "DEPLOYMENT_PATH",
    "MIN_LEASE_SECONDS",
    "PAGE",
    "TOTAL_COUNTER",
    "active_counts",
    "active_filter",
    "admission_lock",
    "aread_runs",
    "ended_filter",
    "ensure_counters",
    "ensure_deployment",
    "forget_deployment",
    "queue_filter",
    "queue_order",
    "read_runs",
    "release_slots",
    "take_slots",
    "try_admission_lock",
    "type_counter",
]

DEPLOYMENT_PATH = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
LIMIT_PREFIX = "background-job:"
ADMISSION_LOCK = f"{LIMIT_PREFIX}admission"
TOTAL_COUNTER = f"{LIMIT_PREFIX}total"
COUNTER_CAPACITY = 1_000_000
#: The shortest lease the server accepts.
MIN_LEASE_SECONDS = 60.0
_TYPE_COUNTER_PREFIX = f"{LIMIT_PREFIX}type:"
_LOCK_REQUEST: dict[str, Any] = {
    "names": [ADMISSION_LOCK],
    "slots": 1,
    "mode": "concurrency",
    "lease_duration": MIN_LEASE_SECONDS,
}


def type_counter(task_type: str) -> str:
    """The name of the server-side counter of active jobs of ``task_type``."""
    return f"{_TYPE_COUNTER_PREFIX}{task_type}"


# --------------------------------------------------------------------------- the queue


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


def _runs_in(deployment_id: UUID, *states: StateType, **more: Any) -> FlowRunFilter:
    return FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states))),
        **more,
    )


def queue_filter(deployment_id: UUID) -> FlowRunFilter:
    """The queued jobs (Scheduled, which includes a failed run retried from the UI)."""
    return _runs_in(deployment_id, StateType.SCHEDULED)


def active_filter(deployment_id: UUID) -> FlowRunFilter:
    """The jobs that hold slots."""
    return _runs_in(deployment_id, *ACTIVE_STATES)


def ended_filter(deployment_id: UUID, since: dt.datetime) -> FlowRunFilter:
    """The jobs that ended after ``since``."""
    return _runs_in(
        deployment_id,
        StateType.COMPLETED,
        StateType.FAILED,
        StateType.CRASHED,
        StateType.CANCELLED,
        end_time=FlowRunFilterEndTime(after_=since),
    )


def _run_page(flow_run_filter: FlowRunFilter, offset: int) -> dict[str, Any]:
    return {
        "flow_run_filter": flow_run_filter,
        "sort": FlowRunSort.EXPECTED_START_TIME_ASC,
        "limit": PAGE,
        "offset": offset,
    }


def read_runs(client: SyncPrefectClient, flow_run_filter: FlowRunFilter) -> list[FlowRun]:
    """Every run that matches (all pages)."""
    runs: list[FlowRun] = []
    while len(page := client.read_flow_runs(**_run_page(flow_run_filter, len(runs)))) == PAGE:
        runs.extend(page)
    return runs + page


async def aread_runs(client: PrefectClient, flow_run_filter: FlowRunFilter) -> list[FlowRun]:
    """:func:`read_runs` for the executor's client."""
    runs: list[FlowRun] = []
    while len(page := await client.read_flow_runs(**_run_page(flow_run_filter, len(runs)))) == PAGE:
        runs.extend(page)
    return runs + page


# --------------------------------------------------------------------------- the deployment

_DEPLOYMENTS: dict[str, UUID] = {}


def ensure_deployment(client: SyncPrefectClient, create: bool = True) -> UUID | None:
    """The id of ``background_job/background-job`` on this API (created if missing)."""
    key = str(client.api_url)
    if key in _DEPLOYMENTS:
        return _DEPLOYMENTS[key]
    try:
        deployment_id = client.read_deployment_by_name(DEPLOYMENT_PATH).id
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


# --------------------------------------------------------------------------- the lock


def _lease(response: Response) -> tuple[UUID, bool]:
    """The lease of an increment, and whether it counted on the named limits (a missing limit
    is skipped by the server, so an empty answer means "that limit does not exist")."""
    body = response.json()
    return UUID(body["lease_id"]), bool(body.get("limits"))


def _locked(exc: PrefectHTTPStatusError) -> bool:
    return exc.response.status_code == 423


@contextmanager
def admission_lock(client: SyncPrefectClient, timeout: float = 30.0) -> Iterator[None]:
    """Hold the admission lock, waiting up to ``timeout`` for it (a caller's change to the
    queue, such as unqueueing a job, cannot race an admission)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            lease_id, held = _lease(client.increment_concurrency_slots_with_lease(**_LOCK_REQUEST))
        except PrefectHTTPStatusError as exc:
            if not _locked(exc):
                raise
            if time.monotonic() > deadline:
                raise BackgroundJobError(
                    f"the admission lock stayed taken for {timeout:.0f} s"
                ) from None
            time.sleep(0.1)
            continue
        if held:
            break
        client.release_concurrency_slots_with_lease(lease_id)
        ensure_counters(client)  # the lock did not exist: create it, then take it
    try:
        yield
    finally:
        client.release_concurrency_slots_with_lease(lease_id)


@asynccontextmanager
async def try_admission_lock(client: PrefectClient) -> AsyncIterator[bool]:
    """One try at the admission lock (the executor's: when another executor is admitting, or
    the lock had to be created again, it comes back next round). Yields whether it is held."""
    try:
        response = await client.increment_concurrency_slots_with_lease(**_LOCK_REQUEST)
    except PrefectHTTPStatusError as exc:
        if not _locked(exc):
            raise
        yield False
        return
    lease_id, held = _lease(response)
    try:
        if not held:  # the lock was deleted: create it again
            await asyncio.to_thread(_ensure_counters_sync)
        yield held
    finally:
        await release_slots(client, lease_id)


# --------------------------------------------------------------------------- the counters


def ensure_counters(client: SyncPrefectClient, task_types: Sequence[str] = ()) -> None:
    """Create the admission lock and the counters (never with a limit of 0)."""
    wanted = {ADMISSION_LOCK: 1, TOTAL_COUNTER: COUNTER_CAPACITY}
    wanted.update({type_counter(t): COUNTER_CAPACITY for t in task_types})
    for name, limit in wanted.items():
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )


def _ensure_counters_sync() -> None:
    with get_client(sync_client=True) as client:
        ensure_counters(client)


async def active_counts(client: PrefectClient) -> tuple[int, dict[str, int]]:
    """Active jobs on every host: in total, and per type."""
    total = 0
    per_type: dict[str, int] = {}
    for limit in await read_all(
        lambda size, offset: client.read_global_concurrency_limits(limit=size, offset=offset)
    ):
        if limit.name == TOTAL_COUNTER:
            total = limit.active_slots
        elif limit.name.startswith(_TYPE_COUNTER_PREFIX):
            per_type[limit.name.removeprefix(_TYPE_COUNTER_PREFIX)] = limit.active_slots
    return total, per_type


async def take_slots(
    client: PrefectClient, run_id: UUID, task_type: str, lease_seconds: float
) -> UUID:
    """One slot of the total and of the type's counter, with a lease (never refused: the
    limits were checked under the lock). A missing counter is created and the take repeated."""
    names = [TOTAL_COUNTER, type_counter(task_type)]
    for attempt in range(2):
        response = await client.increment_concurrency_slots_with_lease(
            names=names,
            slots=1,
            mode="concurrency",
            lease_duration=max(MIN_LEASE_SECONDS, lease_seconds),
            holder=ConcurrencyLeaseHolder(type="flow_run", id=run_id),
        )
        body = response.json()
        lease_id = UUID(body["lease_id"])
        if {limit["name"] for limit in body.get("limits", [])} == set(names):
            return lease_id
        await release_slots(client, lease_id)
        if attempt == 0:
            for name in names:
                with contextlib.suppress(ObjectAlreadyExists):
                    await client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=COUNTER_CAPACITY)
                    )
    raise BackgroundJobError(f"could not take the counters {names}")


async def release_slots(client: PrefectClient, lease_id: UUID) -> None:
    """Give a lease's slots back (a lease the server already revoked is no error)."""
    try:
        await client.release_concurrency_slots_with_lease(lease_id)
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code not in (404, 410):
            raise
