"""What wakes the dispatcher loop: file-system events in outgoing/, else the scan interval.

A scan every ``dispatcher_scan_interval`` (mercure's model) makes a ready case wait half an
interval on average. The loop instead sleeps on a :class:`Wakeup` that is set

* by :func:`watch_outgoing` when outgoing/ changes in a way that can make a case ready: a case
  folder appears (created or moved in), a ``.lock``/``.error``/``.processing`` marker or ``HALT``
  is removed, or ``task.json`` is written or moved into place in a folder nobody has claimed;
* by the dispatcher itself when a case run ends (a slot is free again).

The interval stays the fallback, and the only mechanism where events don't arrive (NFS, SMB
and other network file systems deliver no inotify events for other hosts' writes) or when the
watcher cannot start (e.g. the inotify watch limit): the loop then works exactly as before.

Events come from ``watchfiles`` (Rust ``notify``: inotify on Linux, FSEvents, ReadDirectoryChangesW)
on one worker thread; writes of ``*.dcm`` files and our own writes in claimed folders are
filtered out so copying a large case does not cost a scan per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from watchfiles import Change, awatch

from tasks import casefolder as cf
from tasks.taskjson import TASKFILE

__all__ = ["Wakeup", "is_wakeup_event", "watch_outgoing"]

LOGGER = logging.getLogger(__name__)
#: watchfiles' grouping: changes are handed over once none arrived for STEP ms (at most
#: DEBOUNCE ms after the first), so a ready case is seen within a few tens of milliseconds.
STEP_MS = 10
DEBOUNCE_MS = 100
_MARKERS_THAT_BLOCK = {cf.LOCK, cf.ERROR, cf.PROCESSING}


class Wakeup:
    """A flag the loop sleeps on: set by events, cleared when the loop wakes."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def poke(self) -> None:
        self._event.set()

    @property
    def event(self) -> asyncio.Event:
        """The flag itself, for a :class:`~tasks.periodic.Periodic` that sleeps on it."""
        return self._event

    async def wait(self, timeout: float) -> bool:
        """Sleep until poked or ``timeout`` seconds passed; True when poked."""
        with anyio.move_on_after(timeout):
            await self._event.wait()
        poked = self._event.is_set()
        self._event.clear()
        return poked


def is_wakeup_event(outgoing: Path, change: Change, path: str) -> bool:
    """Whether ``change`` of ``path`` (inside ``outgoing``) can have made a case ready."""
    where = Path(path)
    name = where.name
    if where.parent == outgoing:
        if name == cf.HALT:
            return change == Change.deleted
        return change == Change.added  # a case folder created or moved in
    if name in _MARKERS_THAT_BLOCK:
        return change == Change.deleted
    if name == TASKFILE and change != Change.deleted:
        return not (where.parent / cf.PROCESSING).exists()  # not our own status writes
    return False


@contextlib.asynccontextmanager
async def watch_outgoing(
    outgoing: Path, wakeup: Wakeup, stop: asyncio.Event
) -> AsyncIterator[None]:
    """Poke ``wakeup`` on every relevant event in ``outgoing``, and once ``stop`` is set."""
    root = outgoing.resolve()

    async def forward_stop() -> None:
        await stop.wait()
        wakeup.poke()

    def relevant(change: Change, path: str) -> bool:
        return is_wakeup_event(root, change, path)

    async def watch() -> None:
        try:
            async for _ in awatch(
                root,
                watch_filter=relevant,
                step=STEP_MS,
                debounce=DEBOUNCE_MS,
                stop_event=stopped,
                recursive=True,
            ):
                wakeup.poke()
        except Exception as exc:  # no events (watch limit, unsupported FS): the interval remains
            LOGGER.warning("no file-system events for %s (%s); scanning on the interval", root, exc)

    stopped = anyio.Event()
    watcher = asyncio.create_task(watch(), name="outgoing-watcher")
    forwarder = asyncio.create_task(forward_stop())
    try:
        yield
    finally:
        stopped.set()
        forwarder.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(watcher, timeout=2)
