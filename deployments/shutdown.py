"""The service's stop budget: from SIGTERM to exit within 15 s, API or not.

The dispatcher gives in-flight sends their grace period (``DispatcherSettings.
shutdown_grace_seconds``), then aborts them; every later step (executor, runner, server,
database) gets what is left of the budget. A service thread that still hangs after the budget
(a send blocked in a peer's socket, a client retrying a dead API) does not hold the process:
the main thread exits without it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

__all__ = ["EXIT_BUDGET", "ShutdownClock", "join_within_budget"]

LOGGER = logging.getLogger("dicom_dispatch.serve")
#: Seconds from the stop signal to the process's exit.
EXIT_BUDGET = 14.0


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

    def grace(self, wanted: float, reserve: float = 3.5) -> float:
        """The sends' grace period, leaving ``reserve`` seconds for the rest of the stop."""
        return max(0.0, min(wanted, self.budget - reserve))


def join_within_budget(
    worker: threading.Thread, stop_flag: threading.Event, outcome: list[int]
) -> int:
    """Wait for the service thread; once stopping, exit when the budget is spent.

    After a stop the interpreter's own exit would wait for every non-daemon thread, and a
    send blocked in a peer's socket (pynetdicom's association thread) keeps one alive until the
    peer's timeout: such threads are given what is left of the budget, then left behind.
    """
    deadline: float | None = None
    while worker.is_alive():
        worker.join(0.2)
        if stop_flag.is_set() and deadline is None:
            deadline = time.monotonic() + EXIT_BUDGET + 0.5
        if deadline is not None and worker.is_alive() and time.monotonic() > deadline:
            LOGGER.warning("the service did not stop within %.0f s: exiting", EXIT_BUDGET)
            _exit_now(outcome[0] if outcome else 0)
    code = outcome[0] if outcome else 1
    if deadline is not None:
        while _lingering() and time.monotonic() < deadline:
            time.sleep(0.1)
        if _lingering():
            _exit_now(code)
    return code


def _lingering() -> list[threading.Thread]:
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


def _exit_now(code: int) -> None:
    print("dicom-dispatch: stopped; a send still hanging was abandoned", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
