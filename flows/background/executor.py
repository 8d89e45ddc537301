"""The background executor: where a queued job is admitted, started, watched and ended.

``dicom-dispatch serve`` runs one; more hosts can run ``python -m deployments.background_service``
against the same Prefect API. Each executor, in a loop (every ``jobs_poll_seconds`` of
``DispatcherSettings``, and at once when one of its jobs ends):

1. takes the admission lock on the server (``queue.try_admission_lock``);
2. reads the queued ``background_job`` runs (``queue.queue_order``) and the counts of active
   jobs on every host (``queue.active_counts``);
3. ends Failed, without starting anything, each queued job whose ``func`` is not registered as
   a job on this host (``checks.refused_func``: anyone who can create a run names its ``func``);
   for each other queued job whose ``num_proc`` / ``num_of_task_type`` allow it
   (``JobLimits.admissible``): takes one slot of the total and of its type's counter with a
   lease (``queue.take_slots``) and moves the run to Pending (``BackgroundExecutor.admit``);
4. releases the lock and forks each admitted job's process (``process.start_job_process``).

The executor renews its jobs' leases, kills a job whose run is set to Cancelling (SIGKILL to the
job's process group) and marks it Cancelled, marks a run Crashed when its process dies without
ending it, and releases the slots only when the process is gone. If the executor itself dies,
its jobs die with it (parent-death signal) and the server revokes their leases after
``jobs_lease_seconds`` (+ the repossessor's loop); the next executor on that host marks their
runs Crashed.

(Just over 400 lines: one class whose steps share the table of running jobs and the client; the
server-side pieces are in ``queue``, the process in ``process``.)

Over 400 lines on purpose: admission, the job processes and their leases are one state
machine; split, each part would need the others' invariants restated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import OrchestrationResult, SetStateStatus
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.states import Cancelled, Crashed, Failed, Pending

from blocks.errors import one_line
from flows.background.checks import refused_func
from flows.background.process import (
    job_process_context,
    kill_process_group,
    pid_alive,
    start_job_process,
)
from flows.background.queue import (
    DEPLOYMENT_PATH,
    active_counts,
    active_filter,
    aread_runs,
    ensure_counters,
    ensure_deployment,
    forget_deployment,
    queue_filter,
    queue_order,
    release_slots,
    take_slots,
    try_admission_lock,
)
from flows.background.records import FORCEFULLY_ABORTED, JobLimits
from flows.background.settings import ExecutorSettings
from tasks.periodic import Periodic

__all__ = ["BackgroundExecutor", "ExecutorSettings", "run_background_executor"]

LOGGER = logging.getLogger(__name__)
HOSTNAME = socket.gethostname()
EXECUTOR_STOPPED = "the background executor stopped"
#: How often the executor looks for runs left by a dead executor (and re-reads its settings).
RECONCILE_SECONDS = 30.0
#: Seconds between tries to start while the API does not answer yet.
PREPARE_RETRY_SECONDS = 5.0
#: A run left active by a dead process is only marked Crashed after this long in its state.
STALE_AFTER_SECONDS = 15.0
#: A run admitted (Pending) whose process never got started.
PENDING_TIMEOUT_SECONDS = 120.0


@dataclass
class _Job:
    run_id: UUID
    task_type: str
    lease_id: UUID
    process: BaseProcess | None = None
    kill_reason: str | None = None  # "cancel" or "stop"
    kill_message: str = FORCEFULLY_ABORTED


class BackgroundExecutor:
    """Admits queued background jobs under the server's lock and runs each in a process.

    ``settings``: fixed tuning (tests, benchmarks); without it the executor reads
    ``DispatcherSettings`` when it starts and again every ``RECONCILE_SECONDS``.
    """

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        self.settings = settings or ExecutorSettings()
        self._follow_settings = settings is None
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

    @property
    def client(self) -> PrefectClient:
        assert self._client is not None
        return self._client

    # ------------------------------------------------------------------ lifecycle

    def _prepare_api(self) -> None:
        with get_client(sync_client=True) as client:
            self._deployment_id = ensure_deployment(client)
            ensure_counters(client)

    async def _prepare(self) -> None:
        if self._follow_settings:
            self.settings = await ExecutorSettings.aload()
        await asyncio.to_thread(self._prepare_api)
        self._ctx = await asyncio.to_thread(job_process_context)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then stop this executor's jobs (they end Crashed)."""
        # The API may not be up yet: tried again every few seconds until it answers.
        await Periodic(
            "background executor start",
            self._prepare,
            PREPARE_RETRY_SECONDS,
            wait_first=False,
            until_success=True,
            error_level=logging.WARNING,
            logger=LOGGER,
        ).run(stop, self._wake)
        if stop.is_set():
            return
        LOGGER.info(
            "background executor on %s: poll %.2f s, lease %.0f s, at most %d processes, "
            "%d registered job functions",
            HOSTNAME,
            self.settings.poll_seconds,
            self.settings.lease_seconds,
            self.settings.max_processes,
            len(self.settings.jobs.jobs),
        )
        async with get_client() as client:
            self._client = client
            try:
                await self._loop(stop)
            finally:
                await self._shutdown()

    async def _loop(self, stop: asyncio.Event) -> None:
        """Admission every ``poll_seconds`` (sooner when a job ends), spaced out up to eight
        times while the API fails (it may be restarting)."""
        deadlines = {"renew": time.monotonic() + self.settings.lease_seconds / 4, "reconcile": 0.0}

        async def step() -> None:
            await self._reap()
            if self._jobs and time.monotonic() - self._last_watch >= self.settings.poll_seconds:
                self._last_watch = time.monotonic()
                await self._watch_cancellations()
            if time.monotonic() >= deadlines["renew"]:
                await self._renew()
                deadlines["renew"] = time.monotonic() + self.settings.lease_seconds / 4
            if time.monotonic() >= deadlines["reconcile"]:
                await self._reconcile()
                deadlines["reconcile"] = time.monotonic() + RECONCILE_SECONDS
            await self.admit()

        await Periodic(
            "background executor",
            step,
            lambda: self.settings.poll_seconds,
            wait_first=False,
            backoff=8,
            error_level=logging.WARNING,
            logger=LOGGER,
        ).run(stop, self._wake)

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

    async def admit(self) -> None:
        """Where a job is admitted: under the lock, start every queued job its limits allow."""
        if len(self._jobs) >= self.settings.max_processes or self._deployment_id is None:
            return
        flt = queue_filter(self._deployment_id)
        if not self._queue_left and not await self.client.count_flow_runs(flow_run_filter=flt):
            return  # a cheap look first: the lock and a full read only when jobs wait
        admitted: list[_Job] = []
        async with try_admission_lock(self.client) as held:
            if not held:
                return
            now = time.time()
            queue = [
                r
                for r in queue_order(await aread_runs(self.client, flt))
                if r.next_scheduled_start_time is None
                or r.next_scheduled_start_time.timestamp() <= now
            ]
            self._queue_left = bool(queue)
            if not queue:
                return
            total, per_type = await active_counts(self.client)
            for run in queue:
                if len(self._jobs) >= self.settings.max_processes:
                    break
                if run.id in self._jobs:  # retried while its last process is still exiting
                    continue
                if await self._refused(run):
                    continue
                limits = JobLimits.of(run)
                if not limits.admissible(total, per_type):
                    continue
                lease_id = await take_slots(
                    self.client, run.id, limits.task_type, self.settings.lease_seconds
                )
                result: OrchestrationResult[Any] = await self.client.set_flow_run_state(
                    run.id, Pending()
                )
                if result.status != SetStateStatus.ACCEPT:
                    await release_slots(self.client, lease_id)  # cancelled or taken meanwhile
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

    async def _refused(self, run: FlowRun) -> bool:
        """End a job Failed (nothing imported, nothing run) if its ``func`` may not run."""
        reason = refused_func(run.parameters.get("func"), self.settings.jobs)
        if reason is None:
            return False
        LOGGER.warning("job %s refused: %s", run.id, reason)
        await self.client.set_flow_run_state(run.id, Failed(message=reason), force=True)
        return True

    async def _start(self, job: _Job) -> None:
        assert self._ctx is not None
        try:
            process = await asyncio.to_thread(
                start_job_process, self._ctx, job.run_id, self.settings.jobs
            )
        except Exception as exc:  # noqa: BLE001
            LOGGER.exception("could not start the process of job %s", job.run_id)
            self._jobs.pop(job.run_id, None)
            await self.client.set_flow_run_state(
                job.run_id,
                Crashed(message=f"the job's process could not start: {one_line(exc)}"),
                force=True,
            )
            await release_slots(self.client, job.lease_id)
            return
        job.process = process
        LOGGER.debug("job %s: process %s started", job.run_id, process.pid)
        loop = asyncio.get_running_loop()
        loop.add_reader(process.sentinel, self._on_exit, process.sentinel)
        await self.client.update_flow_run(
            job.run_id, infrastructure_pid=f"{HOSTNAME}:{process.pid}"
        )

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
        await release_slots(self.client, job.lease_id)
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
            kill_process_group(job.process.pid)

    async def _watch_cancellations(self) -> None:
        ids = [
            job.run_id
            for job in self._jobs.values()
            if job.kill_reason is None and job.process is not None
        ]
        if not ids:
            return
        runs = await aread_runs(
            self.client,
            FlowRunFilter(
                id=FlowRunFilterId(any_=ids),
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.CANCELLING, StateType.CANCELLED])
                ),
            ),
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
                job.lease_id = await take_slots(
                    self.client, job.run_id, job.task_type, self.settings.lease_seconds
                )

    # ------------------------------------------------------------------ housekeeping

    async def _refresh(self) -> None:
        """Follow the deployment if it was deleted and created again, and the settings."""
        if self._follow_settings:
            settings = await ExecutorSettings.aload()
            if settings != self.settings:
                LOGGER.info("background executor: settings changed to %s", settings)
                self.settings = settings
        try:
            deployment = await self.client.read_deployment_by_name(DEPLOYMENT_PATH)
        except ObjectNotFound:
            forget_deployment()
            await asyncio.to_thread(self._prepare_api)
            return
        self._deployment_id = deployment.id

    async def _reconcile(self) -> None:
        """Mark runs Crashed whose process on this host is gone (left by a dead executor)."""
        await self._refresh()
        if self._deployment_id is None:
            return
        runs = await aread_runs(self.client, active_filter(self._deployment_id))
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
                    and not pid_alive(int(pid))
                )
                why = f"the job's process {run.infrastructure_pid} is gone ({EXECUTOR_STOPPED})"
            if stale:
                LOGGER.warning("job %s: %s", run.id, why)
                await self.client.set_flow_run_state(run.id, Crashed(message=why), force=True)


async def run_background_executor(
    stop: asyncio.Event, settings: ExecutorSettings | None = None
) -> None:
    """Execute background jobs until ``stop`` is set (``dicom-dispatch serve`` runs this)."""
    await BackgroundExecutor(settings).run(stop)
