"""What a case's flow run shows in the Prefect UI, and how its runs are created and ended.

The folder is the truth about a case; the flow run must say the same thing to a person looking
at the runs list:

============================  ==========  ==============  ====================================
where the attempt left it      state type  state name      message
============================  ==========  ==============  ====================================
success/                       COMPLETED   Completed       —
outgoing/, retried later       FAILED      RetryPending    the one-line reason + when
error/                         FAILED      Failed          "moved to error/: <reason>"
held by another process        CANCELLED   Skipped         who holds it
already in success/ (a Retry)  COMPLETED   AlreadySent     where it is
============================  ==========  ==============  ====================================

A run whose process died is set ``Crashed`` when its claim is recovered, or by the zombie-run
automation (``deployments/automations.py``) when nothing at all comes back.

The dispatcher loop creates each case's run from the ``dispatch-case`` deployment in ``Pending``
(not a scheduled state, so the deployment's Runner never picks it up) and runs it in this
process. A UI "Retry" sets such a run to ``AwaitingRetry`` (scheduled): that one is executed by
the Runner of ``serve`` (or a worker), which dispatches the case again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun, State
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Completed, Crashed, Failed, Pending

__all__ = [
    "ALREADY_SENT",
    "CASE_DEPLOYMENT",
    "RETRY_PENDING",
    "SKIPPED",
    "CaseDeployment",
    "already_sent",
    "crash_run",
    "final_state",
    "moved_to_error",
    "outcome_of",
    "retry_pending",
    "skipped",
]

LOGGER = logging.getLogger(__name__)

#: ``<flow name>/<deployment name>`` of the deployment every case run belongs to.
CASE_DEPLOYMENT = "dispatch_case/dispatch-case"
RETRY_PENDING = "RetryPending"
SKIPPED = "Skipped"
ALREADY_SENT = "AlreadySent"
#: How long a missing deployment is remembered before it is looked up again (seconds).
DEPLOYMENT_RECHECK_SECONDS = 60.0


def retry_pending(reason: str, result: dict[str, Any]) -> State[Any]:
    """The attempt failed; the case waits in outgoing/ for its next attempt."""
    return Failed(name=RETRY_PENDING, message=reason, data=result)


def moved_to_error(reason: str, result: dict[str, Any]) -> State[Any]:
    """The case is in error/: a person must look at it (this is what "Failed" filters find)."""
    return Failed(message=f"moved to error/: {reason}", data=result)


def skipped(reason: str, result: dict[str, Any]) -> State[Any]:
    """Someone else holds the case: nothing failed, nothing was done."""
    return Cancelled(name=SKIPPED, message=reason, data=result)


def already_sent(where: str, result: dict[str, Any]) -> State[Any]:
    """A Retry of a case that reached success/ since: done, harmlessly."""
    return Completed(name=ALREADY_SENT, message=f"already in success/: {where}", data=result)


def final_state(location: str, reason: str, result: dict[str, Any]) -> State[Any] | dict[str, Any]:
    """What a case run returns for where its attempt left the case (the table above): the
    result itself for success/ (the run ends Completed), else the state that says where."""
    if location == "success":
        return result
    if location == "outgoing":
        return retry_pending(reason, result)
    if location == "skipped":
        return skipped(reason, result)
    return moved_to_error(reason, result)


async def outcome_of(state: State[Any]) -> dict[str, Any]:
    """The outcome dict of a finished case run, whatever its state (also a crashed one)."""
    try:
        data = await state.aresult(raise_on_failure=False)
    except Exception as exc:  # no result to read (crashed before returning)
        data = exc
    if isinstance(data, dict):
        return data
    return {"location": "unknown", "reason": state.message or str(data), "targets": {}}


class CaseDeployment:
    """Finds the ``dispatch-case`` deployment and creates the case runs that belong to it.

    Without the deployment (a test, a bare ``Dispatcher``) runs are created as plain flow runs,
    as before: everything works, only the UI's Retry does not.
    """

    def __init__(self) -> None:
        self._id: UUID | None = None
        self._checked_at = float("-inf")
        self._lookup = asyncio.Lock()  # cases starting together wait for one look-up

    async def deployment_id(self, client: PrefectClient, now: float) -> UUID | None:
        async with self._lookup:
            if self._id is None and now - self._checked_at >= DEPLOYMENT_RECHECK_SECONDS:
                try:
                    self._id = (await client.read_deployment_by_name(CASE_DEPLOYMENT)).id
                except ObjectNotFound:
                    self._id = None
                self._checked_at = now
        return self._id

    def forget(self) -> None:
        self._id = None
        self._checked_at = float("-inf")

    async def create_run(
        self, client: PrefectClient, now: float, case: str, name: str, tags: list[str]
    ) -> FlowRun | None:
        """A Pending run of the deployment for ``case``; None without a deployment."""
        deployment_id = await self.deployment_id(client, now)
        if deployment_id is None:
            return None
        try:
            return await client.create_flow_run_from_deployment(
                deployment_id, parameters={"case": case}, name=name, tags=tags, state=Pending()
            )
        except ObjectNotFound:  # deleted since we looked
            self.forget()
            return None


async def crash_run(client: PrefectClient, run_id: str | UUID, message: str) -> bool:
    """Set a run that its process left behind to Crashed (unless it already ended)."""
    try:
        run = await client.read_flow_run(UUID(str(run_id)))
    except (ObjectNotFound, ValueError):
        return False
    if run.state is not None and run.state.is_final():
        return False
    await client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    LOGGER.warning("flow run %s set Crashed: %s", run.id, message)
    return True
