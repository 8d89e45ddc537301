"""Where dicom-dispatch keeps its data, and which Prefect API a command uses (architecture §4.6).

Everything here runs *before* Prefect is imported: Prefect reads its settings from the
environment once, so the data directory, ``PREFECT_HOME``, the database and the API URL must be
decided first.

Which API is decided here once, by :func:`decide_api`, for ``serve``, client commands and a
background executor alike: ``PREFECT_API_URL`` (environment or active profile) if set; else
``serve`` starts its own server, and the others take the URL a running ``serve`` recorded in the
data directory; else a client command uses an ephemeral server on the same database.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil

from blocks.host import data_dir
from deployments.service.api_auth import use_auth_string
from deployments.service.database import ensure_embedded_database

__all__ = [
    "HEARTBEAT_SECONDS",
    "ApiChoice",
    "choose_api",
    "decide_api",
    "use_api",
    "QUIET_ENV",
    "prepare_environment",
    "read_service_record",
    "remove_service_record",
    "write_service_record",
]

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


#: Who uses the API: ``serve`` (starts its own server unless one is configured), a client
#: command (falls back to an ephemeral server), an executor on another host (needs a server).
Purpose = Literal["serve", "client", "executor"]


@dataclass(frozen=True)
class ApiChoice:
    """The one answer to "which Prefect API": ``kind`` and, where known, its URL.

    ``configured``: ``PREFECT_API_URL`` (environment or active profile); ``service``: the
    server a running ``serve`` of this data directory recorded; ``embedded``: ``serve`` starts
    its own; ``ephemeral``: Prefect's in-process server on this host's database; ``none``: an
    executor found nothing to join.
    """

    kind: Literal["configured", "service", "embedded", "ephemeral", "none"]
    url: str | None = None
    #: The configured URL is this data directory's own server: its auth string applies.
    ours: bool = False


def decide_api(home: Path, purpose: Purpose = "client") -> ApiChoice:
    """Which API a ``purpose`` uses; decides, changes nothing (see :func:`use_api`).

    A client command takes a recorded service only if it answers (else the ephemeral server
    does); an executor takes it even while it restarts (it waits for it).
    """
    configured = os.environ.get("PREFECT_API_URL") or _profile_api_url()
    if purpose == "serve":
        return ApiChoice("configured", configured) if configured else ApiChoice("embedded")
    record = read_service_record(home)
    recorded = str(record["api_url"]) if record else None
    if configured:
        ours = recorded is not None and configured.rstrip("/") == recorded.rstrip("/")
        return ApiChoice("configured", configured, ours)
    if recorded and (purpose == "executor" or _healthy(recorded)):
        return ApiChoice("service", recorded, True)
    return ApiChoice("ephemeral") if purpose == "client" else ApiChoice("none")


def use_api(home: Path, choice: ApiChoice, db: str = "postgres") -> None:
    """Set the environment Prefect will read for ``choice`` (before Prefect is imported).

    The auth string of this data directory's server is used only for that server's URL.
    """
    if choice.kind == "service" and choice.url:
        os.environ["PREFECT_API_URL"] = choice.url
    if choice.ours:
        use_auth_string(home)
    if choice.kind == "ephemeral":
        os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "true"
        ensure_embedded_database(home, db)


def choose_api(home: Path, db: str = "postgres") -> str:
    """Decide and use the API for a client command; returns a word for ``status`` to show."""
    choice = decide_api(home, "client")
    use_api(home, choice, db)
    return choice.kind
