"""The service's cleaner: a pass of ``tasks.cleaner`` over success/ per ``cleaner_scan_interval``.

Off unless ``DispatcherSettings.cleaner_enabled`` (a site may keep mercure's own cleaner). The
settings are read on every pass, so switching it on in the UI takes effect within a refresh.
The pass runs in a thread: removing a large case must not hold up the dispatcher's loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable

from blocks.settings import DispatcherSettings
from tasks import casefolder as cf
from tasks.cleaner import CleanReport, clean_success
from tasks.periodic import Periodic

__all__ = ["clean_once", "run_cleaner"]

LOGGER = logging.getLogger(__name__)


def clean_once(settings: DispatcherSettings, now: dt.datetime | None = None) -> CleanReport:
    """One pass with these settings: the emergency clean if due; the regular one if off-peak."""
    moment = now or dt.datetime.now()
    outgoing, success, error = settings.folders()
    cleaning, offpeak = settings.cleaning(), settings.offpeak()
    return clean_success(
        success,
        protected=(outgoing, error),
        retention=cleaning.retention,
        emergency_percentage=cleaning.emergency_percentage,
        offpeak_now=cf.is_offpeak(offpeak.start, offpeak.end, moment.time()),
        now=moment.timestamp() if now is not None else time.time(),
    )


async def run_cleaner(settings: Callable[[], DispatcherSettings], stop: asyncio.Event) -> None:
    """Until ``stop``: wait an interval (first pass after one, as mercure), then clean if on."""

    async def step() -> None:
        current = settings()  # what the refresh loaded meanwhile
        if not current.cleaning().enabled:
            return
        report = await asyncio.to_thread(clean_once, current)
        if report.removed:
            LOGGER.info(
                "cleaner removed %d case(s), %d bytes%s",
                len(report.removed),
                report.freed,
                " (emergency clean)" if report.emergency else "",
            )

    await Periodic("cleaner", step, lambda: settings().cleaning().scan_interval, logger=LOGGER).run(
        stop
    )
