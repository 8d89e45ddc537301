"""The executor's tuning (the ``jobs_*`` fields of ``DispatcherSettings``) and its host's jobs.

Tuning is read from the settings block (editable in the UI, the same for every host), with the
deprecated ``DICOM_DISPATCH_JOBS_*`` variables still applied over it (with a warning) so an
existing unit file keeps working. Which functions may run is not a setting: it is the host's
registry (``flows.background.registered``); a ``jobs_modules`` value in the block is ignored
with one warning.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from blocks.host import JOBS_ENV
from blocks.registry import aload_settings
from blocks.settings import DispatcherSettings
from flows.background.queue import MIN_LEASE_SECONDS
from flows.background.registered import ENTRY_POINT_GROUP, JobRegistry, registered_jobs

__all__ = ["ExecutorSettings", "warn_ignored_job_modules"]

LOGGER = logging.getLogger(__name__)
_warned = False


@dataclass(frozen=True)
class ExecutorSettings:
    """Tuning of one executor: the ``jobs_*`` fields of ``DispatcherSettings``; its host's jobs."""

    #: Seconds between looks at the queue (a job of this executor ending triggers one at once).
    poll_seconds: float = 0.5
    #: Lease of a job's slots: how long the slots of a job whose executor died stay taken.
    lease_seconds: float = MIN_LEASE_SECONDS
    #: At most this many jobs run in this executor's processes (host protection, not a limit).
    max_processes: int = 16
    #: Jobs run only these functions (``DICOM_DISPATCH_JOBS`` and the entry points).
    jobs: JobRegistry = field(default_factory=registered_jobs)

    @classmethod
    def of(cls, settings: DispatcherSettings, jobs: JobRegistry | None = None) -> ExecutorSettings:
        """From the settings block; bounds enforced here too, since a deprecated environment
        override is applied without the block's validation."""
        warn_ignored_job_modules(settings.jobs_modules)
        return cls(
            poll_seconds=max(0.05, float(settings.jobs_poll_seconds)),
            lease_seconds=max(MIN_LEASE_SECONDS, float(settings.jobs_lease_seconds)),
            max_processes=max(1, int(settings.jobs_max_processes)),
            jobs=jobs if jobs is not None else registered_jobs(),
        )

    @classmethod
    async def aload(cls) -> ExecutorSettings:
        """The site's settings (``DICOM_DISPATCH_JOBS_*`` still override them, with a warning)."""
        settings = (await aload_settings()).with_overrides()
        return cls.of(settings, await asyncio.to_thread(registered_jobs))


def warn_ignored_job_modules(modules: object) -> None:
    """One warning per process that a ``jobs_modules`` value is ignored, and what replaced it."""
    global _warned
    if modules and not _warned:
        _warned = True
        LOGGER.warning(
            "jobs_modules %s is ignored (deprecated): background jobs run only the functions "
            "listed in %s or declared in the entry-point group %r",
            modules,
            JOBS_ENV,
            ENTRY_POINT_GROUP,
        )
