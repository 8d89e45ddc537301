"""Host-level settings: what differs per machine, read from the environment in this one place.

Everything a site tunes lives in :class:`~blocks.settings.DispatcherSettings` (a block, editable in
the Prefect UI, the same for every host). The environment only says where this host keeps its
data (``DICOM_DISPATCH_HOME``) and, for compatibility, carries the deprecated overrides that
earlier releases documented before those values moved into the settings block. Prefect's own
variables (``PREFECT_*``) are Prefect's business and are handled in ``deployments.environment``.

No Prefect here: the folder protocol and the blocks import it.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

__all__ = [
    "DEPRECATED_OVERRIDES",
    "HOME_ENV",
    "HOST_ID_ENV",
    "data_dir",
    "deprecated_override",
    "host_id",
]

LOGGER = logging.getLogger(__name__)

#: The data directory's variable; default ``~/.dicom-dispatch``.
HOME_ENV = "DICOM_DISPATCH_HOME"

#: This host's name in case claims (``.processing``); default the host name. Two machines that
#: share the folders must never have the same one; set it where host names are not unique (e.g.
#: containers that all call themselves ``localhost``).
HOST_ID_ENV = "DICOM_DISPATCH_HOST_ID"

#: ``DispatcherSettings`` field → the environment variable that used to set it. Still honoured,
#: with a warning, so a site's unit file keeps working while it moves the value into the block.
DEPRECATED_OVERRIDES: dict[str, str] = {
    "retrieve_limit": "DICOM_DISPATCH_RETRIEVE_LIMIT",
    "jobs_poll_seconds": "DICOM_DISPATCH_JOBS_POLL_SECONDS",
    "jobs_lease_seconds": "DICOM_DISPATCH_JOBS_LEASE_SECONDS",
    "jobs_max_processes": "DICOM_DISPATCH_JOBS_MAX_PROCESSES",
}

_warned: set[str] = set()


def data_dir(create: bool = False) -> Path:
    """``$DICOM_DISPATCH_HOME``, default ``~/.dicom-dispatch``; created on request."""
    path = Path(os.environ.get(HOME_ENV) or Path.home() / ".dicom-dispatch")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def host_id() -> str:
    """Who this host is in the claims it writes: ``$DICOM_DISPATCH_HOST_ID`` or the host name."""
    return os.environ.get(HOST_ID_ENV, "").strip() or socket.gethostname()


def deprecated_override(field: str, value: float) -> float:
    """``value``, or the number the field's deprecated variable holds (warned about once).

    A variable that is set but not a number is ignored with a warning rather than stopping the
    service: the block's value is a valid setting on its own.
    """
    name = DEPRECATED_OVERRIDES[field]
    text = os.environ.get(name, "").strip()
    if not text:
        return value
    try:
        number = float(text)
    except ValueError:
        _warn_once(name, f"{name}={text!r} is not a number; using DispatcherSettings.{field}")
        return value
    _warn_once(
        name,
        f"{name} is deprecated: set DispatcherSettings.{field} instead (using {number:g})",
    )
    return number


def _warn_once(name: str, message: str) -> None:
    if name not in _warned:
        _warned.add(name)
        LOGGER.warning("%s", message)
