"""``dicom-dispatch serve``: the whole service in one command (architecture §4.6).

Without ``PREFECT_API_URL``: a local Prefect server with its UI (embedded PostgreSQL, filesystem
lease storage) as a child process, or with ``api_processes`` ≥ 2 Prefect's multi-process server
on Redis (``server_stack.py``). Always: block types registered, tag limits set from the
settings, the ``dispatch-case`` and ``sweep-outgoing`` deployments served, and the dispatcher
loop running in this process. The embedded server runs with an auth string and is supervised
(``supervisor.py``). SIGTERM/SIGINT: stop claiming, give in-flight sends their grace period,
abort the rest (attempt recorded, claim released), stop the runner, the server and the database,
all within the stop budget (``stop_budget.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from deployments.service.api import decide_api, remove_service_record, write_service_record
from deployments.service.api_auth import (
    CLIENT_AUTH_ENV,
    ensure_auth_string,
    is_loopback,
    server_access_env,
)
from deployments.service.database import ensure_embedded_database, stop_embedded_postgres
from deployments.service.dispatchers import (
    SETTINGS_REFRESH_SECONDS,
    DispatcherChildren,
    run_dispatcher_loop,
)
from deployments.service.encryption_key import KEY_ENV
from deployments.service.metrics_endpoint import prepare_metrics_dir
from deployments.service.server_stack import ServerStack
from deployments.service.stop_budget import ShutdownClock, at_last_resort, drain_prefect_services
from deployments.service.supervisor import ServerSupervisor

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

    from blocks.settings import DispatcherSettings

__all__ = ["SETTINGS_REFRESH_SECONDS", "is_loopback", "serve"]

LOGGER = logging.getLogger(__name__)


async def serve(
    home: Path,
    host: str,
    port: int,
    db: str,
    stop_flag: threading.Event,
    workers: int = 1,
    api_processes: int = 1,
) -> int:
    server: ServerStack | None = None
    supervisor: ServerSupervisor | None = None
    embedded_db = False
    clock = ShutdownClock(stop_flag)
    if decide_api(home, "serve").kind == "embedded":
        embedded_db = not (
            os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
            or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
        )
        await asyncio.to_thread(ensure_embedded_database, home, db)
        auth = ensure_auth_string(home)
        child_env = server_access_env(host, port, auth)
        if KEY_ENV in os.environ:  # the server's alone, not every job process's
            child_env[KEY_ENV] = os.environ.pop(KEY_ENV)
        pgdata = home / "postgres" if embedded_db and db != "sqlite" else None
        server = ServerStack(home, host, port, child_env, pgdata, api_processes)
        at_last_resort(lambda: server.stop(0.1) if server else None)
        LOGGER.info("starting the Prefect server on %s", server.api.ui_url)
        await asyncio.to_thread(server.start)
        os.environ["PREFECT_API_URL"] = server.api.api_url
        os.environ[CLIENT_AUTH_ENV] = auth  # before Prefect is imported: it reads it once
        write_service_record(home, server.api.api_url, server.api.ui_url)
        if pgdata is not None:
            at_last_resort(lambda: stop_embedded_postgres(pgdata, 0.1))
        supervisor = ServerSupervisor(server.parts(), home)
        print(
            f"Prefect UI: {server.api.ui_url} (log in with {home / 'api-auth-string'})", flush=True
        )
    prepare_metrics_dir(
        home
    )  # one metrics directory per host (deployments/service/metrics_endpoint.py)
    try:
        await _run_service(stop_flag, clock, supervisor, workers)
    finally:
        remove_service_record(home)
        # Prefect's queued logs and events, shipped while the API still answers (within the
        # budget: what is left is dropped at exit, deployments/service/stop_budget.py).
        await asyncio.to_thread(drain_prefect_services, clock.left(1.5))
        if supervisor is not None:
            supervisor.stop()
            supervisor.remove_state()
        if server is not None:
            await asyncio.to_thread(server.stop, clock.left(2.0))
        if embedded_db and db != "sqlite":
            await asyncio.to_thread(stop_embedded_postgres, home / "postgres", clock.left(1.0))
    return 0


async def _run_service(
    stop_flag: threading.Event,
    clock: ShutdownClock,
    supervisor: ServerSupervisor | None,
    workers: int = 1,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner
    from prefect.types.entrypoint import EntrypointType

    from blocks.host import data_dir, restrict_data_dir, zombie_window_seconds
    from blocks.registry import aload_settings, aregister_block_types
    from deployments.automations import ensure_zombie_automation
    from deployments.service.background import run_background_executor
    from deployments.service.periodic_services import run_periodic_services
    from deployments.service.query import add_query_deployments
    from flows.dispatch import dispatch_case
    from flows.sweep import Dispatcher, sweep_outgoing

    async with get_client() as client:
        await aregister_block_types(client)
        settings = await aload_settings()
        settings.checked_folders()  # folders that could hurt each other: refuse to start
        window = zombie_window_seconds(settings.takeover_window_seconds)
        await ensure_zombie_automation(client, window)
        on_pool = await _deployments_on_work_pools(client)
    await _sync_limits(settings)

    runner = Runner(name="dicom-dispatch", pause_on_shutdown=False)
    for flow_obj, name in ((dispatch_case, "dispatch-case"), (sweep_outgoing, "sweep-outgoing")):
        if f"{flow_obj.name}/{name}" in on_pool:
            # prefect.yaml put it on a work pool: its workers run it (UI retries included);
            # serving it here would take it off the pool.
            LOGGER.info("%s/%s runs on a work pool; not served here", flow_obj.name, name)
            continue
        await runner.aadd_flow(flow_obj, name=name, entrypoint_type=EntrypointType.MODULE_PATH)
    await add_query_deployments(runner)

    stop = asyncio.Event()
    dispatcher = Dispatcher(settings)
    dispatcher.ensure_folders()
    restrict_data_dir(data_dir())  # the default folders are created inside it
    runner_task = asyncio.create_task(runner.start())
    # Background jobs have their own executor (limits checked on the server before a job
    # starts); they must not be added to the Runner, which would start them unchecked.
    jobs_task = asyncio.create_task(run_background_executor(stop))

    children = DispatcherChildren(workers - 1)  # this process is dispatcher 1
    children.start()
    at_last_resort(children.kill)

    async def watch_stop_flag() -> None:
        while not stop_flag.is_set():
            await asyncio.sleep(0.2)
        clock.begin()
        stop.set()
        children.ask_to_stop()  # they drain in their own grace, beside this process

    watcher = asyncio.create_task(watch_stop_flag())
    LOGGER.info("dispatching from %s", settings.folders()[0])
    print(f"dispatching from {settings.folders()[0]}", flush=True)

    # The cleaner, the metrics, the slot audit (architecture §2.4).
    periodic = asyncio.create_task(run_periodic_services(lambda: dispatcher.settings, stop))
    if supervisor is not None:
        supervisor.start()  # on its own thread: see ServerSupervisor
    minding = asyncio.create_task(children.supervise(stop))
    try:
        await run_dispatcher_loop(
            dispatcher, stop, _sync_limits, max_grace=clock.grace(float("inf"))
        )
    finally:
        clock.begin()
        stop.set()
        watcher.cancel()
        minding.cancel()
        # The children give their sends the same grace as this process, from the same moment.
        await asyncio.to_thread(children.stop, clock.left_before(2.0))
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(periodic, clock.left(2.0))
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(jobs_task, clock.left(2.0))
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(runner.astop(), clock.left(1.0))
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(runner_task, clock.left(1.0))


async def _deployments_on_work_pools(client: PrefectClient) -> set[str]:
    """``flow/deployment`` names of our deployments that a work pool runs."""
    from prefect.exceptions import ObjectNotFound

    found: set[str] = set()
    for name in ("dispatch_case/dispatch-case", "sweep_outgoing/sweep-outgoing"):
        try:
            deployment = await client.read_deployment_by_name(name)
        except ObjectNotFound:
            continue
        if deployment.work_pool_name:
            found.add(name)
    return found


async def _sync_limits(settings: DispatcherSettings) -> None:
    from prefect.client.orchestration import get_client

    from blocks.prefect_internals import block_name
    from blocks.registry import alist_targets
    from deployments.limits import apply_limits, wanted_limits

    targets = await alist_targets()
    per_target = {t.target_name or block_name(t): t.max_concurrent_sends for t in targets}
    async with get_client() as client:
        await apply_limits(client, wanted_limits(settings, per_target))
