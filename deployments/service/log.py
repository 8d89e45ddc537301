"""The service's own log lines on stderr (the journal under systemd), at INFO by default.

Our loggers (one per module, by ``__name__``, under ``blocks``, ``tasks``, ``flows`` and
``deployments``: the cleaner's removals, started processes, the executor's jobs) have no handler
of their own; without one only their warnings reached the output, through
Python's last-resort handler, and README's "every removal is logged with the case id" did not
hold. ``DICOM_DISPATCH_LOG_LEVEL`` changes the level.
"""

from __future__ import annotations

import logging

from blocks.host import LOG_LEVEL_ENV, log_level

__all__ = ["LOG_LEVEL_ENV", "log_to_stderr"]

_MARK = "_dicom_dispatch_service_log"
#: The loggers of our packages; a module's logger is named after it (``__name__``).
PACKAGES = ("blocks", "tasks", "flows", "deployments")


def log_to_stderr() -> None:
    """Send our packages' records to stderr, once per process (idempotent)."""
    for package in PACKAGES:
        ours = logging.getLogger(package)
        if any(getattr(h, _MARK, False) for h in ours.handlers):
            continue
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        setattr(handler, _MARK, True)
        ours.addHandler(handler)
        ours.setLevel(log_level())
        ours.propagate = False  # not a second time through Prefect's root handler
