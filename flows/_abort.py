"""The service is stopping: in-flight case runs that are aborted now count the attempt.

Set by the dispatcher when the shutdown grace period is over, just before it cancels the case
runs still sending; ``dispatch_case`` then records the attempt instead of only freeing the claim.
A process-wide flag: the service stops once.
"""

from __future__ import annotations

import threading

__all__ = ["ABORT_REASON", "begin_abort", "aborting"]

ABORT_REASON = "the service stopped while sending (aborted after the shutdown grace period)"

_aborting = threading.Event()


def begin_abort() -> None:
    _aborting.set()


def aborting() -> bool:
    return _aborting.is_set()
