"""``serve --workers N``: N dispatcher processes on this host, one outgoing folder, one truth.

One dispatcher process spends most of a core in Prefect's client at a busy site; more processes
use more cores. The ``serve`` process is dispatcher 1 (it also runs the embedded server, the
Runner and the background executor); the other N-1 are children that run only a dispatcher loop
(``python -m deployments.service.dispatcher_child``). Nothing is shared in memory: the claims
(``.processing``, exclusive create) keep a case to one process, Prefect's tag limits (leased on
the server) keep ``num_proc``, per-type and per-target limits across all processes and hosts,
and each process orders its own cases urgent/normal/off-peak.

A child holds the read end of a pipe on its stdin; when ``serve`` dies, even by SIGKILL, the pipe
closes and the child finishes its sends and exits. A child that dies is started again (after a
pause, so a child that cannot start does not spin); its claims are freed by the others (same
host, dead pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.periodic import Periodic

if TYPE_CHECKING:
    from blocks.settings import DispatcherSettings
    from flows.sweep import Dispatcher

__all__ = [
    "MAX_DEFAULT_WORKERS",
    "DispatcherChildren",
    "available_cpus",
    "default_workers",
    "run_dispatcher_loop",
]

LOGGER = logging.getLogger(__name__)
MAX_DEFAULT_WORKERS = 4
SETTINGS_REFRESH_SECONDS = 15.0
RESTART_PAUSE_SECONDS = 5.0
CHILD_MODULE = "deployments.service.dispatcher_child"


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota if any."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_workers(own_server: bool = True) -> int:
    """Dispatcher processes when ``--workers`` is not given.

    Beside a Prefect server of its own on the same host, one per two CPUs: a case costs its
    dispatcher about a third of its CPU and the server and PostgreSQL the rest, and on a
    2-core host a second dispatcher process made 60 small cases 25–35 % slower and dearer
    (``bench/service_bench.py``). Against a server elsewhere, one per CPU. At most 4 either way.
    """
    cpus = available_cpus()
    return max(1, min(cpus // 2 if own_server else cpus, MAX_DEFAULT_WORKERS))


async def run_dispatcher_loop(
    dispatcher: Dispatcher,
    stop: asyncio.Event,
    on_refresh: Callable[[DispatcherSettings], Awaitable[None]] | None = None,
    max_grace: float | None = None,
) -> None:
    """The dispatcher loop, its settings reloaded every ``SETTINGS_REFRESH_SECONDS``; on stop,
    runs in flight get the shutdown grace period (at most ``max_grace``)."""
    from blocks.errors import ConfigError
    from blocks.prefect_internals import share_api_tls_contexts
    from blocks.registry import aload_settings

    share_api_tls_contexts()  # a Prefect client costs ≈ 17 ms of CPU without it

    async def refresh() -> None:
        try:
            settings = await aload_settings()
            settings.checked_folders()  # a bad layout keeps the last good settings
            dispatcher.settings = settings
            if on_refresh is not None:
                await on_refresh(dispatcher.settings)
        except ConfigError as exc:
            LOGGER.error("the new settings are not taken up: %s", exc)

    refreshing = Periodic("settings refresh", refresh, SETTINGS_REFRESH_SECONDS, logger=LOGGER)
    refresher = asyncio.create_task(refreshing.run(stop))
    try:
        await dispatcher.run_forever(stop, max_grace=max_grace)
    finally:
        stop.set()
        refresher.cancel()


class DispatcherChildren:
    """The N-1 extra dispatcher processes of ``serve --workers N``."""

    def __init__(self, count: int) -> None:
        self.count = max(0, count)
        self._procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "DICOM_DISPATCH_WORKER": str(index)}
        proc = subprocess.Popen(
            [sys.executable, "-m", CHILD_MODULE], stdin=subprocess.PIPE, env=env
        )
        LOGGER.info("dispatcher process %d started (pid %d)", index, proc.pid)
        return proc

    def start(self) -> None:
        self._procs = [self._spawn(i + 2) for i in range(self.count)]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    async def supervise(self, stop: asyncio.Event) -> None:
        """Start again a child that died, until ``stop``."""
        died_at: dict[int, float] = {}

        def restart_the_dead() -> None:
            for i, proc in enumerate(self._procs):
                if stop.is_set() or proc.poll() is None:
                    continue
                first = died_at.setdefault(i, time.monotonic())
                if time.monotonic() - first < RESTART_PAUSE_SECONDS:
                    continue
                LOGGER.warning(
                    "dispatcher process %d exited (%s); starting it again", i + 2, proc.returncode
                )
                died_at.pop(i)
                self._procs[i] = self._spawn(i + 2)

        await Periodic("dispatcher supervision", restart_the_dead, 1.0, logger=LOGGER).run(stop)

    def ask_to_stop(self) -> None:
        """Tell every child to stop (stdin closed): each drains its sends in its own grace."""
        for proc in self._procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()

    def kill(self) -> None:
        """Kill every child still running (``serve`` is ending past its budget)."""
        for proc in self._procs:
            if proc.poll() is None:
                _kill_tree(proc)

    def stop(self, timeout: float = 60.0) -> None:
        """Ask every child to stop, wait for their sends to finish, then kill."""
        self.ask_to_stop()
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                LOGGER.warning("dispatcher process %d did not stop; killing it", proc.pid)
                _kill_tree(proc)
                proc.wait(10)


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Kill a child and what it started (a ``dcmsend`` waiting on a silent peer would outlive
    it, orphaned, for its own timeout)."""
    import psutil

    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    proc.kill()
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.kill()
