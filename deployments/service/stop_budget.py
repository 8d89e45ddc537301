"""The service's stop budget: from SIGTERM to exit within 15 s, API or not.

The dispatcher gives in-flight sends their grace period (``DispatcherSettings.
shutdown_grace_seconds``), then aborts them; every later step (executor, runner, server,
database) gets what is left of the budget. A service thread that still hangs after the budget
(a send blocked in a peer's socket, a client retrying a dead API) does not hold the process:
the main thread exits without it.

Prefect ships logs, events and slot releases from queues on its own thread, and drains them
at interpreter exit with no time limit (``_at_exit`` in
``prefect/_internal/concurrency/services.py``): with the API gone that drain retries for a
minute or more, after our shutdown had finished. So the queues are drained here, within the
budget, while the API still answers (:func:`drain_prefect_services`); the process then ends
with :func:`leave_process`, which skips the interpreter's exit hooks after logging what was
still queued.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = [
    "EXIT_BUDGET",
    "ShutdownClock",
    "at_last_resort",
    "drain_prefect_services",
    "join_within_budget",
    "leave_process",
]

LOGGER = logging.getLogger(__name__)
#: Seconds from the stop signal to the process's exit, but for the last resort (children
#: killed, at most ≈ 1 s): every process is gone within the 15 s README promises.
EXIT_BUDGET = 13.0


class ShutdownClock:
    """How much of the stop budget is left; started when the stop signal is seen."""

    def __init__(self, stop_flag: threading.Event, budget: float = EXIT_BUDGET) -> None:
        self.stop_flag = stop_flag
        self.budget = budget
        self._started: float | None = None

    def begin(self) -> None:
        if self._started is None:
            self._started = time.monotonic()

    def left(self, at_most: float) -> float:
        """At most ``at_most`` seconds, never past the budget (and never below 0.1 s)."""
        started = self._started if self._started is not None else time.monotonic()
        return max(0.1, min(at_most, started + self.budget - time.monotonic()))

    def left_before(self, reserve: float) -> float:
        """What is left of the budget but its last ``reserve`` seconds (never below 0.1 s)."""
        return self.left(self.budget - reserve)

    def grace(self, wanted: float, reserve: float = 3.0) -> float:
        """The sends' grace period, leaving ``reserve`` seconds for the rest of the stop."""
        return max(0.0, min(wanted, self.budget - reserve))


def join_within_budget(
    worker: threading.Thread, stop_flag: threading.Event, outcome: list[int]
) -> NoReturn:
    """Wait for the service thread; once stopping, exit when the budget is spent.

    After a stop the interpreter's own exit would wait for every non-daemon thread, and a
    send blocked in a peer's socket (pynetdicom's association thread) keeps one alive until the
    peer's timeout: such threads are given what is left of the budget, then left behind.
    Never returns: the process ends here (:func:`leave_process`), whatever Prefect still queues.
    """
    deadline: float | None = None
    while worker.is_alive():
        worker.join(0.2)
        if stop_flag.is_set() and deadline is None:
            deadline = time.monotonic() + EXIT_BUDGET
        if deadline is not None and worker.is_alive() and time.monotonic() > deadline:
            LOGGER.warning("the service did not stop within %.0f s: exiting", EXIT_BUDGET)
            _abandoned()
            leave_process(outcome[0] if outcome else 0)
    code = outcome[0] if outcome else 1
    if deadline is not None:
        # Stopped: a process it started that still runs is left over (a dcmsend waiting out a
        # silent peer's timeout, its thread waiting for it).
        _kill_descendants()
        while _lingering() and time.monotonic() < deadline:
            time.sleep(0.1)
        if _lingering():
            _abandoned()
    # The service drained Prefect's queues while its API answered; what was queued since
    # (its own stop's lines) gets a moment, never the rest of the budget.
    leave_process(code, time.monotonic() + FINAL_DRAIN_SECONDS)


#: The last drain of Prefect's queues, after the service's own (the API may be gone by then).
FINAL_DRAIN_SECONDS = 0.5
_LAST_RESORT: list[Callable[[], object]] = []


def at_last_resort(stop_now: Callable[[], object]) -> None:
    """``stop_now`` runs just before the process ends, whether the service stopped cleanly or
    hung past the budget: a child process (server, database, dispatcher) must not outlive
    ``serve``. It must be quick, and do nothing if its process has already stopped."""
    _LAST_RESORT.append(stop_now)


def drain_prefect_services(timeout: float) -> Counter[str]:
    """Ship what Prefect's queue services still hold, for at most ``timeout`` seconds.

    Returns the items left behind per service (``APILogWorker``, ``EventsWorker``, ...). A
    drained service is stopped; anything queued later starts a new one, for the next drain.
    """
    from blocks.prefect_internals import active_queue_services, queued_items, start_drain

    waiting: dict[concurrent.futures.Future[bool], Any] = {}
    for service in active_queue_services():
        try:
            waiting[start_drain(service)] = service
        except Exception as exc:  # its loop is gone: nothing can ship it any more
            LOGGER.debug("could not drain %s: %s", type(service).__name__, exc)
            waiting[_failed()] = service
    if waiting:
        concurrent.futures.wait(waiting, timeout=max(0.0, timeout))
    left: Counter[str] = Counter()
    for future, service in waiting.items():
        if not future.done() or future.exception() is not None:
            left[type(service).__name__] += queued_items(service)
    return left


def _failed() -> concurrent.futures.Future[bool]:
    future: concurrent.futures.Future[bool] = concurrent.futures.Future()
    future.set_exception(RuntimeError("not drained"))
    return future


def leave_process(code: int, deadline: float | None = None) -> NoReturn:
    """End the process now: Prefect's queues get until ``deadline`` (none: no wait), what they
    still hold is logged as dropped, and the interpreter's exit hooks (Prefect's unbounded
    drain among them) are skipped."""
    left = drain_prefect_services((deadline or 0.0) - time.monotonic())
    if left:
        dropped = ", ".join(f"{name} {count}" for name, count in sorted(left.items()))
        LOGGER.warning("stopping: dropped what Prefect still had queued (%s)", dropped)
    for stop_now in reversed(_LAST_RESORT):
        try:
            stop_now()
        except Exception as exc:
            LOGGER.warning("stopping: %s", exc)
    _kill_descendants()
    _flush_output()
    os._exit(code)


def _kill_descendants() -> None:
    """Kill what this process started and is still running: a sender's tool (``dcmsend``
    waiting out a silent peer's timeout), a pool worker, a child that did not stop. After a
    clean stop there is none."""
    import psutil

    try:
        left = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in left:
        try:
            LOGGER.info("stopping: ending %s (pid %d), still running", child.name(), child.pid)
            child.kill()
        except psutil.Error:
            continue


def _flush_output() -> None:
    """Flush our log files and streams; never a Prefect API handler (its flush waits on the
    API, without a limit)."""
    for handler in [*logging.getLogger().handlers, *LOGGER.handlers]:
        if isinstance(handler, logging.StreamHandler):
            try:
                handler.flush()
            except Exception:  # noqa: S112 - a closed stream: nothing more to save
                continue
    sys.stdout.flush()
    sys.stderr.flush()


def _lingering() -> list[threading.Thread]:
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


def _abandoned() -> None:
    print("dicom-dispatch: stopped; a send still hanging was abandoned", file=sys.stderr)
