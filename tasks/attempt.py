"""What one attempt at a case comes to: send outcomes and retry state in, a disposition out.

The rules of README's "A case run's final state" table, in one pure place; ``flows/dispatch.py``
gathers the facts (task.json, links, each target's send) and applies the disposition (moves the
case, writes task.json, sets the run's state). Nothing here touches a file or Prefect:

* a case that cannot be sent as it is (task.json invalid, no target, an unknown target, a link
  refused) goes to error/ at once: retrying cannot fix it;
* the Prefect API going away mid-attempt (:class:`Outage`) is not the case's fault: the case goes
  back to the queue as it is, the attempt not counted; likewise a plain stop of the service;
* every pending target sent: success/;
* otherwise the attempt counts (mercure's ``increase_retry``, ``cf.record_failed_attempt``):
  retried later while attempts are left, else error/ "Max retries reached"; an attempt that
  ended unexpectedly, or was aborted after the shutdown grace period, counts as a failure too;
* a claim taken over (``ClaimLost``): skipped, nothing more done; the case is its new owner's.

No Prefect here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from tasks.claims import ClaimLost

__all__ = [
    "Disposition",
    "Failed",
    "Kind",
    "Outage",
    "SendOutcome",
    "Sent",
    "after_counting",
    "after_sending",
    "on_break",
    "refused",
]


# ---------------------------------------------------------------------------------------------
# what one send came to


@dataclass(frozen=True)
class Sent:
    """The target has the case; ``result`` is the send task's ``SendResult`` as a dict."""

    result: Mapping[str, Any]

    def status(self) -> dict[str, Any]:
        """The target's entry in the attempt's outcome (the run's result, the artifact)."""
        return {"state": "complete", "message": "", **self.result}


@dataclass(frozen=True)
class Failed:
    """The target did not get the case (written to task.json as the target's error)."""

    message: str

    def status(self) -> dict[str, Any]:
        return {"state": "error", "message": self.message}


@dataclass(frozen=True)
class Outage:
    """The send could not reach the Prefect API (its slot, its state): not the target's fault."""

    error: BaseException
    message: str


SendOutcome = Sent | Failed | Outage


# ---------------------------------------------------------------------------------------------
# what the attempt comes to


class Kind(Enum):
    """Where the attempt leaves the case; the values are ``CaseOutcome.location``'s."""

    SUCCESS = "success"
    RETRY = "outgoing"
    ERROR = "error"
    SKIPPED = "skipped"
    #: The attempt failed and counts: :func:`after_counting` says whether it is retried.
    FAILED = "failed"
    #: Back to the queue as it is, the attempt not counted (API outage, service stopping).
    UNCOUNTED = "uncounted"


@dataclass(frozen=True)
class Disposition:
    kind: Kind
    reason: str = ""

    @property
    def counts(self) -> bool:
        """The attempt must be counted (``cf.record_failed_attempt``) before it is final."""
        return self.kind is Kind.FAILED


def refused(problem: str, job: str) -> Disposition:
    """The case cannot be sent as it is (a link, no target, an unknown target): error/ now."""
    return Disposition(Kind.ERROR, f"{problem}. Unable to dispatch job {job}")


def after_sending(
    outcomes: Mapping[str, SendOutcome], links_problem: str | None, job: str
) -> Disposition:
    """The attempt once every pending target's send has ended.

    An outage wins (nothing is decided without the API; complete targets stay so in task.json);
    then a link planted during the sends (the case is unusable as it is, whatever the peers
    said); then success when every send arrived; else a failure to count, naming each target.
    """
    for outcome in outcomes.values():
        if isinstance(outcome, Outage):
            return Disposition(Kind.UNCOUNTED, outcome.message)
    if links_problem:
        return refused(links_problem, job)
    failed = {name: o.message for name, o in outcomes.items() if isinstance(o, Failed)}
    if not failed:
        return Disposition(Kind.SUCCESS)
    return Disposition(Kind.FAILED, "; ".join(f"{name}: {why}" for name, why in failed.items()))


def after_counting(reason: str, retry_later: bool, problem: str | None = None) -> Disposition:
    """A counted failure: ``retry_later`` is ``cf.record_failed_attempt``'s answer (attempts
    left), ``problem`` why task.json could not be updated (then error/: it cannot be retried)."""
    if problem is not None:
        return Disposition(Kind.ERROR, f"{reason}; {problem}")
    if retry_later:
        return Disposition(Kind.RETRY, reason)
    return Disposition(Kind.ERROR, f"Max retries reached: {reason}")


def on_break(
    error: BaseException, *, api_outage: bool, aborting: bool, abort_reason: str, why: str
) -> Disposition:
    """An attempt that ended by an exception (``why``: the error described for a person).

    ``ClaimLost``: skipped. Cancelled (the service stopping): uncounted, unless the shutdown
    grace period is over (``aborting``), then the abort counts. The API gone: uncounted.
    Anything else (a full disk): counted, so a case that always breaks reaches error/.
    """
    if isinstance(error, ClaimLost):
        return Disposition(Kind.SKIPPED, str(error))
    if isinstance(error, asyncio.CancelledError | KeyboardInterrupt):
        return Disposition(Kind.FAILED, abort_reason) if aborting else Disposition(Kind.UNCOUNTED)
    if api_outage:
        return Disposition(Kind.UNCOUNTED, why)
    return Disposition(Kind.FAILED, f"the attempt ended unexpectedly: {why}")
