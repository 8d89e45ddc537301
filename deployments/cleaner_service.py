"""The service's cleaner: a pass of ``tasks.cleaner`` over success/ per ``cleaner_scan_interval``.

Off unless ``DispatcherSettings.cleaner_enabled`` (a site may keep mercure's own cleaner). The
settings are read on every pass, so switching it on in the UI takes effect within a refresh.
The pass runs in a thread: removing a large case must not hold up the dispatcher's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable

from blocks.settings import DispatcherSettings
from tasks import casefolder as cf
from tasks.cleaner import CleanReport, clean_success

__all__ = ["clean_once", "run_cleaner"]

LOGGER = logging.getLogger("dicom_dispatch.cleaner")


def clean_once(settings: DispatcherSettings, now: dt.datetime | None = None) -> CleanReport:
    """One pass with these settings: the emergency clean if due; the regular one if off-peak."""
    moment = now or dt.datetime.now()
    outgoing, success, error = settings.folders()
    return clean_success(
        success,
        protected=(outgoing, error),
        retention=settings.retention,
        emergency_percentage=settings.emergency_clean_percentage,
        offpeak_now=cf.is_offpeak(settings.offpeak_start, settings.offpeak_end, moment.time()),
        now=moment.timestamp() if now is not None else time.time(),
    )


async def run_cleaner(settings: Callable[[], DispatcherSettings], stop: asyncio.Event) -> None:
    """Until ``stop``: wait an interval (first pass after one, as mercure), then clean if on."""
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), settings().cleaner_scan_interval)
        current = settings()  # what the refresh loaded meanwhile
        if stop.is_set() or not current.cleaner_enabled:
            continue
        try:
            report = await asyncio.to_thread(clean_once, current)
        except Exception:
            LOGGER.exception("the cleaner's pass failed")
            continue
        if report.removed:
            LOGGER.info(
                "cleaner removed %d case(s), %d bytes%s",
                len(report.removed),
                report.freed,
                " (emergency clean)" if report.emergency else "",
            )
