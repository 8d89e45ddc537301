"""A job's process: how the executor forks it, what it runs, and how it is stopped.

A job gets a process of its own (not a thread of the executor) so that terminating it is a
SIGKILL to its process group, which stops whatever its code is doing, and so that a job cannot
take the executor down. Processes come from a fork server that has Prefect and this package
imported already, so a job starts in milliseconds rather than the seconds an import takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sys
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from uuid import UUID

from flows.background.checks import refused_func
from flows.background.flow import background_job
from flows.background.registered import JobRegistry

__all__ = [
    "JOB_PRELOAD",
    "job_process_context",
    "kill_process_group",
    "pid_alive",
    "run_job_process",
    "start_job_process",
]

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


# --------------------------------------------------------------------------- the executor's side


def job_process_context() -> BaseContext:
    """A running fork server with :data:`JOB_PRELOAD` imported, where available (else spawn)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(JOB_PRELOAD)
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return ctx


def start_job_process(ctx: BaseContext, run_id: UUID, jobs: JobRegistry) -> BaseProcess:
    """Start the process of an admitted job (it runs the flow run to its end, if its ``func``
    is one of ``jobs``)."""
    process: BaseProcess = ctx.Process(  # type: ignore[attr-defined]
        target=run_job_process,
        args=(str(run_id), jobs),
        name=f"background-job-{run_id}",
    )
    process.start()
    return process


def kill_process_group(pid: int) -> None:
    """SIGKILL the job's process group (its own, see :func:`run_job_process`), or the process."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- the job's side


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


def run_job_process(flow_run_id: str, jobs: JobRegistry) -> None:
    """The body of a job's process (forked by the executor): run the flow run to its end.

    ``func`` is checked against ``jobs`` once more, as the run is now (it could have
    been changed since it was admitted), before anything of the job's is imported.
    """
    os.setsid()  # its own process group: terminating the job stops its children too
    _leave_fork_server()
    _die_with_parent()
    os.environ["PREFECT__FLOW_RUN_ID"] = flow_run_id
    from prefect.engine import handle_engine_signals
    from prefect.events.worker import EventsWorker
    from prefect.flow_engine import load_flow_run, run_flow
    from prefect.logging.handlers import APILogWorker

    run = load_flow_run(UUID(flow_run_id))
    refused = refused_func(run.parameters.get("func"), jobs)
    if refused is not None:
        _refuse(run.id, refused)
        return
    try:
        with handle_engine_signals(run.id):
            outcome = run_flow(background_job, flow_run=run, return_type="state")
            if asyncio.iscoroutine(outcome):
                asyncio.run(outcome)
    finally:
        # A forked process ends with os._exit (no atexit hooks): ship the run's logs now.
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


def _refuse(run_id: UUID, reason: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Failed(message=reason), force=True)
