"""Periodic work declared once: a name, an interval and one step.

Every loop of the service is a :class:`Periodic` (the table is in docs/architecture.md §2, like
Prefect's own list of server services): the cleaner, the slot audit, the metrics sampler, the
settings refresh and the child supervision of ``serve --workers``, the background executor's
start and its admission loop, the dispatcher's sweep and the claim heartbeat. Each used to carry
its own sleep, error handling and stop; here they are written once:

* a step that raises is logged (at the level the service asks for) and the loop goes on: one
  bad pass must never end a loop that nobody restarts;
* the pause between steps ends early when ``stop`` is set (and, where given, when ``wake`` is
  set: a file-system event, a job that ended), so stopping never waits out an interval;
* ``backoff`` spaces steps out after failures in a row (interval × failures, capped), for a loop
  that talks to an API that may be restarting. No jitter: no loop has needed it.

Async steps run on the caller's event loop (:meth:`Periodic.run`); a loop that must go on while
no event loop runs, the claim heartbeat, runs a sync step in a daemon thread
(:meth:`Periodic.start_thread`). No Prefect here: the bottom of the layers uses it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from blocks.errors import one_line

__all__ = ["Periodic"]

LOGGER = logging.getLogger(__name__)


@dataclass
class Periodic:
    """One periodic service.

    Attributes:
        name: What the loop is, in its log lines and the thread's name.
        step: One pass, sync or async. Its return value is ignored.
        interval: Seconds between passes; a callable is asked before every pause (a value
            the site can change in the settings block while the service runs).
        wait_first: Pause before the first pass (as mercure's loops do); else pass first.
        until_success: Stop after the first pass that did not raise (a start that waits for
            the API).
        backoff: After ``n`` failed passes in a row, pause ``interval × min(n, backoff)``.
        error_level: Level of the log line for a failed pass; at ``ERROR`` and above it carries
            the traceback (an unexpected failure), below it one line (the API away for a moment).
        logger: Where the failures are logged: the owning module's logger.
    """

    name: str
    step: Callable[[], object]
    interval: float | Callable[[], float]
    wait_first: bool = True
    until_success: bool = False
    backoff: int = 1
    error_level: int = logging.ERROR
    logger: logging.Logger = field(default=LOGGER, repr=False)

    def delay(self, failures: int = 0) -> float:
        """Seconds to pause after ``failures`` failed passes in a row."""
        seconds = self.interval() if callable(self.interval) else self.interval
        return seconds * max(1, min(failures, self.backoff))

    def _failed(self, exc: Exception) -> None:
        if self.error_level >= logging.ERROR:
            self.logger.log(self.error_level, "%s failed", self.name, exc_info=exc)
        else:
            detail = one_line(exc, empty="")
            self.logger.log(
                self.error_level, "%s failed: %s: %s", self.name, type(exc).__name__, detail
            )

    async def run(self, stop: asyncio.Event, wake: asyncio.Event | None = None) -> None:
        """Pass and pause until ``stop`` is set (checked before every pass)."""
        passes = _Passes(self)
        while not stop.is_set():
            seconds = passes.next_pause()
            if seconds is not None:
                await self._pause(stop, wake, seconds)
                if stop.is_set():
                    return
            if passes.ends_loop(await self._step_async()):
                return

    async def _step_async(self) -> Exception | None:
        """One pass on the caller's event loop; what it raised, if anything."""
        try:
            result = self.step()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            return exc
        return None

    @staticmethod
    async def _pause(stop: asyncio.Event, wake: asyncio.Event | None, seconds: float) -> None:
        waiters = [asyncio.ensure_future(stop.wait())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            if wake is not None:
                wake.clear()

    def run_blocking(self, stop: threading.Event) -> None:
        """:meth:`run` for a sync step, in the calling thread."""
        passes = _Passes(self)
        while not stop.is_set():
            seconds = passes.next_pause()
            if seconds is not None and stop.wait(seconds):
                return
            if passes.ends_loop(self._step_blocking()):
                return

    def _step_blocking(self) -> Exception | None:
        """One pass of a sync step; what it raised, if anything (an async step is refused:
        nothing would run it)."""
        try:
            if inspect.isawaitable(result := self.step()):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(f"{self.name}: an async step needs Periodic.run")
        except Exception as exc:
            return exc
        return None

    def start_thread(self, stop: threading.Event | None = None) -> threading.Thread:
        """:meth:`run_blocking` in a daemon thread named after the service; never set,
        ``stop`` (default) lets it run as long as the process."""
        thread = threading.Thread(
            target=self.run_blocking, args=(stop or threading.Event(),), name=self.name, daemon=True
        )
        thread.start()
        return thread


@dataclass
class _Passes:
    """The bookkeeping :meth:`Periodic.run` and :meth:`Periodic.run_blocking` share, so that the
    two differ only in how they pause and call the step (one awaits, the other blocks): whether
    to pause before the next pass and how long, and what a pass's outcome means for the loop."""

    periodic: Periodic
    failures: int = 0
    started: bool = False

    def next_pause(self) -> float | None:
        """Seconds to pause before the next pass; ``None``: pass at once (the first pass, unless
        ``wait_first``)."""
        first, self.started = not self.started, True
        if first and not self.periodic.wait_first:
            return None
        return self.periodic.delay(self.failures)

    def ends_loop(self, raised: Exception | None) -> bool:
        """Count a pass that raised ``raised`` (``None``: it did not) and log its failure; true
        when the loop ends here (the first pass of an ``until_success`` loop that did not raise)."""
        if raised is not None:
            self.failures += 1
            self.periodic._failed(raised)
            return False
        self.failures = 0
        return self.periodic.until_success
