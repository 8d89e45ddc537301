"""Several dispatchers on one Prefect server: one truth about claims and limits, dead hosts'
cases taken over, and work-pool mode with a real Prefect worker.

Real processes throughout: ``dicom-dispatch serve`` (with ``--workers``, or two of them with
different host ids standing for two machines on shared folders), a receiver that counts from
its side, the session's Prefect server on PostgreSQL with the real zombie-run automation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectAlreadyExists

from blocks.dicom import DicomTarget
from blocks.folder import FolderTarget
from tasks.claims import PROCESSING, read_claim
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.integration.test_case_states import case_runs, one_run
from tests.integration.test_claim_takeover import TAKEOVER_WINDOW
from tests.integration.test_run_privacy import remove_work_pool_deployments
from tests.peers.counting_scp import counting_scp
from tests.service import start_serve, stop, wait_for

ROOT = Path(__file__).resolve().parents[2]
#: ``prefect --no-prompt deploy --all``. Prefect 3.8.8's deploy asks the server for the pool's
#: online workers with ``"limit": null``, which FastAPI >= 0.150 refuses (422) after the first
#: deployment; the wrapper only fills in that one request's paging, the command is unchanged.
PREFECT_DEPLOY_ALL = """
import sys
from prefect.client.orchestration._work_pools.client import WorkPoolAsyncClient as C
read = C.read_workers_for_work_pool
async def paged(self, pool, worker_filter=None, offset=None, limit=None):
    return await read(self, pool, worker_filter, offset or 0, limit or 200)
C.read_workers_for_work_pool = paged
from prefect.cli import app
sys.argv = ["prefect", "--no-prompt", "deploy", "--all"]
app()
"""
#: The takeover test's shortened timing (test-only variables, see ``blocks.host``): claims are
#: refreshed every 2 s and taken over after 10 s; the zombie automation keeps its 35 s minimum.
TEST_HEARTBEAT, TEST_WINDOW, TEST_ZOMBIE_WINDOW = 2, 10, 35


def claim_owners(outgoing: Path) -> set[tuple[str, int]]:
    found = set()
    for claim in outgoing.glob(f"*/{PROCESSING}"):
        owner = read_claim(claim.parent)
        if owner is not None:
            found.add((owner.host, owner.pid))
    return found


@pytest.mark.timeout(600)  # several real processes on a loaded machine
def test_two_dispatcher_processes_send_each_case_once_within_the_limits(
    env: DispatchEnv, tmp_path: Path
) -> None:
    """serve --workers 2: 100 cases, each received once, the target's limit never exceeded."""
    cases = 100
    env.save_settings(num_proc=4)
    with counting_scp() as scp:
        env.save_target(
            DicomTarget(
                ip="127.0.0.1", port=str(scp.port), aet_target=scp.aet, max_concurrent_sends=2
            ),
            "pacs",
        )
        proc, log = start_serve(tmp_path, "--workers", "2", name="home")
        try:
            wait_for(lambda: b"dispatching from" in log.read_bytes(), 120, "serve to start")
            wait_for(lambda: len(psutil.Process(proc.pid).children()) >= 1, 30, "the child")
            (child,) = psutil.Process(proc.pid).children()
            for _ in range(cases):
                make_case(env.outgoing, ["pacs"], files=1)
            owners: set[tuple[str, int]] = set()

            def all_sent() -> bool:
                owners.update(claim_owners(env.outgoing))
                return len(list(env.success.iterdir())) == cases

            wait_for(all_sent, 400, "every case in success/")
        finally:
            stop(proc, log)
        assert not child.is_running(), "the child stops with serve"
    assert {pid for _, pid in owners} == {proc.pid, child.pid}, "both processes dispatched"
    assert not [p for p in env.outgoing.iterdir() if p.is_dir()], "none lost"
    assert len(scp.uids) == cases
    assert len(set(scp.uids)) == cases, "each case received exactly once"
    assert scp.max_open <= 2, f"{scp.max_open} associations at once: the limit is 2"


def send_diagnosis(case_id: str) -> str:
    """The case's send task runs and every tag limit's occupancy: why a send has not finished."""

    runs = case_runs(case_id)

    async def read() -> str:
        async with get_client() as client:
            lines = []
            for run in runs:
                for task_run in await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
                ):
                    state = task_run.state
                    lines.append(
                        f"task {task_run.name}: {state.type if state else None} "
                        f"{state.name if state else ''} {state.message if state else ''}"
                    )
            for limit in await client.read_global_concurrency_limits(limit=200):
                lines.append(f"limit {limit.name}: {limit.active_slots}/{limit.limit}")
            return "\n".join(lines)

    return asyncio.run(read())


@pytest.mark.timeout(600)  # several real processes on a loaded machine
def test_a_dead_hosts_case_is_taken_over(env: DispatchEnv, tmp_path: Path) -> None:
    """Two "hosts" (host ids) share the folders; the one sending a case is killed -9 mid-send.

    The other releases the claim only after its run is Crashed (the real zombie automation) and
    the claim's heartbeat is older than the window; the case then reaches success/ through it,
    and the target the dead host had completed is not sent again.
    """
    from deployments.automations import ensure_zombie_automation

    env.save_settings(takeover_window_seconds=TAKEOVER_WINDOW)  # shortened by the variables
    gate = threading.Event()
    hosts: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    with counting_scp(gate=gate) as scp:
        env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
        # The send stays in flight while the gate holds the C-STORE (as long as the receiver
        # waits for it), however long the Folder target's run takes on a loaded machine.
        pacs = DicomTarget(
            ip="127.0.0.1",
            port=str(scp.port),
            aet_target=scp.aet,
            dimse_timeout=300,
            network_timeout=300,
        )
        env.save_target(pacs, "pacs")
        try:
            for host in ("host-a", "host-b"):
                hosts[host], logs[host] = start_serve(
                    tmp_path,
                    "--workers",
                    "1",
                    name=host,
                    DICOM_DISPATCH_HOST_ID=host,
                    DICOM_DISPATCH_TEST_CLAIM_HEARTBEAT_SECONDS=str(TEST_HEARTBEAT),
                    DICOM_DISPATCH_TEST_TAKEOVER_WINDOW_SECONDS=str(TEST_WINDOW),
                )
            for host in hosts:
                wait_for(lambda h=host: b"dispatching from" in logs[h].read_bytes(), 120, host)
            case = make_case(env.outgoing, ["share", "pacs"], files=1)
            wait_for(lambda: read_claim(case) is not None, 30, "a claim")
            owner = read_claim(case)
            assert owner is not None
            wait_for(lambda: scp.open_now > 0, 60, "the send in flight")
            try:
                wait_for(
                    lambda: env.task(case)["dispatch"]["status"]["share"]["state"] == "complete",
                    120,
                    "the folder target to complete",
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{send_diagnosis(case.name)}") from None
            (run,) = case_runs(case.name)
            victim = hosts.pop(owner.host)
            victim.kill()
            victim.wait(30)
            killed_at = time.monotonic()
            gate.set()  # the receiver answers again (the dead host's association is gone)

            taken_over = env.success / case.name
            wait_for(taken_over.is_dir, TEST_ZOMBIE_WINDOW + 60, "takeover")
            took = time.monotonic() - killed_at
        finally:
            for host, proc in hosts.items():
                stop(proc, logs[host])

            async def default_window() -> None:
                async with get_client() as client:
                    await ensure_zombie_automation(client)

            asyncio.run(default_window())
    # Both signs of death are needed: the run Crashed by the zombie automation (at most its
    # window after the kill) and a claim older than the window (its last refresh came within
    # one heartbeat before the kill).
    assert took <= TEST_ZOMBIE_WINDOW + 2 * TEST_HEARTBEAT + 15, f"took {took:.0f} s"
    assert took >= TEST_WINDOW - TEST_HEARTBEAT, f"taken over after {took:.0f} s: too early"
    state = one_run(run.id).state
    assert state is not None
    assert state.type == StateType.CRASHED, state
    copies = [p for p in (tmp_path / "share").iterdir() if not p.name.startswith(".")]
    assert len(copies) == 1, "a target already complete is not sent again"
    assert len(scp.uids) >= 1
    assert env.task(env.success / case.name)["dispatch"]["status"]["pacs"]["state"] == "complete"


@pytest.mark.timeout(600)  # several real processes on a loaded machine
def test_work_pool_mode_with_a_real_worker(env: DispatchEnv, tmp_path: Path) -> None:
    """prefect.yaml deployed; the sweep queues each case on its priority's queue; a worker sends."""
    pool = "dicom-dispatch"
    env.save_settings(rule_priorities={"stat": "urgent"})
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")

    async def create_pool() -> None:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
            for priority, name in enumerate(("urgent", "normal", "offpeak"), start=1):
                with contextlib.suppress(ObjectAlreadyExists):
                    await client.create_work_queue(
                        name=name, work_pool_name=pool, priority=priority
                    )

    asyncio.run(create_pool())
    proc_env = {
        **os.environ,
        "DICOM_DISPATCH_SRC": str(ROOT),
        "DICOM_DISPATCH_HOME": str(tmp_path / "home"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",  # the runs' logs in worker.log
    }
    worker: subprocess.Popen[bytes] | None = None
    log = tmp_path / "worker.log"
    try:
        deployed = subprocess.run(
            [sys.executable, "-c", PREFECT_DEPLOY_ALL],
            cwd=ROOT,
            env=proc_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        urgent = make_case(env.outgoing, ["share"], applied_rule="stat")
        normal = [make_case(env.outgoing, ["share"]) for _ in range(2)]
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
                cwd=ROOT,
                env=proc_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # What the schedule in prefect.yaml does every 10 s (one sweep is enough here).
        from prefect.deployments import run_deployment

        run_deployment("sweep_outgoing/sweep-outgoing", timeout=0)
        every = [urgent, *normal]
        wait_for(
            lambda: all((env.success / c.name).is_dir() for c in every),
            240,
            "the worker to send every case",
        )
        for case in every:  # the worker must not be stopped while a run is ending
            (run,) = case_runs(case.name)
            wait_for(lambda r=run: _is_completed(r.id), 60, f"run {run.id} to complete")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGINT)  # as Ctrl-C; its exit code is Prefect's business
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        asyncio.run(remove_work_pool_deployments(pool))
    copies = [p for p in (tmp_path / "share").iterdir() if not p.name.startswith(".")]
    assert len(copies) == 3, "each case sent once"
    for case, queue in [(urgent, "urgent"), *((c, "normal") for c in normal)]:
        (run,) = case_runs(case.name)
        assert run.work_queue_name == queue
        assert run.deployment_id is not None


def _is_completed(run_id: Any) -> bool:
    state = one_run(run_id).state
    return state is not None and state.type == StateType.COMPLETED


@pytest.mark.timeout(600)  # two real services on a loaded machine
def test_dispatchers_racing_on_stale_claims_deliver_each_case_once(
    env: DispatchEnv, tmp_path: Path
) -> None:
    """Two dispatchers of one host (one host id) start on cases whose claims were left by a
    process that is gone: both judge every claim stale and race to release it. The receiver
    gets every SOP Instance UID exactly once."""
    cases, files = 20, 2
    host = "host-shared"
    with counting_scp() as scp:
        pacs = DicomTarget(ip="127.0.0.1", port=str(scp.port), aet_target=scp.aet)
        env.save_target(pacs, "pacs")
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        staging = tmp_path / "staging"  # same file system: the cases arrive by rename
        for _ in range(cases):
            case = make_case(staging, ["pacs"], files=files)
            claim = {
                "host": host,
                "pid": gone.pid,
                "process_started": time.time() - 60,
                "claimed_at": "2026-01-01T00:00:00+00:00",
                "flow_run_id": None,
                "heartbeat": time.time() - 60,
            }
            (case / PROCESSING).write_text(json.dumps(claim))
        procs = {
            name: start_serve(tmp_path, "--workers", "1", name=name, DICOM_DISPATCH_HOST_ID=host)
            for name in ("one", "two")
        }
        try:
            for _, log in procs.values():
                wait_for(lambda log=log: b"dispatching from" in log.read_bytes(), 120, "serve")
            for case in staging.iterdir():  # both are up: both find every stale claim
                case.rename(env.outgoing / case.name)

            def all_sent() -> bool:
                return len(list(env.success.iterdir())) == cases

            wait_for(all_sent, 400, "every case in success/")
        finally:
            for proc, log in procs.values():
                stop(proc, log)
    assert len(scp.uids) == cases * files, "each instance received exactly once"
    assert len(set(scp.uids)) == cases * files
    assert not [p.name for p in env.outgoing.iterdir()], "nothing left behind in outgoing/"
