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
    """Wait for the service thread; once stopping, exit the process when the budget is spent."""
    deadline: float | None = None
    while worker.is_alive():
        worker.join(0.2)
        if stop_flag.is_set() and deadline is None:
            deadline = time.monotonic() + EXIT_BUDGET + 0.5
        if deadline is not None and worker.is_alive() and time.monotonic() > deadline:
            code = outcome[0] if outcome else 0
            LOGGER.warning("the service did not stop within %.0f s: exiting", EXIT_BUDGET)
            print("dicom-dispatch: stopped (a send or API call was still hanging)", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return outcome[0] if outcome else 1
