"""The background executor: starts queued background jobs when their limits allow.

``dicom-dispatch serve`` runs one (``run_background_executor``); more hosts can run
``python -m deployments.background_service`` against the same Prefect API. Each executor, in a
loop (every ``DICOM_DISPATCH_JOBS_POLL_SECONDS``, and at once when one of its jobs ends):

1. takes the admission lock (a global concurrency limit of 1, with a lease) on the server;
2. reads the queued ``background_job`` runs (priority, then first come first served) and the
   counters of active jobs (global concurrency limits ``background-job:total`` and
   ``background-job:type:<type>``, on the server, so every host's jobs count);
3. for each queued job whose ``num_proc`` / ``num_of_task_type`` allow it: takes one slot of
   the total and of its type's counter with a lease, and moves the run to Pending;
4. releases the lock and forks each admitted job's process (from a fork server that has
   Prefect imported already, so a job starts in milliseconds, not seconds).

The executor renews its jobs' leases, kills a job whose run is set to Cancelling (SIGKILL to the
job's process group) and marks it Cancelled, marks a run Crashed when its process dies without
ending it, and releases the slots only when the process is gone. If the executor itself dies,
its jobs die with it (parent-death signal) and the server revokes their leases after
``DICOM_DISPATCH_JOBS_LEASE_SECONDS`` (+ the repossessor's loop); the next executor on that host
marks their runs Crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, FlowRun, StateType
from prefect.client.schemas.responses import OrchestrationResult, SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError
from prefect.states import Cancelled, Crashed, Pending

from flows.background import (
    ACTIVE_STATES,
    ADMISSION_LOCK,
    COUNTER_CAPACITY,
    DEPLOYMENT_NAME,
    FLOW_NAME,
    FORCEFULLY_ABORTED,
    LIMIT_PREFIX,
    MIN_LEASE_SECONDS,
    TOTAL_COUNTER,
    JobLimits,
    ensure_counters,
    ensure_deployment,
    forget_deployment,
    queue_filter,
    queue_order,
    run_job_process,
    type_counter,
)

__all__ = ["BackgroundExecutor", "ExecutorSettings", "main", "run_background_executor"]

LOGGER = logging.getLogger("dicom_dispatch.jobs")
HOSTNAME = socket.gethostname()
EXECUTOR_STOPPED = "the background executor stopped"
RECONCILE_SECONDS = 30.0
#: A run left active by a dead process is only marked Crashed after this long in its state.
STALE_AFTER_SECONDS = 15.0
#: A run admitted (Pending) whose process never got started.
PENDING_TIMEOUT_SECONDS = 120.0
_PAGE = 200
#: Imported once by the fork server, so a job's process does not import them (names that do
#: not exist in another Prefect version are skipped by the fork server).
JOB_PRELOAD = [
    "flows.background",
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.events.worker",
    "prefect.logging.handlers",
    "prefect._internal.observers",
    "anyio._backends._asyncio",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
    "encodings.idna",
]


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class ExecutorSettings:
    """Tuning of one executor (environment variables, defaults below)."""

    #: Seconds between looks at the queue (a job of this executor ending triggers one at once).
    poll_seconds: float = 0.5
    #: Lease of a job's slots: how long the slots of a job whose executor died stay taken.
    lease_seconds: float = MIN_LEASE_SECONDS
    #: At most this many jobs run in this executor's processes (host protection, not a limit).
    max_processes: int = 16

    @classmethod
    def from_env(cls) -> ExecutorSettings:
        return cls(
            poll_seconds=max(0.05, _env_float("DICOM_DISPATCH_JOBS_POLL_SECONDS", 0.5)),
            lease_seconds=max(
                MIN_LEASE_SECONDS, _env_float("DICOM_DISPATCH_JOBS_LEASE_SECONDS", 60.0)
            ),
            max_processes=max(1, int(_env_float("DICOM_DISPATCH_JOBS_MAX_PROCESSES", 16))),
        )


@dataclass
class _Job:
    run_id: UUID
    task_type: str
    lease_id: UUID
    process: BaseProcess | None = None
    kill_reason: str | None = None  # "cancel" or "stop"
    kill_message: str = FORCEFULLY_ABORTED


def _process_context() -> BaseContext:
    """A fork server with ``flows.background`` (so Prefect) imported, where available."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(JOB_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _signal_group(pid: int, sig: int) -> None:
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, sig)


class BackgroundExecutor:
    """Admits queued background jobs under the server's lock and runs each in a process."""

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        self.settings = settings or ExecutorSettings.from_env()
        self._jobs: dict[UUID, _Job] = {}
        self._ctx: BaseContext | None = None
        self._wake = asyncio.Event()
        self._deployment_id: UUID | None = None
        self._client: PrefectClient | None = None
        self._queue_left = False  # the last look at the queue left jobs waiting
        self._last_watch = 0.0

    @property
    def running(self) -> int:
        return len(self._jobs)

    # ------------------------------------------------------------------ lifecycle

    def _prepare_api(self) -> None:
        with get_client(sync_client=True) as client:
            self._deployment_id = ensure_deployment(client)
            ensure_counters(client)

    def _prepare(self) -> None:
        self._prepare_api()
        self._ctx = _process_context()
        if self._ctx.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then stop this executor's jobs (they end Crashed)."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self._prepare)
                break
            except Exception as exc:  # noqa: BLE001 - the API may not be up yet
                LOGGER.warning("background executor: cannot prepare yet: %s", exc)
                await self._sleep(stop, 5.0)
        if stop.is_set():
            return
        LOGGER.info(
            "background executor on %s: poll %.2f s, lease %.0f s, at most %d processes",
            HOSTNAME,
            self.settings.poll_seconds,
            self.settings.lease_seconds,
            self.settings.max_processes,
        )
        async with get_client() as client:
            self._client = client
            next_renew = time.monotonic() + self.settings.lease_seconds / 4
            next_reconcile = time.monotonic()
            failures = 0
            try:
                while not stop.is_set():
                    self._wake.clear()
                    try:
                        await self._reap()
                        if self._jobs and (
                            time.monotonic() - self._last_watch >= self.settings.poll_seconds
                        ):
                            self._last_watch = time.monotonic()
                            await self._watch_cancellations()
                        if time.monotonic() >= next_renew:
                            await self._renew()
                            next_renew = time.monotonic() + self.settings.lease_seconds / 4
                        if time.monotonic() >= next_reconcile:
                            await self._reconcile()
                            next_reconcile = time.monotonic() + RECONCILE_SECONDS
                        await self._admit()
                        failures = 0
                    except Exception as exc:  # noqa: BLE001 - the API may be restarting
                        failures += 1
                        LOGGER.warning(
                            "background executor: %s: %s", type(exc).__name__, exc, exc_info=False
                        )
                    delay = self.settings.poll_seconds * (1 if failures == 0 else min(8, failures))
                    await self._sleep(stop, delay)
            finally:
                await self._shutdown()

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _shutdown(self) -> None:
        for job in self._jobs.values():
            self._kill(job, "stop", EXECUTOR_STOPPED)
        deadline = time.monotonic() + 10
        while self._jobs and time.monotonic() < deadline:
            try:
                await self._reap()
            except Exception:  # noqa: BLE001 - the API is gone: the leases will expire
                break
            if self._jobs:
                await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ admission

    @property
    def client(self) -> PrefectClient:
        assert self._client is not None
        return self._client

    @contextlib.asynccontextmanager
    async def _admission_lock(self) -> AsyncIterator[bool]:
        try:
            response = await self.client.increment_concurrency_slots_with_lease(
                names=[ADMISSION_LOCK],
                slots=1,
                mode="concurrency",
                lease_duration=MIN_LEASE_SECONDS,
            )
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code == 423:  # another executor is admitting: next round
                yield False
                return
            raise
        body = response.json()
        lease_id = UUID(body["lease_id"])
        try:
            if not body.get("limits"):  # the lock was deleted: recreate it, retry next round
                await asyncio.to_thread(self._recreate_counters)
                self._wake.set()
                yield False
            else:
                yield True
        finally:
            await self._release(lease_id)

    def _recreate_counters(self) -> None:
        with get_client(sync_client=True) as client:
            ensure_counters(client)

    async def _read_runs(self, flow_run_filter: FlowRunFilter) -> list[FlowRun]:
        runs: list[FlowRun] = []
        while True:
            page = await self.client.read_flow_runs(
                flow_run_filter=flow_run_filter,
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=_PAGE,
                offset=len(runs),
            )
            runs.extend(page)
            if len(page) < _PAGE:
                return runs

    async def _counters(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        offset = 0
        while True:
            page = await self.client.read_global_concurrency_limits(limit=_PAGE, offset=offset)
            for limit in page:
                if limit.name.startswith(LIMIT_PREFIX):
                    counts[limit.name] = limit.active_slots
            if len(page) < _PAGE:
                return counts
            offset += len(page)

    async def _take_slots(self, run_id: UUID, task_type: str) -> UUID:
        """One slot of the total and of the type's counter, with a lease (never refused)."""
        names = [TOTAL_COUNTER, type_counter(task_type)]
        for attempt in range(2):
            response = await self.client.increment_concurrency_slots_with_lease(
                names=names,
                slots=1,
                mode="concurrency",
                lease_duration=self.settings.lease_seconds,
                holder=ConcurrencyLeaseHolder(type="flow_run", id=run_id),
            )
            body = response.json()
            lease_id = UUID(body["lease_id"])
            if {limit["name"] for limit in body.get("limits", [])} == set(names):
                return lease_id
            await self._release(lease_id)  # a counter was missing (skipped): create it
            if attempt == 0:
                await self._create_counter(type_counter(task_type))
                await self._create_counter(TOTAL_COUNTER)
        raise RuntimeError(f"could not take the counters {names}")

    async def _create_counter(self, name: str) -> None:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

        with contextlib.suppress(ObjectAlreadyExists):
            await self.client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=COUNTER_CAPACITY)
            )

    async def _release(self, lease_id: UUID) -> None:
        try:
            await self.client.release_concurrency_slots_with_lease(lease_id)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code not in (404, 410):
                raise

    async def _admit(self) -> None:
        if len(self._jobs) >= self.settings.max_processes or self._deployment_id is None:
            return
        flt = queue_filter(self._deployment_id)
        if not self._queue_left and not await self.client.count_flow_runs(flow_run_filter=flt):
            return  # a cheap look first: the lock and a full read only when jobs wait
        admitted: list[_Job] = []
        async with self._admission_lock() as held:
            if not held:
                return
            now = time.time()
            queue = [
                r
                for r in queue_order(await self._read_runs(flt))
                if r.next_scheduled_start_time is None
                or r.next_scheduled_start_time.timestamp() <= now
            ]
            self._queue_left = bool(queue)
            if not queue:
                return
            counts = await self._counters()
            total = counts.get(TOTAL_COUNTER, 0)
            per_type = {
                name.removeprefix(type_counter("")): n
                for name, n in counts.items()
                if name.startswith(type_counter(""))
            }
            for run in queue:
                if len(self._jobs) >= self.settings.max_processes:
                    break
                if run.id in self._jobs:  # retried while its last process is still exiting
                    continue
                limits = JobLimits.of(run)
                if not limits.admissible(total, per_type):
                    continue
                lease_id = await self._take_slots(run.id, limits.task_type)
                result: OrchestrationResult[Any] = await self.client.set_flow_run_state(
                    run.id, Pending()
                )
                if result.status != SetStateStatus.ACCEPT:
                    await self._release(lease_id)  # cancelled or taken meanwhile
                    continue
                total += 1
                per_type[limits.task_type] = per_type.get(limits.task_type, 0) + 1
                self._queue_left = len(admitted) + 1 < len(queue)
                LOGGER.debug("job %s admitted", run.id)
                job = _Job(run.id, limits.task_type, lease_id)
                self._jobs[run.id] = job
                admitted.append(job)
        for job in admitted:
            await self._start(job)

    async def _start(self, job: _Job) -> None:
        try:
            process = await asyncio.to_thread(self._spawn, job.run_id)
        except Exception as exc:  # noqa: BLE001
            LOGGER.exception("could not start the process of job %s", job.run_id)
            self._jobs.pop(job.run_id, None)
            await self.client.set_flow_run_state(
                job.run_id, Crashed(message=f"the job's process could not start: {exc}"), force=True
            )
            await self._release(job.lease_id)
            return
        job.process = process
        LOGGER.debug("job %s: process %s started", job.run_id, process.pid)
        loop = asyncio.get_running_loop()
        loop.add_reader(process.sentinel, self._on_exit, process.sentinel)
        await self.client.update_flow_run(
            job.run_id, infrastructure_pid=f"{HOSTNAME}:{process.pid}"
        )

    def _spawn(self, run_id: UUID) -> BaseProcess:
        assert self._ctx is not None
        process: BaseProcess = self._ctx.Process(  # type: ignore[attr-defined]
            target=run_job_process, args=(str(run_id),), name=f"background-job-{run_id}"
        )
        process.start()
        return process

    def _on_exit(self, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        self._wake.set()

    # ------------------------------------------------------------------ running jobs

    async def _reap(self) -> None:
        for job in list(self._jobs.values()):
            if job.process is None or job.process.exitcode is None:
                continue
            code = job.process.exitcode
            LOGGER.debug("job %s: process exited with %s", job.run_id, code)
            await self._finish(job, code)
            self._jobs.pop(job.run_id, None)
            with contextlib.suppress(ValueError):
                job.process.close()

    async def _finish(self, job: _Job, code: int) -> None:
        """The job's process is gone: free its slots, then make its run final (so a run that
        this executor ends Cancelled or Crashed has its slots free when it shows that)."""
        await self._release(job.lease_id)
        run = await self.client.read_flow_run(job.run_id)
        state = run.state
        cancelling = state is not None and state.is_cancelling()
        if job.kill_reason == "cancel" or cancelling:
            if state is None or state.type not in (StateType.COMPLETED, StateType.CANCELLED):
                message = job.kill_message if job.kill_reason else None
                message = message or (state.message if state else None) or FORCEFULLY_ABORTED
                await self.client.set_flow_run_state(
                    job.run_id, Cancelled(message=message), force=True
                )
        elif state is not None and state.type in (StateType.PENDING, StateType.RUNNING):
            # (Scheduled means someone queued it again meanwhile, e.g. "Retry" in the UI.)
            message = (
                EXECUTOR_STOPPED
                if job.kill_reason == "stop"
                else f"the job's process exited with code {code} without ending its run"
            )
            await self.client.set_flow_run_state(job.run_id, Crashed(message=message), force=True)
        LOGGER.info("job %s ended (process exit code %s)", job.run_id, code)

    def _kill(self, job: _Job, reason: str, message: str) -> None:
        """SIGKILL the job's process group (the job's code runs in a worker thread of its
        process, so a SIGTERM could not stop it anyway)."""
        if job.kill_reason is not None:
            return
        job.kill_reason = reason
        job.kill_message = message
        if job.process is not None and job.process.pid and job.process.exitcode is None:
            _signal_group(job.process.pid, signal.SIGKILL)

    async def _watch_cancellations(self) -> None:
        ids = [
            job.run_id
            for job in self._jobs.values()
            if job.kill_reason is None and job.process is not None
        ]
        if not ids:
            return
        runs = await self._read_runs(
            FlowRunFilter(
                id=FlowRunFilterId(any_=ids),
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.CANCELLING, StateType.CANCELLED])
                ),
            )
        )
        for run in runs:
            job = self._jobs.get(run.id)
            if job is not None:
                LOGGER.info("terminating job %s", run.id)
                message = (run.state.message if run.state else None) or FORCEFULLY_ABORTED
                self._kill(job, "cancel", message)

    async def _renew(self) -> None:
        for job in list(self._jobs.values()):
            try:
                await self.client.renew_concurrency_lease(job.lease_id, self.settings.lease_seconds)
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code not in (404, 410):
                    raise
                # The lease is gone (server restarted with memory lease storage, or down for
                # longer than the lease): take the slots again so the job keeps counting.
                LOGGER.warning("lease of job %s was lost; taking its slots again", job.run_id)
                job.lease_id = await self._take_slots(job.run_id, job.task_type)

    async def _refresh_deployment(self) -> None:
        """Follow the deployment if it was deleted and created again."""
        try:
            deployment = await self.client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT_NAME}")
        except ObjectNotFound:
            forget_deployment()
            await asyncio.to_thread(self._prepare_api)
            return
        self._deployment_id = deployment.id

    async def _reconcile(self) -> None:
        """Mark runs Crashed whose process on this host is gone (left by a dead executor)."""
        await self._refresh_deployment()
        if self._deployment_id is None:
            return
        runs = await self._read_runs(
            FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[self._deployment_id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(ACTIVE_STATES))),
            )
        )
        now = time.time()
        for run in runs:
            if run.id in self._jobs or run.state is None:
                continue
            age = now - run.state.timestamp.timestamp()
            host, _, pid = (run.infrastructure_pid or "").rpartition(":")
            if run.infrastructure_pid is None:
                stale = run.state.type == StateType.PENDING and age > PENDING_TIMEOUT_SECONDS
                why = "the job was admitted but its process never started"
            else:
                stale = (
                    host == HOSTNAME
                    and pid.isdigit()
                    and age > STALE_AFTER_SECONDS
                    and not _pid_alive(int(pid))
                )
                why = f"the job's process {run.infrastructure_pid} is gone ({EXECUTOR_STOPPED})"
            if stale:
                LOGGER.warning("job %s: %s", run.id, why)
                await self.client.set_flow_run_state(run.id, Crashed(message=why), force=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def run_background_executor(stop: asyncio.Event) -> None:
    """Execute background jobs until ``stop`` is set (``dicom-dispatch serve`` runs this)."""
    await BackgroundExecutor().run(stop)


def main(argv: list[str] | None = None) -> int:
    """``python -m deployments.background_service``: an executor on this host."""
    import argparse

    from deployments.environment import prepare_environment, read_service_record

    parser = argparse.ArgumentParser(
        prog="python -m deployments.background_service",
        description="Run queued dicom-dispatch background jobs on this host.",
    )
    parser.parse_args(argv)
    home = prepare_environment()
    if not os.environ.get("PREFECT_API_URL"):
        record = read_service_record(home)
        if record is None:
            print(
                "background executor: no Prefect API; set PREFECT_API_URL or start "
                "dicom-dispatch serve",
                file=sys.stderr,
            )
            return 2
        os.environ["PREFECT_API_URL"] = str(record["api_url"])
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("dicom_dispatch")
    ours.addHandler(handler)
    ours.setLevel(os.environ.get("DICOM_DISPATCH_LOG_LEVEL", "INFO"))
    ours.propagate = False

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("background executor running", flush=True)
        await run_background_executor(stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
