"""The Prefect side of a run: the environment set before Prefect is imported, the servers
(PostgreSQL, then SQLite), and the blocks and tag limits each figure saves on them."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._common import say
from bench.dispatch.config import HOST, SCP_AET
from bench.dispatch.meters import SERVER_PROCESSES


def prepare_environment(work: Path) -> None:
    """Before Prefect is imported: no telemetry, own PREFECT_HOME, quiet console."""
    os.environ.update(
        {
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "AWS_EC2_METADATA_DISABLED": "true",
            "PREFECT_HOME": str(work / "client-prefect-home"),
            "DICOM_DISPATCH_HOME": str(work / "data"),
            # Run logs still go to the API at INFO, as in the service; only the console is quiet.
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
        }
    )
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)


@contextmanager
def prefect_server(base: Path, db: str) -> Iterator[str]:
    """A Prefect server on ``db`` for the block in ``with``; its processes go to the CPU meter."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.peers.prefect_server import running_prefect_server

    started = time.perf_counter()
    with running_prefect_server(base, db=db) as server:
        say(f"    [{db} Prefect server up in {time.perf_counter() - started:.1f} s]")
        assert server.process is not None
        SERVER_PROCESSES["Prefect server"] = server.process.pid
        pid_file = base / "postgres" / "postmaster.pid"
        if db == "postgres" and pid_file.exists():
            SERVER_PROCESSES["PostgreSQL"] = int(pid_file.read_text().split()[0])
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                drain_prefect_workers()
                SERVER_PROCESSES.clear()


def drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=15)
    EventsWorker.drain_all(timeout=15)


async def register_blocks() -> None:
    from blocks.registry import aregister_block_types

    await aregister_block_types()


def dicom_target(port: int, **fields: Any) -> Any:
    from blocks.dicom import DicomTarget

    return DicomTarget(ip=HOST, port=str(port), aet_target=SCP_AET, **fields)


async def save_target(block: Any, name: str) -> None:
    from blocks.base import target_slug
    from blocks.registry import forget_cached_targets

    block.target_name = name
    await block.asave(target_slug(name), overwrite=True)
    forget_cached_targets()


async def save_settings(base: Path, **changes: Any) -> Any:
    from blocks.settings import DispatcherSettings

    fields: dict[str, Any] = {
        "outgoing_folder": str(base / "outgoing"),
        "success_folder": str(base / "success"),
        "error_folder": str(base / "error"),
        "retry_max": 3,
        "retry_delay": 0.0,
        "dispatcher_scan_interval": 0.1,
        "invalid_grace_seconds": 3600,
        "num_proc": 8,
    }
    fields.update(changes)
    settings = DispatcherSettings(**fields)
    await settings.asave("default", overwrite=True)
    for folder in settings.folders():
        folder.mkdir(parents=True, exist_ok=True)
    return settings


async def set_service_limits(settings: Any, on: bool) -> dict[str, int]:
    """The tag limits ``serve`` sets from the settings (``dicom-dispatch`` = num_proc), or none."""
    from prefect.client.orchestration import get_client

    from deployments.limits import apply_limits, wanted_limits

    wanted = wanted_limits(settings, {})
    if not on:
        wanted = dict.fromkeys(wanted, 0)
    async with get_client() as client:
        return await apply_limits(client, wanted)


async def time_case_run(case: Path, settings: Any) -> tuple[float, bool]:
    """As the dispatcher does: claim, then a top-level ``dispatch_case`` run tagged from the
    scanned task, with the dispatcher's settings handed over. Wall seconds, and whether the case
    reached success/."""
    from flows.dispatch import run_case
    from tasks import casefolder as cf
    from tasks.taskjson import read_task

    _, task = read_task(case)
    assert cf.claim_case(case)
    started = time.perf_counter()
    ok = await run_case(case, "normal", task, settings)
    return time.perf_counter() - started, ok
