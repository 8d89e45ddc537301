"""The executor's tuning and allow-list: the ``jobs_*`` fields of ``DispatcherSettings``.

Read from the settings block (editable in the UI, the same for every host), with the deprecated
``DICOM_DISPATCH_JOBS_*`` variables still applied over it (with a warning) so an existing unit
file keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks.registry import aload_settings
from blocks.settings import DEFAULT_JOB_MODULES, DispatcherSettings
from flows.background.queue import MIN_LEASE_SECONDS

__all__ = ["ExecutorSettings"]


@dataclass(frozen=True)
class ExecutorSettings:
    """Tuning of one executor: the ``jobs_*`` fields of ``DispatcherSettings``."""

    #: Seconds between looks at the queue (a job of this executor ending triggers one at once).
    poll_seconds: float = 0.5
    #: Lease of a job's slots: how long the slots of a job whose executor died stay taken.
    lease_seconds: float = MIN_LEASE_SECONDS
    #: At most this many jobs run in this executor's processes (host protection, not a limit).
    max_processes: int = 16
    #: Jobs run only functions of these modules (and submodules): ``jobs_modules``.
    job_modules: tuple[str, ...] = DEFAULT_JOB_MODULES

    @classmethod
    def of(cls, settings: DispatcherSettings) -> ExecutorSettings:
        """From the settings block; bounds enforced here too, since a deprecated environment
        override is applied without the block's validation."""
        return cls(
            poll_seconds=max(0.05, float(settings.jobs_poll_seconds)),
            lease_seconds=max(MIN_LEASE_SECONDS, float(settings.jobs_lease_seconds)),
            max_processes=max(1, int(settings.jobs_max_processes)),
            job_modules=tuple(settings.jobs_modules),
        )

    @classmethod
    async def aload(cls) -> ExecutorSettings:
        """The site's settings (``DICOM_DISPATCH_JOBS_*`` still override them, with a warning)."""
        return cls.of((await aload_settings()).with_overrides())
