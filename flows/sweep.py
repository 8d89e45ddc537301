"""The dispatcher: scan outgoing/, order, claim, and dispatch ready cases in this process.

``Dispatcher`` is shared by the service's loop (``serve``: a scan every
``dispatcher_scan_interval``, each case a top-level flow run) and by the ``sweep_outgoing`` flow
(one pass, each case a child run). Running cases in-process keeps a case's orchestration cost to
API calls: no subprocess per case.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import AsyncClientContext, SyncClientContext

from blocks.host import takeover_window_seconds
from blocks.registry import aload_settings
from blocks.settings import DispatcherSettings
from flows._abort import ABORT_REASON, begin_abort
from flows._api_outage import ApiWatch
from flows._wakeup import Wakeup, watch_outgoing
from flows.case_states import CaseDeployment, crash_run
from flows.dispatch import give_up_attempt, run_case
from flows.fanout import case_pool_deployment, fan_out
from flows.takeover import ForeignClaims
from tasks import casefolder as cf
from tasks.attempt_claim import AttemptClaim
from tasks.claims import release_stale_claim
from tasks.oncelog import OnceLog
from tasks.periodic import Periodic

__all__ = ["Dispatcher", "PassResult", "sweep_outgoing"]

LOGGER = logging.getLogger(__name__)
UNLIMITED_CASES = 32
#: After the grace period, how long aborted runs get to unwind before their claims are freed.
ABORT_WAIT_SECONDS = 1.5


@dataclass
class PassResult:
    """What one pass over outgoing/ did."""

    dispatched: int = 0
    succeeded: int = 0
    halted: bool = False
    waiting_for_retry: int = 0
    next_retry_at: float | None = None
    cases: dict[str, bool] = field(default_factory=dict)

    @property
    def all_succeeded(self) -> bool:
        return self.succeeded == self.dispatched


class Dispatcher:
    """Scans, orders and dispatches cases; at most ``capacity`` cases at once."""

    def __init__(self, settings: DispatcherSettings) -> None:
        self.settings = settings
        #: Problems of entries already logged (each once, until the entry goes away).
        self._said = OnceLog(LOGGER)
        self._foreign_claims = ForeignClaims()
        self._in_flight: set[asyncio.Task[bool]] = set()
        #: The case folder of each run in flight: never claimed twice, aborted on stop.
        self._cases: dict[asyncio.Task[bool], Path] = {}
        self._api = ApiWatch()
        self._deployment = CaseDeployment()
        #: Runs whose process died holding a claim, to be set Crashed (claim, run id).
        self._orphaned_runs: list[tuple[str, str]] = []
        #: Set by file-system events in outgoing/ and by a finished case (``flows._wakeup``).
        self._wakeup = Wakeup()

    @property
    def capacity(self) -> int:
        return self.settings.num_proc if self.settings.num_proc > 0 else UNLIMITED_CASES

    def ensure_folders(self) -> None:
        for folder in self.settings.folders():
            folder.mkdir(parents=True, exist_ok=True)

    def _scan(self) -> cf.Scan:
        """Look at outgoing/; each entry's problem costs only that entry and is logged once."""
        outgoing, _, error = self.settings.folders()
        scan = cf.scan_outgoing(
            outgoing,
            rule_priorities=self.settings.rule_priorities,
            invalid_grace=self.settings.invalid_grace_seconds,
        )
        self._said.forget_gone()
        for path, reason in scan.invalid:
            self._said.log(
                logging.WARNING,
                path,
                reason,
                "case %s is not dispatchable yet: %s",
                path.name,
                reason,
            )
        for path, reason in scan.blocked:
            self._said.log(logging.ERROR, path, reason, "case %s left alone: %s", path.name, reason)
        for path, reason in scan.expired_invalid:
            try:
                dest = cf.move_case(path, error, fail_stage=cf.FAIL_STAGE, reason=reason)
                LOGGER.error("case %s moved to %s: %s", path.name, dest, reason)
            except OSError as exc:
                self._said.log(
                    logging.ERROR,
                    path,
                    "move",
                    "case %s could not be moved to error/ (%s): %s",
                    path.name,
                    reason,
                    exc,
                )
        for path in scan.claimed:
            try:
                self._release_if_stale(path)
            except OSError as exc:
                self._said.log(
                    logging.ERROR, path, "claim", "case %s: its claim: %s", path.name, exc
                )
        return scan

    def _release_if_stale(self, path: Path) -> None:
        owner = release_stale_claim(path)  # atomic: one of several sweeps releases it
        if owner is None:
            return
        LOGGER.warning("case %s: released the claim of a process that is gone", path.name)
        if owner.flow_run_id:
            who = f"{owner.host}:{owner.pid}"
            self._orphaned_runs.append((path.name, owner.flow_run_id))
            LOGGER.info("case %s: run %s of %s ended", path.name, owner.flow_run_id, who)

    async def _crash_orphaned_runs(self) -> None:
        """A run whose process died mid-case is Crashed, not Running forever (a ghost)."""
        orphaned, self._orphaned_runs = self._orphaned_runs, []
        if not orphaned:
            return
        async with get_client() as client:
            for case_id, run_id in orphaned:
                message = (
                    f"the process dispatching case {case_id} is gone; its claim was released "
                    "and the case is queued again"
                )
                try:
                    await crash_run(client, run_id, message)
                except Exception as exc:  # the API may be down: the claim is released anyway
                    LOGGER.warning("could not set run %s Crashed: %s", run_id, exc)

    async def _release_claims_of_dead_runs(self, claimed: list[Path]) -> None:
        """Claims made elsewhere are judged by their run and heartbeat (``flows/takeover.py``)."""
        window = takeover_window_seconds(self.settings.takeover_window_seconds)
        await self._foreign_claims.release_dead(claimed, window)

    async def ready_cases(self) -> tuple[cf.Scan, list[cf.Candidate]]:
        scan = await anyio.to_thread.run_sync(self._scan)
        await self._crash_orphaned_runs()
        await self._release_claims_of_dead_runs(scan.claimed)
        now = dt.datetime.now().time()
        offpeak = cf.is_offpeak(self.settings.offpeak_start, self.settings.offpeak_end, now)
        return scan, cf.order_cases(scan.ready, offpeak_now=offpeak)

    def claim(self, case_dir: Path) -> bool:
        """Claim one case (:meth:`take`); False if it cannot be claimed."""
        return self.take(case_dir) is not None

    def take(self, case_dir: Path) -> AttemptClaim | None:
        """Claim one case; None if someone holds it, it is gone, or it cannot be claimed
        (e.g. a folder the service cannot write: logged once, and only this case waits)."""
        try:
            return AttemptClaim.take(case_dir)
        except FileNotFoundError:
            return None  # moved away since the scan
        except OSError as exc:
            self._said.log(
                logging.ERROR,
                case_dir,
                "claim",
                "case %s cannot be claimed, it stays where it is: %s (fix the folder's owner "
                "or mode for the service user)",
                case_dir.name,
                exc,
            )
            return None

    def _start(self, cand: cf.Candidate) -> asyncio.Task[bool] | None:
        outgoing = self.settings.folders()[0]
        if cf.is_halted(outgoing) or not cand.path.is_dir() or cand.path in self._cases.values():
            return None
        if not self.claim(cand.path):
            return None
        job = asyncio.create_task(
            run_case(cand.path, cand.priority, cand.task, self.settings, self._deployment)
        )
        self._in_flight.add(job)
        self._cases[job] = cand.path
        job.add_done_callback(self._in_flight.discard)
        job.add_done_callback(self._cases.pop)
        job.add_done_callback(lambda _: self._wakeup.poke())  # a slot is free
        return job

    async def one_pass(self) -> PassResult:
        """Dispatch every case ready now (HALT checked before each), wait for all of them."""
        async with AsyncClientContext.get_or_create():
            return await self._one_pass()

    async def _one_pass(self) -> PassResult:
        scan, ordered = await self.ready_cases()
        result = PassResult(halted=scan.halted)
        result.waiting_for_retry = len(scan.not_due)
        due = [c.task.dispatch.next_retry_at or 0 for c in scan.not_due if c.task.dispatch]
        result.next_retry_at = min(due) if due else None
        if scan.halted:
            return result
        slots = asyncio.Semaphore(self.capacity)

        async def guarded(cand: cf.Candidate) -> None:
            async with slots:
                job = self._start(cand)
                if job is not None:
                    result.dispatched += 1
                    ok = await job
                    result.cases[cand.path.name] = ok
                    result.succeeded += int(ok)

        # Started in order: each waits for a free slot before claiming its case.
        jobs = [asyncio.create_task(guarded(c)) for c in ordered]
        if jobs:
            await asyncio.gather(*jobs)
        return result

    async def run_forever(self, stop: asyncio.Event, max_grace: float | None = None) -> None:
        """The service loop: sleep first (as mercure), then start what fits in free capacity.

        It wakes on file-system events in outgoing/ and when a case ends, and at the latest
        every ``dispatcher_scan_interval`` (the only mechanism where no events arrive).

        One API client for the loop's lifetime, inherited by every case run it starts: without
        it each top-level run builds new clients (TLS bundle, connection) — ≈ 100 ms CPU a case.
        On stop, runs in flight get the shutdown grace period (at most ``max_grace``).
        """
        with SyncClientContext.get_or_create():
            async with AsyncClientContext.get_or_create():
                await self._run_forever(stop)
                grace = self.settings.shutdown_grace_seconds
                await self._drain(grace if max_grace is None else min(grace, max_grace))

    async def _drain(self, grace: float) -> None:
        """Let runs in flight finish for ``grace`` s; then abort them: attempt counted, claim
        released (by the run, or here if the run cannot even unwind: a send blocked in a
        socket, a client retrying a dead API)."""
        if not self._in_flight:
            return
        LOGGER.info("waiting up to %.0f s for %d case(s) in flight", grace, len(self._in_flight))
        _, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
        if not pending:
            return
        cases = [self._cases[job] for job in pending if job in self._cases]
        LOGGER.warning("aborting %d case(s) still sending", len(cases))
        begin_abort()
        for job in pending:
            job.cancel()
        await asyncio.wait(pending, timeout=ABORT_WAIT_SECONDS)
        for case_dir in cases:
            give_up_attempt(case_dir, self.settings, ABORT_REASON)

    async def _run_forever(self, stop: asyncio.Event) -> None:
        self.ensure_folders()
        interval = self.settings.dispatcher_scan_interval
        async with watch_outgoing(self.settings.folders()[0], self._wakeup, stop):
            sweep = Periodic("dispatcher", self._fill, interval, logger=LOGGER)
            await sweep.run(stop, self._wakeup.event)

    async def _fill(self) -> None:
        free = self.capacity - len(self._in_flight)
        if free <= 0:
            return
        scan, ordered = await self.ready_cases()
        if scan.halted or (ordered and not await self._api.up()):
            return  # the API is down: claim nothing until it is back
        started = 0
        for cand in ordered:  # a case that cannot be claimed leaves its slot to the next one
            if started >= free:
                break
            started += self._start(cand) is not None


@flow(name="sweep_outgoing", persist_result=False)
async def sweep_outgoing() -> dict[str, Any]:
    """Dispatch every case that is ready in the outgoing folder now, and wait for them."""
    logger = get_run_logger()
    dispatcher = Dispatcher(await aload_settings())
    dispatcher.ensure_folders()
    queued = await _fan_out_on_work_pool(dispatcher)
    if queued is not None:
        return queued
    result = await dispatcher.one_pass()
    logger.info(
        "dispatched %d case(s), %d reached success/%s",
        result.dispatched,
        result.succeeded,
        " (HALT is set)" if result.halted else "",
    )
    return {
        "dispatched": result.dispatched,
        "succeeded": result.succeeded,
        "halted": result.halted,
        "waiting_for_retry": result.waiting_for_retry,
        "next_retry_at": result.next_retry_at,
        "cases": result.cases,
    }


async def _fan_out_on_work_pool(dispatcher: Dispatcher) -> dict[str, Any] | None:
    """Work-pool mode (``flows/fanout.py``): one queued run per case; None in the other modes."""
    async with get_client() as client:
        deployment_id = await case_pool_deployment(client)
    if deployment_id is None:
        return None
    queued, halted = await fan_out(dispatcher, deployment_id)
    get_run_logger().info("queued %d case(s) on the work pool", queued)
    return {
        "dispatched": 0,
        "succeeded": 0,
        "queued": queued,
        "halted": halted,
        "waiting_for_retry": 0,
        "next_retry_at": None,
        "cases": {},
    }
